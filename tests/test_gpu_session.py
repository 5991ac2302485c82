"""recipes/gpu-session.sh rehearsed on the CPU (SMOKE=1): a GPU session has minutes, not hours, so its
script must be known to work end to end before one is lent — every phase, on tiny shapes and data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import unmask
from unmask.data.shards import write_shard

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def session(tmp_path_factory, corpus_texts, tokenizer):
    root = tmp_path_factory.mktemp("gpu-session")
    data = root / "tokens"
    write_shard(corpus_texts[:12], tokenizer, data / "train.bin")
    write_shard(corpus_texts[12:14], tokenizer, data / "val.bin")
    tokenizer.save(data / "tokenizer")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[14:18]))
    (data / "prompts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:4]))
    env = {**os.environ, "SMOKE": "1", "PYTHON": sys.executable, "WORK": str(root / "work"), "OUT": str(root / "out"),
           "DATA": str(data), "PROMPTS": str(prompts), "AR_MIN": "0.05", "ADAPT_MIN": "0.05", "DISTILL_MIN": "0.05", "DISTILL_BATCH": "4", "WAIT_S": "300",
           "DISTILL_ANSWERS": "twin",
           "OMP_NUM_THREADS": "1"}

    def run(phase: str) -> str:
        done = subprocess.run(["bash", "recipes/gpu-session.sh", phase], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    return root, run


def test_bench_phase_writes_decode_and_train_tables(session):
    root, run = session
    run("bench")
    decode = (root / "out" / "bench-decode-tiny.txt").read_text()
    assert "dual cache" in decode and "reference sampler" in decode
    assert "tokens/s" in (root / "out" / "bench-train.txt").read_text()


def test_train_then_collect_compares_three_runs_and_exports_the_winner(session):
    root, run = session
    assert "training in the background" in run("train")
    out = run("collect")
    for name in ("ar", "bi", "bd"):  # each run planned its steps from its minutes and validated at the end
        log = [json.loads(line) for line in (root / "work" / name / "log.jsonl").read_text().splitlines()]
        plan = next(r for r in log if "planned_steps" in r)
        assert log[-1]["step"] == plan["planned_steps"] and "val_bpb" in log[-1]
    winner = next(line.split()[-1] for line in out.splitlines() if line.startswith("winner:"))
    assert winner in ("bi", "bd") and "parse_rate" in out
    assert (root / "out" / "speed-quality.png").stat().st_size > 0
    exported = unmask.load(root / "out", device="cpu")
    assert exported.config.attention == {"bi": "bidirectional", "bd": "block_causal"}[winner]
    assert exported.config.logits_shift  # adapted from the twin: shifted logits

    run("twin")
    assert unmask.load(root / "out", device="cpu").config.attention == "causal"

    assert "distilling in the background" in run("distill")
    out = run("student")
    assert "τ=0.3" in out and "eb γ=0.5" in out and (root / "out" / "distill-quality.png").stat().st_size > 0
    student = unmask.load(root / "out", device="cpu")  # the student: the winner's architecture
    assert student.config.attention == exported.config.attention
    assert f"{root / 'work' / 'ar'} answered" in " ".join((root / "work" / "distill.log").read_text().split())
