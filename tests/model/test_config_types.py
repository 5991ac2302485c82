"""A config.json whose field has the wrong JSON type is one line naming the field and the type it needs."""

from __future__ import annotations

import json

import pytest

from unmask.cli.main import main


@pytest.mark.parametrize("field,value,needs", [("n_layers", 3.5, "expected int, got 3.5"),
                                               ("dim", "128", 'expected int, got "128"'),
                                               ("qk_norm", 1, "expected bool, got 1"),
                                               ("n_kv_heads", "2", 'expected int (or null), got "2"')])
@pytest.mark.parametrize("command", ["generate", "serve"])
def test_a_config_field_of_the_wrong_type_is_named_in_one_line(saved_model_dir, capsys, field, value, needs, command):
    config = saved_model_dir / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), field: value}))
    argv = ["generate", "def f():", "--model", str(saved_model_dir)] if command == "generate" else \
        ["serve", str(saved_model_dir), "--port", "1"]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert f"config field {field}: {needs}" in err, err


def test_json_numbers_that_fit_are_taken(saved_model_dir):
    from unmask.model.config import ModelConfig

    config = {k: v for k, v in json.loads((saved_model_dir / "config.json").read_text()).items()
              if k not in ("model_type", "architectures", "torch_dtype")}
    loaded = ModelConfig.from_dict({**config, "rope_theta": 10000, "n_kv_heads": None, "bos_id": None})
    assert loaded.rope_theta == 10000 and loaded.n_kv_heads == loaded.n_heads
