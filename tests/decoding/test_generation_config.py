"""A model folder's generation_config.json: its recommended decoding, used when a call gives no options."""

import json

import pytest

from unmask.decoding.options import DecodeOptions, OptionsError, generation_defaults
from unmask.pipeline import load


def test_defaults_round_trip_and_drive_calls_without_options(tmp_path, tiny_pipeline):
    tiny_pipeline.defaults = DecodeOptions(temperature=0.7, top_p=0.9, frequency_penalty=0.3, threshold=0.8)
    tiny_pipeline.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert saved == {"temperature": 0.7, "top_p": 0.9, "frequency_penalty": 0.3, "threshold": 0.8, "do_sample": True}
    pipe = load(tmp_path / "m")
    assert (pipe.defaults.temperature, pipe.defaults.frequency_penalty, pipe.defaults.threshold) == (0.7, 0.3, 0.8)
    implicit = pipe.generate("def f(x):", max_new_tokens=16, seed=3)
    explicit = pipe.generate("def f(x):", DecodeOptions(max_new_tokens=16, seed=3, temperature=0.7, top_p=0.9,
                                                        frequency_penalty=0.3, threshold=0.8))
    greedy = pipe.generate("def f(x):", DecodeOptions(max_new_tokens=16, seed=3))
    assert implicit.tokens == explicit.tokens != greedy.tokens


def test_do_sample_false_means_greedy_and_bad_files_are_named(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 64, "eos_token_id": 7}))
    d = generation_defaults(tmp_path)
    assert d.temperature == 0 and d.top_p is None and d.max_new_tokens == 64
    assert generation_defaults(tmp_path / "nowhere") == DecodeOptions()
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(OptionsError, match="generation_config.json"):
        generation_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(OptionsError, match="generation_config.json.*temperature"):
        generation_defaults(tmp_path)


def test_generate_command_uses_the_models_defaults(tmp_path, capsys, tiny_pipeline):
    from unmask.cli.main import main

    tiny_pipeline.defaults = DecodeOptions(temperature=0.9, seed=None)
    tiny_pipeline.save(tmp_path / "m")
    outs = set()
    for _ in range(2):  # unseeded sampling from the model's defaults: two runs differ
        assert main(["generate", "def f(x):", "-m", str(tmp_path / "m"), "-n", "24"]) == 0
        outs.add(capsys.readouterr().out)
    assert len(outs) == 2
    # a flag overrides the file: greedy runs agree
    greedy = set()
    for _ in range(2):
        assert main(["generate", "def f(x):", "-m", str(tmp_path / "m"), "-n", "24", "--temperature", "0"]) == 0
        greedy.add(capsys.readouterr().out)
    assert len(greedy) == 1


@pytest.mark.parametrize("argv,sampled", [
    (["chat", "{m}", "--message", "hi", "-n", "16"], True),
    (["edit", "{f}", "-m", "{m}", "--span", "0:5"], True),
    (["infill", "-m", "{m}", "--prefix", "def f(", "--suffix", "):\n", "-n", "8"], True),
    (["eval", "humaneval", "{m}", "--limit", "1", "-n", "16"], False),  # a benchmark: greedy unless asked
])
def test_decoding_commands_use_the_models_defaults(tmp_path, capsys, tiny_pipeline, monkeypatch, argv, sampled):
    from unmask.cli.main import main
    from unmask.decoding.engine import Engine

    tiny_pipeline.defaults = DecodeOptions(temperature=0.6, threshold=0.77, frequency_penalty=0.3)
    tiny_pipeline.save(tmp_path / "m")
    (tmp_path / "f.py").write_text("x = 1\ny = 2\n")
    seen = []
    real = Engine.submit_canvas

    def spy(self, canvas, options, *args, **kwargs):
        seen.append(options)
        return real(self, canvas, options, *args, **kwargs)

    monkeypatch.setattr(Engine, "submit_canvas", spy)
    args = [a.format(m=tmp_path / "m", f=tmp_path / "f.py") for a in argv]
    assert main(args) == 0
    assert seen and all(o.threshold == 0.77 and o.frequency_penalty == 0.3 for o in seen)
    assert all(o.temperature == (0.6 if sampled else 0.0) for o in seen)
    seen.clear()
    assert main(args + ["--threshold", "0.5"]) == 0  # a flag beats the file
    assert seen and all(o.threshold == 0.5 for o in seen)
    capsys.readouterr()


def test_demo_samples_as_the_model_recommends(tmp_path, capsys, tiny_pipeline, monkeypatch):
    from unmask.cli.main import main
    from unmask.decoding.engine import Engine

    tiny_pipeline.defaults = DecodeOptions(temperature=0.6, top_p=0.9, frequency_penalty=0.3, threshold=0.77)
    tiny_pipeline.save(tmp_path / "m")
    seen = []
    real = Engine.submit_canvas
    monkeypatch.setattr(Engine, "submit_canvas", lambda self, canvas, options, *a, **k: (
        seen.append(options), real(self, canvas, options, *a, **k))[1])
    assert main(["demo", "-m", str(tmp_path / "m"), "-n", "16", "--delay", "0"]) == 0
    [o] = seen
    assert (o.temperature, o.top_p, o.frequency_penalty) == (0.6, 0.9, 0.3)
    assert o.threshold == 0.77  # the model's own threshold (and policy)
    assert (o.cache, o.seed) == ("dual", 0)  # the demo's own: fast, repeatable
    assert "tokens/s" in capsys.readouterr().err  # the figures go to stderr, the completion to stdout


def test_demo_refuses_a_negative_delay(tmp_path, capsys, tiny_pipeline):
    from unmask.cli.main import main

    tiny_pipeline.save(tmp_path / "m")
    assert main(["demo", "-m", str(tmp_path / "m"), "-n", "4", "--delay", "-1"]) == 2
    assert "--delay" in capsys.readouterr().err


def test_steps_flag_sets_the_step_budget(tmp_path, capsys, tiny_pipeline):
    """--steps without --policy decodes with the fixed policy (the default threshold policy ignored it)."""
    from unmask.cli.main import main

    tiny_pipeline.defaults = DecodeOptions()  # policy threshold
    tiny_pipeline.save(tmp_path / "m")
    assert main(["generate", "def f(x):", "-m", str(tmp_path / "m"), "-n", "16", "--block-length", "16",
                 "--steps", "4"]) == 0
    assert "· 4 steps · NFE 4 ·" in capsys.readouterr().err
    assert main(["generate", "def f(x):", "-m", str(tmp_path / "m"), "-n", "16", "--block-length", "16",
                 "--steps", "4", "--policy", "threshold", "--threshold", "1.0"]) == 0
    assert "· 4 steps" not in capsys.readouterr().err  # an explicit --policy still wins
