"""What the decoding commands print: the text on stdout byte for byte (a pipe or a file gets exactly it; a
terminal also a final newline), the statistics on stderr, the same for generate and chat."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from unmask.cli.main import main
from unmask.decoding.options import DecodeOptions

UNMASK = Path(sys.executable).with_name("unmask")
# a line longer than a console's 80 columns, with a tab: a console would wrap it and expand the tab
LONG_PROMPT = "values = [" + ", ".join(str(i) for i in range(40)) + "]\n\tif values:"
STATS = re.compile(r"^\d+ tokens · \d+ steps · NFE \d+ · [\d.]+ tokens/step · [\d.]+ tokens/s$", re.M)
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture
def model_dir(tmp_path, tiny_pipeline, monkeypatch):
    # the session's tokenizer: the template is put back after the test, or later tests see it
    monkeypatch.setattr(tiny_pipeline.tokenizer, "chat_template", CHAT_TEMPLATE)
    tiny_pipeline.save(tmp_path / "m")
    return tmp_path / "m"


def test_generate_prints_the_text_byte_for_byte_and_the_statistics_apart(model_dir, tiny_pipeline, capsys):
    assert main(["generate", LONG_PROMPT, "-m", str(model_dir), "-n", "8"]) == 0
    captured = capsys.readouterr()
    want = tiny_pipeline.generate(LONG_PROMPT, DecodeOptions(max_new_tokens=8)).text
    assert captured.out == LONG_PROMPT + want  # not wrapped at 80 columns, no padding, the tab kept
    assert STATS.search(captured.err), captured.err


def test_batch_output_to_stdout_is_one_unwrapped_line_per_prompt(tmp_path, model_dir, capsys):
    src = tmp_path / "prompts.jsonl"
    src.write_text(json.dumps({"prompt": LONG_PROMPT}) + "\n")
    assert main(["generate", "-m", str(model_dir), "-i", str(src), "-n", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["prompt"] == LONG_PROMPT


def test_chat_prints_the_reply_and_the_statistics_generate_prints(model_dir, capsys):
    assert main(["chat", str(model_dir), "--message", "hello", "-n", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and STATS.search(captured.err), captured.err
    assert main(["generate", "hello", "-m", str(model_dir), "-n", "8"]) == 0
    assert STATS.search(capsys.readouterr().err)


def test_an_empty_prompt_is_one_line_and_exit_2(model_dir, capsys):
    assert main(["generate", "", "-m", str(model_dir)]) == 2
    captured = capsys.readouterr()
    assert "the prompt is empty" in captured.err and captured.out == ""


def run_in_terminal(argv: list[str]) -> str:
    """`unmask ARGV` with stdout and stderr on a pseudo-terminal, as a user sees it: everything printed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([str(UNMASK), *argv], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                            env={**os.environ, "COLUMNS": "200", "TERM": "dumb"})
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=120) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_infill_middle_only_is_exact_in_a_pipe_and_ends_its_line_in_a_terminal(model_dir, tiny_pipeline):
    argv = ["infill", "--prefix", "def f(x):\n    return", "--suffix", "\n", "--middle-only", "-n", "6",
            "--length", "fixed", "-m", str(model_dir)]
    piped = subprocess.run([str(UNMASK), *argv], capture_output=True, text=True, timeout=120)
    middle = tiny_pipeline.infill("def f(x):\n    return", "\n", max_new_tokens=6, length="fixed").middle
    assert piped.returncode == 0 and piped.stdout == middle, piped.stderr
    shown = run_in_terminal(argv)
    assert shown.startswith(middle.rstrip("\n") + "\n")  # the statistics start a line of their own
    assert re.search(r"^6 token budget · ", shown, re.M), shown
