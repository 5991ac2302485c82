"""Checkpoints under faults: a disk that fills up while one is written, and resuming when the latest is
unreadable."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from train_helpers import make_corpus, one_thread, tiny_train_config  # noqa: F401  (one_thread: autouse)
from unmask.cli.main import main
from unmask.train.config import save_config
from unmask.train.trainer import Trainer


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, corpus_texts, tokenizer) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), corpus_texts, tokenizer)


def disk_usage(folder: Path) -> int:
    """Bytes a folder takes on a tmpfs (whole pages per file)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(bytes): a folder on a tmpfs of that size, mounted for the test (needs root: else skipped)."""
    mounted = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"a small tmpfs cannot be mounted here: {r.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_disk_that_fills_up_while_checkpointing_is_one_line_naming_it(corpus_dir, tmp_path, small_disk, capsys):
    """A real full disk: room for the first checkpoint, not the second. torch's own writer reported this
    as `unexpected pos 704 vs 598` at the end of a 64-line traceback."""
    sized = tiny_train_config(corpus_dir, tmp_path / "sized", steps=1, checkpoint_interval=1)
    Trainer(sized, progress=False).fit()
    one = disk_usage(tmp_path / "sized" / "checkpoints" / "step_00000001")
    disk = small_disk(disk_usage(tmp_path / "sized") + one // 2)
    cfg = tiny_train_config(corpus_dir, disk / "run", steps=2, checkpoint_interval=1, keep_checkpoints=2)
    save_config(cfg, tmp_path / "recipe.yaml")
    rc = main(["train", "--config", str(tmp_path / "recipe.yaml"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: No space left on device: ") and str(disk / "run" / "checkpoints") in last, err
    assert "`latest` still names step_00000001" in last
    checkpoints = disk / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001"]  # no half-written folder
    assert Trainer(cfg, resume=True, progress=False).step == 1


@pytest.mark.parametrize("broken", ["trainer.pt", "model.safetensors"])
def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_so(corpus_dir, tmp_path, caplog, broken):
    cfg = tiny_train_config(corpus_dir, tmp_path / "run", steps=4, checkpoint_interval=2, keep_checkpoints=2)
    Trainer(cfg, progress=False).fit()
    latest = tmp_path / "run" / "checkpoints" / "step_00000004"
    corrupt = next(latest.glob(broken.replace("model", "model*")))
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])  # a write cut short
    with caplog.at_level(logging.WARNING):
        again = Trainer(cfg, resume=True, progress=False)
    assert again.step == 2
    assert "resuming from step_00000002, the newest intact one" in caplog.text and "step_00000004" in caplog.text


def test_resume_with_every_checkpoint_unreadable_names_the_latest(corpus_dir, tmp_path):
    from unmask.train.trainer import TrainError

    cfg = tiny_train_config(corpus_dir, tmp_path / "run", steps=2, checkpoint_interval=2, keep_checkpoints=1)
    Trainer(cfg, progress=False).fit()
    state = tmp_path / "run" / "checkpoints" / "step_00000002" / "trainer.pt"
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="corrupt checkpoint .*step_00000002"):
        Trainer(cfg, resume=True, progress=False)
