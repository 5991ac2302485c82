"""Instant Edit: bytes outside the regions never change, length choice, modes, errors, CLI, atomic writes."""

from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unmask.edit.fill as fill_mod
from conftest import tiny_model
from unmask.cli.main import main
from unmask.edit import EditError, edit_text, write_in_place
from unmask.edit.spans import check_spans, extract_markers, line_span
from unmask.errors import UnmaskError
from unmask.pipeline import Pipeline


# decoding quality does not matter where only the bytes around the regions are checked: 2 steps per block
FAST = dict(policy="fixed", steps=2)


@pytest.fixture(scope="module")
def pipe(tokenizer) -> Pipeline:
    return Pipeline(tiny_model(tokenizer, seed=3), tokenizer)


def outside_matches(original: str, spans, edited: str) -> bool:
    """True if `edited` is the original with only the span contents replaced (by anything)."""
    pattern, pos = [], 0
    for s, e in sorted(spans):
        pattern.append(re.escape(original[pos:s]))
        pattern.append("(.*?)")
        pos = e
    pattern.append(re.escape(original[pos:]))
    return re.fullmatch("".join(pattern), edited, flags=re.DOTALL) is not None


# --- the core guarantee -------------------------------------------------------------------------------

TEXT_ALPHABET = st.sampled_from(["a", "b", " ", "x = 1", "\n", "\r\n", "\r", "é", "日本", "€", "\t", "def", "(",
                                 ")", "<|mask|>", "<|endoftext|>", "🙂"])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bytes_outside_spans_unchanged(pipe, data):
    text = "".join(data.draw(st.lists(TEXT_ALPHABET, min_size=1, max_size=25)))
    n_spans = data.draw(st.integers(1, 3))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), min_size=2 * n_spans, max_size=2 * n_spans,
                                     unique=True)) if len(text) + 1 >= 2 * n_spans else [0, len(text)])
    spans = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts), 2)]
    # spans at the very start and end are reached by the draw (cuts 0 and len(text)) and forced now and then
    if data.draw(st.booleans()):
        spans[0] = (0, spans[0][1])
    result = edit_text(pipe, text, spans=spans, extra_tokens=data.draw(st.integers(0, 3)), **FAST)
    assert outside_matches(text, spans, result.text)
    # the same in bytes, checked directly at both ends (CRLF, lone CR, non-ASCII survive encoding)
    out = result.text.encode("utf-8")
    head, tail = text[: spans[0][0]].encode(), text[spans[-1][1] :].encode()
    assert out.startswith(head) and out.endswith(tail) and len(out) >= len(head) + len(tail)
    assert result.original == text and len(result.replacements) == len(check_spans(text, spans))


def test_spans_at_start_and_end_and_special_strings_stay_text(pipe):
    text = "<|mask|> héllo\r\nwörld <|endoftext|>\r\n"
    for spans in ([(0, 3)], [(len(text) - 4, len(text))], [(0, 0)], [(len(text), len(text))], [(0, len(text))]):
        r = edit_text(pipe, text, spans=spans, **FAST)
        assert outside_matches(text, spans, r.text), spans
    # the literal "<|mask|>" in the context was not turned into a mask: it is still in the output
    r = edit_text(pipe, text, spans=[(9, 14)], **FAST)
    assert r.text.startswith("<|mask|> ") and r.text.endswith("wörld <|endoftext|>\r\n")


def test_markers_and_lines(pipe):
    r = edit_text(pipe, "keep <<<this>>> and <<<that>>> too", **FAST)
    assert r.original == "keep this and that too"
    assert r.spans == [(5, 9), (14, 18)]
    assert outside_matches(r.original, r.spans, r.text)
    assert "<<<" not in r.text and ">>>" not in r.text
    text = "one\r\ntwo\r\nthree\r\n"
    assert line_span(text, "2") == (5, 8)
    assert line_span(text, "2-3") == (5, 15)
    r = edit_text(pipe, text, lines=["2"], **FAST)
    assert r.text.startswith("one\r\n") and r.text.endswith("\r\nthree\r\n")


# --- length: pad absorption, fixed, search ------------------------------------------------------------

def test_pad_absorption_lets_a_span_shrink_to_nothing(pipe, prefer):
    text = "alpha beta gamma"
    prefer(pipe.config.eos_id)  # a model that thinks nothing belongs in the span
    r = edit_text(pipe, text, spans=[(5, 10)], extra_tokens=3)
    assert r.text == "alpha gamma"
    assert r.lengths == [len(pipe.encode(" beta")) + 3]
    # with EOS forbidden (fixed length) the span is filled with exactly its budget of real tokens
    r = edit_text(pipe, text, spans=[(5, 10)], extra_tokens=0, length="fixed")
    assert r.text != "alpha gamma"
    assert len(pipe.tokenizer.encode(r.replacements[0])) >= 1


def test_span_grows_into_its_budget(pipe, prefer):
    word = pipe.encode(" return")
    assert len(word) == 1
    prefer(word[0])
    r = edit_text(pipe, "x = 1\ny = 2\n", spans=[(6, 11)], extra_tokens=4)
    n = len(pipe.encode("y = 2")) + 4
    assert r.replacements == [" return" * n]
    assert r.text == "x = 1\n" + " return" * n + "\n"


def test_length_search_picks_the_lowest_scored_candidate(pipe, monkeypatch):
    tail = len(pipe.encode(" tail"))
    for sign in (1, -1):  # prefer the shortest, then the longest candidate
        seen = []

        def fake_score(model, prefix, target, mc_samples=32, batch_size=16, generator=None):
            n = len(target) - tail  # tokens in the region (the target: region + the text after it)
            seen.append(n)
            return sign * n

        monkeypatch.setattr(fill_mod, "continuation_nll", fake_score)
        r = edit_text(pipe, "head body tail", spans=[(4, 9)], extra_tokens=4, length="search", **FAST)
        assert len(set(seen)) >= 3
        assert r.lengths == [min(seen) if sign == 1 else max(seen)]


def test_length_search_scores_the_region_and_a_bounded_stretch_after_it(pipe, monkeypatch):
    targets = []

    def fake_score(model, prefix, target, mc_samples=32, batch_size=16, generator=None):
        targets.append((len(prefix), len(target)))
        return 0.0

    monkeypatch.setattr(fill_mod, "continuation_nll", fake_score)
    long_tail = "\n".join(f"value_{i} = {i}" for i in range(60))
    r = edit_text(pipe, "head body " + long_tail, spans=[(5, 9)], extra_tokens=4, length="search", **FAST)
    assert len(pipe.encode(long_tail)) > 2 * fill_mod.SEARCH_SUFFIX_TOKENS and len(targets) >= 3
    # ties go to the first candidate: its target is its region + the bounded stretch, not the whole tail
    assert targets[0][1] == r.lengths[0] + fill_mod.SEARCH_SUFFIX_TOKENS
    assert len({n for _, n in targets}) == len(targets)  # lengths differ by the region alone
    assert len({start for start, _ in targets}) == 1  # all scored given the same text before them


def test_length_search_denoises_its_candidates_in_one_batch_as_if_alone(pipe, monkeypatch):
    from unmask.decoding.denoise import denoise

    batches, filled = [], {}
    real = fill_mod.denoise_batch

    def spy(model, canvases, options, on_step=None, request_ids=None, prefix_store=None, banned=None):
        batches.append(len(canvases))
        outs = real(model, canvases, options, on_step, request_ids, prefix_store, banned=banned)
        for canvas, out in zip(canvases, outs):
            filled[tuple(canvas)] = (out.canvas, options)
        return outs

    monkeypatch.setattr(fill_mod, "denoise_batch", spy)
    events = []
    r = edit_text(pipe, "x = 1\ny = 2\nz = 3\n", spans=[(6, 11)], extra_tokens=4, length="search",
                  on_step=events.append, **FAST)
    assert batches == [len(filled)] and len(filled) >= 3  # every candidate in the one batch
    for canvas, (out, options) in filled.items():  # greedy: the same tokens as denoising each alone
        assert denoise(pipe.model, list(canvas), options).canvas == out
    assert {e.request_id for e in events} == {"edit"}  # one canvas streamed, under the edit's id
    assert r.text.startswith("x = 1\n") and r.text.endswith("\nz = 3\n")


# --- instruction mode ---------------------------------------------------------------------------------

def test_instruction_mode_renoises_a_strength_fraction(pipe, monkeypatch):
    canvases = []
    real = fill_mod.denoise_batch

    def spy(model, batch, options, on_step=None, request_ids=None, prefix_store=None, banned=None):
        canvases.extend(list(c) for c in batch)
        return real(model, batch, options, on_step, request_ids, prefix_store, banned=banned)

    monkeypatch.setattr(fill_mod, "denoise_batch", spy)
    text = "def add(a, b):\n    return a + b\n"
    n = len(pipe.encode(text))
    mask = pipe.config.mask_id
    for strength in (0.0, 0.5, 1.0):
        r = edit_text(pipe, text, mode="instruction", instruction="add a docstring", strength=strength,
                      extra_tokens=2, seed=1, **FAST)
        assert canvases[-1].count(mask) == round(strength * n) + 2
        prompt = pipe.encode(pipe.tokenizer.apply_chat_template([{"role": "user", "content": "add a docstring"}]))
        assert canvases[-1][: len(prompt)] == prompt
        if strength == 0.0:  # nothing re-noised: the original stays, only the room after it is written
            assert r.text.startswith(text)


def test_instruction_mode_keeps_text_outside_spans(pipe):
    text = "x = 1\r\ny = 2\r\nz = 3\r\n"
    r = edit_text(pipe, text, mode="instruction", instruction="change y", strength=1.0, lines=["2"], **FAST)
    assert r.text.startswith("x = 1\r\n") and r.text.endswith("\r\nz = 3\r\n")


# --- streaming ----------------------------------------------------------------------------------------

def test_edit_streams_step_events(pipe):
    events = []
    r = edit_text(pipe, "a <<<b c d>>> e", on_step=events.append, request_id="r1")
    assert len(events) >= 2 and events[-1].done and not any(e.done for e in events[:-1])
    assert all(e.request_id == "r1" for e in events)
    steps = [e.step for e in events[:-1]]
    assert steps == sorted(steps) and steps[-1] == r.steps
    assert events[-1].result.text == r.text
    assert events[0].canvas.count(pipe.config.mask_id) > events[-2].canvas.count(pipe.config.mask_id) == 0


# --- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,kw,msg", [
    ("abc", dict(spans=["0:10"]), "out of range"),
    ("abcdef", dict(spans=["0:4", "2:5"]), "overlap"),
    ("abcdef", dict(spans=["1:1", "1:1"]), "overlap"),
    ("", dict(spans=["0:0"]), "empty"),
    ("abc", dict(spans=["2:1"]), "START is after END"),
    ("abc", dict(spans=["x:1"]), "START:END"),
    ("abc", dict(lines=["3-1"]), "line range"),
    ("a\nb", dict(lines=["2-5"]), "out of range"),
    ("abc", dict(), "no region"),
    ("a <<<b c", dict(), "never closed"),
    ("a b>>> c", dict(), "no region"),  # a `>>>` alone is text (doctests), not a marker
    ("a <<<b <<<c>>> d>>>", dict(), "nest"),
    ("abc", dict(mode="nope"), "mode"),
    ("abc", dict(mode="instruction"), "instruction"),
    ("abc", dict(spans=["0:1"], length="longest"), "length"),
    ("abc", dict(spans=["0:1"], stepz=3), "unknown option"),
    ("abc", dict(spans=["0:1"], extra_tokens=-2), "extra_tokens must be >= 0"),
    ("abc", dict(mode="auto", neighbors=-1), "neighbors must be >= 0"),
    ("abc", dict(mode="auto", probe_stride=0), "probe_stride must be >= 1"),
    ("abc", dict(mode="auto", flag_below=1.5), "--flag-below"),
    # auto mode's threshold is flag_below; remask_below is self-correction's, so an edit refuses the old name
    ("abc", dict(mode="auto", remask_below=0.2), "flag_below"),
    # `threshold` is the decoder's, as in pipe.generate(), in every mode: never silently auto mode's
    ("abc", dict(spans=["0:1"], threshold=1.5), r"threshold must be in \(0, 1\]"),
])
def test_bad_requests_give_clear_errors(pipe, text, kw, msg):
    with pytest.raises(UnmaskError, match=msg):
        edit_text(pipe, text, **kw)


def test_edit_needs_a_diffusion_model(tokenizer):
    ar = Pipeline(tiny_model(tokenizer, attention="causal"), tokenizer)
    with pytest.raises(EditError, match="causal"):
        ar.edit("abc", spans=["0:1"])


def test_extract_markers_positions():
    assert extract_markers("<<<>>>x<<<y>>>") == ("xy", [(0, 0), (1, 2)])


# --- files and the CLI --------------------------------------------------------------------------------

def test_in_place_write_is_atomic(tmp_path, monkeypatch):
    f = tmp_path / "code.py"
    original = b"print('hi')\r\n"
    f.write_bytes(original)
    real_replace = os.replace

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("unmask.io.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_in_place(f, "print('bye')\r\n", backup=False)
    assert f.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.py"]  # no temp file left behind
    # a failure after the backup was written: the original is still intact
    calls = []

    def fail_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("crash mid-way")
        real_replace(src, dst)

    monkeypatch.setattr("unmask.io.os.replace", fail_second)
    with pytest.raises(OSError, match="crash mid-way"):
        write_in_place(f, "print('bye')\r\n", backup=True)
    assert f.read_bytes() == original
    assert (tmp_path / "code.py.bak").read_bytes() == original
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_edit_diff_in_place_and_errors(saved_model_dir, tmp_path, capsys, monkeypatch):
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    f = tmp_path / "code.py"
    original = "def f(x):\r\n    return x + 1\r\n\r\nprint(f(2))\r\n"
    f.write_bytes(original.encode())
    model = str(saved_model_dir)
    fast = ["--policy", "fixed", "--steps", "2"]

    assert main(["edit", str(f), "-m", model, "--lines", "2", "--diff", *fast]) == 0
    diff = capsys.readouterr().out
    assert diff.startswith("--- a/code.py\n+++ b/code.py\n@@ ")
    assert "-    return x + 1\r\n" in diff

    assert main(["edit", str(f), "-m", model, "--span", "0:3", *fast]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("(x):\r\n    return x + 1\r\n\r\nprint(f(2))\r\n")
    assert f.read_bytes() == original.encode()  # printing never touches the file

    assert main(["edit", str(f), "-m", model, "--lines", "2", "--in-place", *fast]) == 0
    new = f.read_bytes()
    assert new.startswith(b"def f(x):\r\n") and new.endswith(b"\r\n\r\nprint(f(2))\r\n")
    assert (tmp_path / "code.py.bak").read_bytes() == original.encode()

    # in-place failing mid-way through the CLI: original intact, no temp files, non-zero exit
    f.write_bytes(original.encode())
    (tmp_path / "code.py.bak").unlink()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("unmask.io.os.replace", boom)
    capsys.readouterr()
    assert main(["edit", str(f), "-m", model, "--lines", "2", "--in-place", "--no-backup", *fast]) == 2
    assert "cannot write it (disk full); the file is unchanged" in capsys.readouterr().err
    monkeypatch.undo()
    assert f.read_bytes() == original.encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.py"]

    capsys.readouterr()
    assert main(["edit", str(f), "-m", model, "--span", "3:99"]) == 2
    err = capsys.readouterr().err
    assert "out of range" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["edit", str(empty), "-m", model, "--span", "0:0"]) == 2
    assert "empty" in capsys.readouterr().err


def test_long_text_is_edited_through_a_context_window(pipe):
    line = "value = compute(alpha, beta)  # ünïcode\r\n"
    text = line * 60  # far more tokens than the 256-token context of the tiny model
    assert len(pipe.encode(text)) > 2 * pipe.config.max_seq_len
    mid = len(line) * 30
    spans = [(mid + 8, mid + 15)]
    r = edit_text(pipe, text, spans=spans, **FAST)
    assert outside_matches(text, spans, r.text)
    r = edit_text(pipe, text, mode="auto", max_rounds=1, max_fraction=0.01, probe_stride=4, **FAST)
    assert r.rounds == 1 and r.text != text
    for (s, e), new in zip(r.spans, r.replacements):  # the report describes exactly what changed
        assert text[s:e] != new
    with pytest.raises(EditError, match="more than"):
        edit_text(pipe, text, spans=[(0, len(text))], **FAST)


def test_single_span_and_line_specs(pipe):
    assert edit_text(pipe, "abcdef", spans=(1, 3), **FAST).spans == [(1, 3)]
    assert edit_text(pipe, "a\nb\nc", lines="2", **FAST).spans == [(2, 3)]
    with pytest.raises(EditError, match="bad span"):
        edit_text(pipe, "abc", spans=[5])


def test_cli_usage_errors_are_a_message_not_a_traceback(capsys):
    # typer's own (vendored) click exceptions must be caught like click's: exit 2, usage on stderr
    assert main(["edit", "x.py", "--neighbors", "abc"]) == 2
    assert "Invalid value for '--neighbors'" in capsys.readouterr().err
    assert main(["generate", "x", "--bogus"]) == 2
    assert "No such option: --bogus" in capsys.readouterr().err
    assert main(["edit"]) == 2
    assert "Missing argument" in capsys.readouterr().err


def test_unreadable_input_is_a_clear_error(saved_model_dir, tmp_path, capsys, monkeypatch):
    import io
    import sys

    import unmask.edit.files as files_mod

    model = str(saved_model_dir)
    assert main(["edit", str(tmp_path), "-m", model, "--lines", "1"]) == 2
    assert "is a directory" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n")))
    assert main(["edit", "-", "-m", model, "--lines", "1"]) == 2
    assert "stdin: not UTF-8 text (byte 3)" in capsys.readouterr().err
    f = tmp_path / "code.py"
    f.write_text("x = 1\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files_mod, "open", denied, raising=False)
    with pytest.raises(EditError, match="cannot read it"):
        files_mod.read_text_exact(f)


def test_in_place_writes_through_a_symlink(tmp_path):
    real = tmp_path / "real.py"
    real.write_text("x = 1\n")
    link = tmp_path / "link.py"
    link.symlink_to(real.name)
    bak = write_in_place(link, "x = 2\n")
    assert link.is_symlink() and real.read_text() == "x = 2\n"
    assert bak == tmp_path / "link.py.bak" and bak.read_text() == "x = 1\n"


def test_doctest_prompts_are_text_not_markers(pipe):
    text = 'def double(x):\n    """\n    >>> double(2)\n    4\n    """\n    return x * 2\n'
    r = edit_text(pipe, text, lines=["6"], **FAST)
    assert r.text.startswith(text[: text.index("    return")]) and r.spans == [line_span(text, "6")]
    r = edit_text(pipe, text.replace("return x * 2", "<<<return x * 2>>>"), **FAST)
    assert r.original == text and r.text.startswith(text[: text.index("    return") + 4])
    assert edit_text(pipe, text, mode="auto", max_rounds=1, **FAST).original == text


def test_diff_splits_lines_only_at_line_terminators():
    from unmask.edit import unified_diff

    before = 'a = 1\n\x0c\nc = "x\u2028y"\r\nd = 4'
    after = before.replace("d = 4", "d = 5")
    diff = unified_diff(before, after, "f.py")
    # one hunk line per real line; the form feed and U+2028 stay inside theirs
    assert diff.endswith(' \x0c\n c = "x\u2028y"\r\n-d = 4\n\\ No newline at end of file\n'
                         '+d = 5\n\\ No newline at end of file\n')
    assert "@@ -1,4 +1,4 @@" in diff and diff.count("No newline") == 2


def test_a_byte_order_mark_stays_outside_line_and_whole_text_regions(pipe):
    text = "\ufeffx = 1\r\ny = 2\r\n"
    assert line_span(text, "1") == (1, 6) and line_span(text, "2") == (8, 13)
    assert edit_text(pipe, text, lines=["1"], **FAST).text.startswith("\ufeff")
    r = edit_text(pipe, text, mode="instruction", instruction="rename x", strength=1.0, **FAST)
    assert r.text.startswith("\ufeff") and r.spans == [(1, len(text))]


def test_cli_flags_that_would_do_nothing_are_refused(saved_model_dir, tmp_path, capsys):
    f = tmp_path / "code.py"
    f.write_text("x = <<<FILL>>>\n")
    model = str(saved_model_dir)
    assert main(["edit", str(f), "-m", model, "--span", "0:1", "--no-backup"]) == 2
    assert "--no-backup only applies with --in-place" in capsys.readouterr().err
    assert main(["infill", str(f), "-m", model, "--no-backup"]) == 2
    assert main(["infill", str(f), "-m", model, "--in-place", "--middle-only"]) == 2
    assert "--middle-only" in capsys.readouterr().err
    assert f.read_text() == "x = <<<FILL>>>\n" and not (tmp_path / "code.py.bak").exists()


def test_cli_stream_spinner_stops_when_the_edit_fails(saved_model_dir, tmp_path, capsys, monkeypatch):
    import unmask.cli.edit as cli_edit

    calls = []

    class Status:
        def start(self):
            calls.append("start")

        def update(self, *args):
            pass

        def stop(self):
            calls.append("stop")

        def __enter__(self):  # the model loader's spinner
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(cli_edit.console, "status", lambda *a, **k: Status())
    f = tmp_path / "long.py"
    f.write_text("value = compute(alpha, beta)\n" * 200)  # far more than the tiny model's context
    assert main(["edit", str(f), "-m", str(saved_model_dir), "--lines", "1-200", "--stream"]) == 2
    assert "more than" in capsys.readouterr().err
    assert calls == ["start", "stop"]


def test_cli_in_place_leaves_an_unchanged_file_alone(saved_model_dir, tmp_path, capsys, monkeypatch):
    """An edit whose result equals the file writes nothing: same mtime, no FILE.bak."""
    import dataclasses
    import os

    from unmask.pipeline import Pipeline

    work = tmp_path / "work"
    work.mkdir()
    f = work / "code.py"
    f.write_text("def f(x):\n    return x + 1\n")
    os.utime(f, (1_000_000, 1_000_000))
    real_edit = Pipeline.edit

    def same_text(self, text, **kwargs):
        return dataclasses.replace(real_edit(self, text, **kwargs), text=text)

    monkeypatch.setattr(Pipeline, "edit", same_text)
    args = ["edit", str(f), "-m", str(saved_model_dir), "--lines", "2", "--in-place", "--policy", "fixed", "--steps", "2"]
    assert main(args) == 0
    assert "unchanged: nothing written" in " ".join(capsys.readouterr().err.split())
    assert f.stat().st_mtime == 1_000_000
    assert sorted(p.name for p in work.iterdir()) == ["code.py"]


def test_git_conflict_markers_are_named_not_mistaken_for_edit_markers():
    text = "x = 1\r\n<<<<<<< HEAD\r\ny = 2\r\n=======\r\ny = 3\r\n>>>>>>> feature\r\n"
    with pytest.raises(EditError, match=r"line 2 is a git conflict marker \('<<<<<<< HEAD'\)"):
        extract_markers(text)
    # seven '<' inside a line are not a conflict marker
    with pytest.raises(EditError, match="never closed"):
        extract_markers("s = '<<<<<<<'\n")
