"""`unmask bench decode` runs end to end on a random tiny model and prints every decoder's row."""

import pytest

from unmask.cli.main import main


def test_bench_decode_prints_all_decoders(capsys):
    rc = main(["bench", "decode", "--shape", "tiny", "--new-tokens", "16", "--block-length", "8",
               "--prompt-len", "8", "--compare", "ar"])
    assert rc == 0
    text = capsys.readouterr().out
    names = ["reference sampler", "engine, no cache", "prefix cache", "dual cache", "threshold 0.9", "AR twin"]
    lines = {n: next(line for line in text.splitlines() if n in line) for n in names}
    for name, line in lines.items():
        cells = [c.strip() for c in line.split("│") if c.strip()]
        assert float(cells[1]) > 0  # ms / step
        assert int(cells[2]) >= 2  # NFE: at least one forward per block (AR: one per token)
    ref = [c.strip() for c in lines["reference sampler"].split("│") if c.strip()]
    assert ref[2] == "16" and ref[3] == "1.00"  # one token per step, one forward per step


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
def test_bench_decode_runs_with_no_options(capsys):
    """The tiny shape's context (256) is widened to the run's prompt + new tokens (64 + 256)."""
    assert main(["bench", "decode"]) == 0
    out = capsys.readouterr().out
    assert "256 new tokens" in out and "threshold 0.9 + dual cache" in out


def test_bench_decode_leftmost_policy_row(capsys):
    assert main(["bench", "decode", "-n", "16", "--block-length", "8", "--policy", "leftmost"]) == 0
    assert "leftmost 0.9 + dual cache" in capsys.readouterr().out
