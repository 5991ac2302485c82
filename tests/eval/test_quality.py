import json

import pytest

from unmask.eval.quality import (body_parses, function_body, function_prompts, has_degenerate_repetition)

SOURCE = '''
def add(a, b):
    """Add two numbers."""
    return a + b


class K:
    def method(self, x):
        """Double x."""
        y = x * 2
        return y


def nodoc(x):
    return x
'''


def test_function_prompts_take_signature_and_docstring():
    prompts = function_prompts([SOURCE], limit=10)
    heads = sorted(p.prompt for p in prompts)
    assert heads == ['def add(a, b):\n    """Add two numbers."""\n', 'def method(self, x):\n    """Double x."""\n']
    method = next(p for p in prompts if "method" in p.prompt)
    assert method.body == "    y = x * 2\n    return y\n"


def test_repetition_detector():
    assert has_degenerate_repetition([1, 2, 3, 4] * 4)
    assert not has_degenerate_repetition([1, 2, 3, 4] * 3)
    assert not has_degenerate_repetition(list(range(40)))


def test_parse_rate_cuts_at_function_end_and_rejects_empty_bodies():
    prompt = 'def f(x):\n    """Doc."""\n'
    assert body_parses(prompt, "    return x\nprint(f(\n")  # the broken line is outside the function
    assert not body_parses(prompt, "    return (x\n")
    assert not body_parses(prompt, "\n# nothing\n")
    assert function_body("    a = 1\n\n    return a\nb = 2\n") == "    a = 1\n\n    return a\n"
    # out of tokens mid-line: judged on the finished lines only, which must still parse
    assert function_body("    a = 1\n    return (a +") == "    a = 1\n"
    assert body_parses(prompt, "    a = 1\n    return (a +")
    assert not body_parses(prompt, "    a = (1\n    return a")
    assert not body_parses(prompt, "    return (a +")  # nothing finished: an empty body


def test_speed_quality_command_prints_table_plot_and_json(tmp_path, capsys, tokenizer, saved_model_dir):
    from conftest import tiny_model
    from unmask.cli.main import main
    from unmask.pipeline import Pipeline

    twin = tmp_path / "twin"
    Pipeline(tiny_model(tokenizer, attention="causal"), tokenizer).save(twin)
    code = tmp_path / "held_out.py"
    code.write_text(SOURCE)
    plot, report = tmp_path / "sq.png", tmp_path / "sq.json"
    rc = main([str(a) for a in ["eval", "speed-quality", saved_model_dir, twin, "--data", code, "--ar-model", twin,
                                "--steps", "8", "--thresholds", "0.9", "-n", "16", "--block-length", "8",
                                "--prompts", "2", "--elbo-tokens", "0", "--temperature", "0.8", "--top-p", "0.9",
                                "--plot", plot, "--json", report]])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "top-p 0.9" in " ".join(out.split())  # the title names the sampling (rich may wrap it)
    rows = json.loads(report.read_text())
    assert [(r["model"], r["setting"]) for r in rows] == [
        (str(saved_model_dir), "steps=8"), (str(saved_model_dir), "τ=0.9"), (str(twin), "steps=8"), (str(twin), "τ=0.9")]
    diffusion_fixed = rows[0]
    assert diffusion_fixed["samples"] == 2 and 0 <= diffusion_fixed["parse_rate"] <= 1
    assert diffusion_fixed["tokens_per_step"] >= 1.9  # 16 tokens in at most 8 steps (this seeded model writes no EOS here)
    assert rows[2]["tokens_per_step"] == pytest.approx(1.0)  # the AR twin: one token per forward
    assert all(r["gen_bpb"] > 0 for r in rows)
    assert plot.stat().st_size > 0


@pytest.mark.parametrize("steps,thresholds", [("8,x", "0.9"), ("8", "0.9;0.7"), ("", "")])
def test_speed_quality_bad_budgets_are_usage_errors(tmp_path, capsys, saved_model_dir, steps, thresholds):
    """A typo in a list was a ValueError traceback; empty lists printed an empty table and plot."""
    from unmask.cli.main import main

    code = tmp_path / "held_out.py"
    code.write_text(SOURCE)
    rc = main([str(a) for a in ["eval", "speed-quality", saved_model_dir, "--data", code, "--steps", steps,
                                "--thresholds", thresholds, "--plot", tmp_path / "sq.png"]])
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err and ("--steps" in err or "--thresholds" in err), err
    assert not (tmp_path / "sq.png").exists()
