"""Infilling: the model picks the middle's length within its budget; prefix and suffix stay verbatim;
`unmask infill` and `unmask eval infill` on tiny models."""

from __future__ import annotations

import pytest

from conftest import tiny_model
from unmask.cli.main import main
from unmask.edit import EditError, infill_text
from unmask.eval.infill import make_samples, run_infill_eval, score
from unmask.pipeline import Pipeline

FAST = dict(policy="fixed", steps=2)


@pytest.fixture(scope="module")
def pipe(tokenizer) -> Pipeline:
    return Pipeline(tiny_model(tokenizer, seed=5), tokenizer)


def test_infill_keeps_prefix_and_suffix_and_respects_the_budget(pipe):
    prefix, suffix = "def f(x):\r\n    ", "\r\n    return y  # é\r\n"
    for n in (1, 5, 12):
        r = infill_text(pipe, prefix, suffix, max_new_tokens=n, **FAST)
        assert r.text == prefix + r.middle + suffix
        assert len(pipe.tokenizer.encode(r.middle)) <= n or len(r.middle) <= 4 * n  # bytes split over tokens
        assert r.lengths == [n]
    assert infill_text(pipe, "", "tail", max_new_tokens=3, **FAST).text.endswith("tail")
    assert infill_text(pipe, "head", "", max_new_tokens=3, **FAST).text.startswith("head")


def test_infill_length_is_the_models_choice(pipe, prefer):
    eos = pipe.config.eos_id
    prefer(eos)
    r = infill_text(pipe, "a = 1\n", "\nb = 2\n", max_new_tokens=8)
    assert r.middle == ""  # nothing belongs here: the budget was absorbed
    # fixed length forbids EOS: exactly the budget is written
    r = infill_text(pipe, "a = 1\n", "\nb = 2\n", max_new_tokens=3, length="fixed", **FAST)
    assert r.middle != "" and r.lengths == [3]


def test_infill_search_scores_geometric_candidates(pipe, monkeypatch):
    import unmask.edit.fill as fill_mod

    seen = []

    def fake_score(model, prefix, target, mc_samples=32, batch_size=16, generator=None):
        seen.append(len(target))
        return -len(target)  # the longest fill wins

    monkeypatch.setattr(fill_mod, "continuation_nll", fake_score)
    r = infill_text(pipe, "x", "y", max_new_tokens=10, length="search", **FAST)
    assert len(seen) == 6  # 1, 2, 3, 5, 7(.6 -> 8), 10
    assert r.lengths == [10]


def test_infill_errors(pipe, tokenizer):
    with pytest.raises(EditError, match="max_new_tokens"):
        infill_text(pipe, "a", "b", max_new_tokens=0)
    with pytest.raises(EditError, match="length"):
        infill_text(pipe, "a", "b", length="guess")
    ar = Pipeline(tiny_model(tokenizer, attention="causal"), tokenizer)
    with pytest.raises(EditError, match="causal"):
        ar.infill("a", "b")


def test_infill_streams_events(pipe):
    events = []
    r = pipe.infill("x = ", "\n", max_new_tokens=4, on_step=events.append)
    assert events[-1].done and events[-1].result.text == r.middle
    assert sum(e.done for e in events) == 1


def test_cli_infill(saved_model_dir, tmp_path, capsys):
    f = tmp_path / "gap.py"
    f.write_bytes(b"def f():\r\n    <<<FILL>>>\r\n")
    assert main(["infill", str(f), "-m", str(saved_model_dir), "-n", "4", "--policy", "fixed", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def f():\r\n    ") and out.endswith("\r\n") and "<<<FILL>>>" not in out
    assert main(["infill", "-m", str(saved_model_dir), "--prefix", "a", "--suffix", "b", "--middle-only",
                 "-n", "2"]) == 0
    f.write_text("no marker")
    capsys.readouterr()
    assert main(["infill", str(f), "-m", str(saved_model_dir)]) == 2
    assert "exactly once" in capsys.readouterr().err


def test_eval_infill_samples_and_scores(pipe, tokenizer, capsys, saved_model_dir, tmp_path):
    samples = make_samples("json", 3, seed=1)
    assert len(samples) == 3
    for s in samples:
        assert s.middle.strip() == s.middle and 4 <= len(s.middle) <= 80
        assert s.prefix.endswith((" ", "\n", "\t")) or s.prefix == "" or s.prefix[-1].isspace()
    assert make_samples("json", 3, seed=1) == samples  # seeded
    assert score(tokenizer, "x = 1\nmore", "x = 1") == (True, 1.0)
    exact, acc = score(tokenizer, "x = 2", "x = 1")
    assert not exact and 0 < acc < 1
    ar = Pipeline(tiny_model(tokenizer, attention="causal"), tokenizer)
    rows = run_infill_eval(pipe, samples[:2], ar_pipe=ar, lengths=["oracle"], max_new_tokens=4)
    assert [r.system for r in rows] == ["diffusion, oracle length", "AR twin, prefix only"]
    assert all(r.n == 2 and 0 <= r.exact <= r.token_accuracy <= 1 for r in rows)
    with pytest.raises(EditError, match="leaves no context"):  # the prefix slice [-0:] would keep it all
        run_infill_eval(pipe, samples[:1], ar_pipe=ar, lengths=[], max_new_tokens=ar.config.max_seq_len)
    # the CLI prints the table
    ar_dir = tmp_path / "ar"
    ar.save(ar_dir)
    assert main(["eval", "infill", str(saved_model_dir), "--ar-model", str(ar_dir), "--data", "json",
                 "--limit", "2", "--length", "oracle", "--max-new-tokens", "4", "--policy", "fixed", "--steps",
                 "2"]) == 0
    out = capsys.readouterr().out
    assert "exact match" in out and "AR twin" in out
    assert main(["eval", "infill", str(saved_model_dir), "--data", "/nonexistent/dir"]) == 2


def test_eval_infill_samples_distinct_lines(tmp_path):
    """--limit beyond the data's usable lines: each line once (it was drawn again and again and counted)."""
    from unmask.edit.spans import EditError

    (tmp_path / "a.py").write_text("def f(x):\n    y = x + 1\n    return y\n")
    samples = make_samples(str(tmp_path), 10)
    assert sorted(s.middle for s in samples) == ["def f(x):", "return y", "y = x + 1"]
    (tmp_path / "a.py").write_text("x\n\n")
    with pytest.raises(EditError, match="no usable line"):
        make_samples(str(tmp_path), 5)


def test_eval_infill_steps_set_the_step_budget(saved_model_dir, monkeypatch, capsys):
    """--steps without --policy: the fixed policy takes it (under the threshold default it was ignored)."""
    from unmask.eval import infill

    seen = []
    real = infill.run_infill_eval
    monkeypatch.setattr(infill, "run_infill_eval", lambda *a, **kw: seen.append(kw["options"]) or real(*a, **kw))
    assert main(["eval", "infill", str(saved_model_dir), "--data", "json", "--limit", "1", "--length", "oracle",
                 "--steps", "2"]) == 0
    assert seen[0].policy == "fixed" and seen[0].steps == 2
