"""`unmask bench train` and `unmask bench serve` run with no options (`bench decode`: test_decode_bench.py)."""

from __future__ import annotations

import torch

import unmask.cli.serve as serve_cli
from conftest import tiny_model
from unmask.cli.main import main
from unmask.pipeline import Pipeline
from unmask.train.bench import default_run


def test_bench_train_with_no_options(capsys):
    """On a CPU the run is the tiny shape (the 34M one takes minutes a step there)."""
    assert main(["bench", "train"]) == 0
    out = capsys.readouterr().out
    shape, batch = default_run(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert out.startswith(shape) and f"batch {batch} ×" in out and "tokens/s" in out


def test_bench_train_defaults_to_the_calibration_shape_on_a_gpu():
    assert default_run(torch.device("cuda")) == ("small-34m", 64)
    assert default_run(torch.device("cpu")) == ("tiny", 8)


def test_bench_serve_with_no_options(capsys, monkeypatch, tokenizer):
    """The no-option command on the fast path: the default model stood in for by a tiny one, each 10 s load
    shortened to a fraction of a second."""
    loaded = []

    def load(model, device=None, dtype=None, quantize=None):
        loaded.append((model, device, dtype))
        return Pipeline(tiny_model(tokenizer), tokenizer)

    real = serve_cli._load_clients
    monkeypatch.setattr(serve_cli, "load_pipeline", load)
    monkeypatch.setattr(serve_cli, "_load_clients", lambda url, clients, seconds, body: real(url, clients, 0.3, body))
    assert main(["bench", "serve"]) == 0
    assert loaded == [(None, None, None)]  # the default model
    out = capsys.readouterr().out
    assert "8 clients" in out and "batching speed-up" in out

