"""`unmask generate --input FILE.jsonl`: many prompts, batched, one JSONL record each, in input order."""

import json

import pytest

from unmask.cli.main import main
from unmask.decoding.options import DecodeOptions

PROMPTS = ["def f(x):\n", "import os", "class A:\n    def run(self):\n"]


@pytest.fixture
def model_dir(tmp_path, tiny_pipeline):
    tiny_pipeline.save(tmp_path / "m")
    return tmp_path / "m"


def test_batch_file_gives_each_prompt_what_generate_gives_it(tmp_path, model_dir, tiny_pipeline, capsys):
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)) + "\n")
    dst = tmp_path / "out" / "answers.jsonl"
    argv = ["generate", "-m", str(model_dir), "-i", str(src), "-o", str(dst), "-n", "12", "--batch-size", "2"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    for row, prompt in zip(rows, PROMPTS):
        alone = tiny_pipeline.generate(prompt, DecodeOptions(max_new_tokens=12))
        assert (row["text"], row["tokens"], row["nfe"]) == (alone.text, len(alone.tokens), alone.nfe)
    assert "3 prompts" in capsys.readouterr().err
    assert main(["generate", "-m", str(model_dir), "-i", str(src), "-n", "12"]) == 0  # no --output: to stdout
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == [r["text"] for r in rows]


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a"}\n{"prompt": \n', "prompts.jsonl:2: not JSON"),
    ('{"prompt": "a"}\n{"text": "b"}\n', 'prompts.jsonl:2: expected {"prompt": "..."}'),
    ("\n\n", "holds no prompts"),
])
def test_bad_batch_files_are_named_and_nothing_is_written(tmp_path, model_dir, capsys, content, message):
    src = tmp_path / "prompts.jsonl"
    src.write_text(content)
    dst = tmp_path / "answers.jsonl"
    assert main(["generate", "-m", str(model_dir), "-i", str(src), "-o", str(dst)]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not dst.exists()


@pytest.mark.parametrize("argv,message", [
    (["generate", "def f():", "-i", "{src}"], "not both"),
    (["generate"], "give a prompt, or --input"),
    (["generate", "def f():", "-o", "{dst}"], "--output goes with --input"),
    (["generate", "-i", "{tmp}/missing.jsonl"], "no such file"),
    (["generate", "def f():", "--logprobs", "2"], "--logprobs goes with --input"),
])
def test_prompt_and_input_are_checked(tmp_path, model_dir, capsys, argv, message):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "a"}\n')
    argv = [a.format(src=src, dst=tmp_path / "o.jsonl", tmp=tmp_path) for a in argv] + ["-m", str(model_dir)]
    assert main(argv) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_batch_records_can_carry_logprobs(tmp_path, model_dir, tiny_pipeline):
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    dst = tmp_path / "answers.jsonl"
    assert main(["generate", "-m", str(model_dir), "-i", str(src), "-o", str(dst), "-n", "8", "--logprobs", "2"]) == 0
    for line, prompt in zip(dst.read_text().splitlines(), PROMPTS):
        row = json.loads(line)
        alone = tiny_pipeline.generate(prompt, DecodeOptions(max_new_tokens=8, logprobs=2))
        assert [t["id"] for t in row["logprobs"]] == alone.tokens and row["tokens"] == len(alone.tokens)
        assert [t["logprob"] for t in row["logprobs"]] == pytest.approx(alone.logprobs, abs=1e-5)
        assert all(len(t["top"]) == 2 and t["top"][0]["logprob"] >= t["logprob"] - 1e-6 for t in row["logprobs"])
