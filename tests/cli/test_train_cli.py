"""The data / train / eval CLI end to end, and its errors as one line."""

from __future__ import annotations

import json

import pytest
import yaml

from train_helpers import TINY_MODEL, one_thread  # noqa: F401
from unmask.cli.main import main


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, text):
    assert rc == 2, err
    assert err.startswith("error:") and err.strip().count("\n") == 0, err
    assert text in err, err


@pytest.fixture
def recipe(tmp_path):
    cfg = {"out_dir": str(tmp_path / "run"), "model": dict(TINY_MODEL), "data": {"corpus": str(tmp_path / "corpus")},
           "corpus": {"packages": ["json", "textwrap", "email"], "val_fraction": 0.2, "vocab_size": 400},
           "seq_len": 32, "batch_size": 4, "steps": 3, "eval_interval": 0, "eval_sequences": 4, "eval_samples": 1,
           "checkpoint_interval": 0, "device": "cpu"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_corpus_tokenizer_train_eval_from_the_command_line(tmp_path, capsys, recipe):
    rc, out, err = run(capsys, "corpus", "--recipe", recipe)
    assert rc == 0, err
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert {r["name"] for r in manifest["sources"]} == {"json", "textwrap", "email"}
    assert (tmp_path / "corpus" / "tokenizer" / "tokenizer.json").exists()

    rc, out, err = run(capsys, "tokenizer", tmp_path / "corpus", "--vocab-size", 320, "--out", tmp_path / "tok320")
    assert rc == 0 and "320 tokens" in out
    rc, out, err = run(capsys, "shards", tmp_path / "corpus")
    assert rc == 0 and (tmp_path / "corpus" / "tokens" / "train.bin").exists() and "uint16" in out

    rc, out, err = run(capsys, "train", "--config", recipe, "--set", "optim.lr=1e-3", "--quiet")
    assert rc == 0, err
    assert "step 3" in out and (tmp_path / "run" / "model.safetensors").exists()
    assert yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())["optim"]["lr"] == 1e-3

    rc, out, err = run(capsys, "eval", "elbo", tmp_path / "run", "--data", tmp_path / "corpus", "--seq-len", 32,
                       "--samples", 1, "--max-windows", 4, "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["bits_per_byte"] > 0 and result["bytes"] > 0 and not result["exact"]
    rc, out, err = run(capsys, "eval", "elbo", tmp_path / "run", "--data", tmp_path / "run" / "data" / "val.bin",
                       "--seq-len", 32, "--samples", 1, "--max-windows", 2)
    assert rc == 0 and "bits/byte" in out


def test_shards_of_a_file_find_the_tokenizer_trained_on_it(tmp_path, capsys):
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(20)))
    rc, out, err = run(capsys, "tokenizer", data, "--vocab-size", 300)
    assert rc == 0, err
    rc, out, err = run(capsys, "shards", data)  # the default --tokenizer is where `unmask tokenizer` wrote it
    assert rc == 0, err
    assert (tmp_path / "tokens" / "train.bin").exists() and "tokens" in out


def test_cli_errors_are_one_line(tmp_path, capsys, recipe):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    one_line_error(*run(capsys, "train", "--config", bad)[::2], "unknown config key 'optim.lrr'")
    one_line_error(*run(capsys, "train", "--config", recipe, "--set", "steps=many")[::2],
                   "config key 'steps' must be int")
    one_line_error(*run(capsys, "train", "--config", recipe, "--set", "model.widht=3")[::2],
                   "unknown config key 'model.widht'")
    one_line_error(*run(capsys, "train", "--config", recipe)[::2], "training data not found")
    one_line_error(*run(capsys, "train", "--config", tmp_path / "nope.yaml")[::2], "no such config file")
    bad.write_text("steps: [1,\n")
    one_line_error(*run(capsys, "train", "--config", bad)[::2], "not valid YAML")
    one_line_error(*run(capsys, "corpus", tmp_path / "c", "--dir", tmp_path / "missing")[::2], "not a directory")
    one_line_error(*run(capsys, "corpus", tmp_path / "c", "--package", "no_such_pkg_xyz")[::2], "not installed")


def test_eval_elbo_rejects_a_corrupt_shard(tmp_path, capsys, saved_model_dir, tokenizer):
    from unmask.data.shards import write_shard

    write_shard(["x = 1\n" * 50], tokenizer, tmp_path / "v.bin")
    (tmp_path / "v.bin").write_bytes((tmp_path / "v.bin").read_bytes()[:-3])
    one_line_error(*run(capsys, "eval", "elbo", saved_model_dir, "--data", tmp_path / "v.bin")[::2],
                   "corrupt token shard")
    one_line_error(*run(capsys, "eval", "elbo", saved_model_dir, "--data", tmp_path / "none.jsonl")[::2],
                   "no such data")


@pytest.mark.parametrize("flag,value", [("--max-windows", 0), ("--samples", 0), ("--samples", -1),
                                        ("--batch-size", 0), ("--seq-len", 0), ("--split", "test")])
def test_eval_elbo_rejects_values_that_give_no_number(tmp_path, capsys, saved_model_dir, flag, value):
    """0 windows reported 0.0000 bits/byte, 0 samples NaN, -1 samples 0.0000; batch 0 was a traceback and
    an unknown --split silently scored the val split."""
    data = tmp_path / "v.txt"
    data.write_text("def f(x):\n    return x\n" * 20)
    rc, out, err = run(capsys, "eval", "elbo", saved_model_dir, "--data", data, flag, value)
    assert rc == 2 and "bits/byte" not in out, out
    assert flag in err, err


def test_bench_train_prints_tokens_per_second(capsys):
    rc, out, err = run(capsys, "bench", "train", "--shape", "tiny", "--steps", 2, "--warmup", 1,
                       "--batch-size", 2, "--seq-len", 32, "--device", "cpu", "--peak-tflops", 1)
    assert rc == 0, err
    assert "tokens/s" in out and "MFU" in out and "%" in out


@pytest.mark.parametrize("args,text", [(["--steps", 0], "--steps"), (["--batch-size", 0], "--batch-size"),
                                       (["--device", "gpu"], "unknown device"),
                                       (["--mode", "ar", "--attention", "bidirectional"], "cannot train")])
def test_bench_train_rejects_bad_arguments_in_one_line(capsys, args, text):
    rc, out, err = run(capsys, "bench", "train", "--shape", "tiny", "--steps", 1, "--warmup", 0,
                       "--batch-size", 2, "--seq-len", 16, "--device", "cpu", *args)
    assert rc == 2 and "Traceback" not in err and text in err, err


def test_bench_train_seq_len_beyond_the_shape_context(capsys):
    rc, out, err = run(capsys, "bench", "train", "--shape", "tiny", "--steps", 1, "--warmup", 0,
                       "--batch-size", 1, "--seq-len", 300, "--device", "cpu")  # tiny's context is 256
    assert rc == 0, err
    assert "× 300" in out and "tokens/s" in out


def test_disk_full_while_checkpointing_is_one_line_and_leaves_no_partial_folder(tmp_path, capsys, recipe,
                                                                                  monkeypatch):
    import errno

    from unmask.train import trainer

    assert run(capsys, "corpus", "--recipe", recipe)[0] == 0

    def full(model, path, **kw):
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path / "model.safetensors"))

    monkeypatch.setattr(trainer, "save_model", full)
    rc, out, err = run(capsys, "train", "--config", recipe, "--quiet")
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: No space left on device: ") and "model.safetensors" in last, err
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []  # no half-written .tmp-step_* folder
