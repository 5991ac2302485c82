import json

import pytest
import torch

import unmask
from conftest import tiny_model
from unmask.model.checkpoints import CheckpointError, save_model
from unmask.pipeline import Pipeline


def test_save_load_round_trips_logits_exactly(saved_model_dir, tiny_pipeline):
    pipe = unmask.load(saved_model_dir, device="cpu")
    x = torch.randint(10, 500, (2, 30))
    with torch.no_grad():
        assert torch.equal(pipe.model(x), tiny_pipeline.model(x))
    assert pipe.tokenizer.encode("def f(x):\n    return x") == tiny_pipeline.tokenizer.encode("def f(x):\n    return x")


def test_sharded_save_writes_index_and_loads(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    save_model(model, tmp_path / "m", max_shard_bytes=50_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    Pipeline(model, tokenizer).tokenizer.save(tmp_path / "m")
    pipe = unmask.load(tmp_path / "m", device="cpu")
    x = torch.randint(10, 500, (1, 12))
    with torch.no_grad():
        assert torch.equal(pipe.model(x), model(x))


def test_bf16_load(saved_model_dir):
    pipe = unmask.load(saved_model_dir, device="cpu", dtype="bfloat16")
    assert pipe.model.output.weight.dtype == torch.bfloat16


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        unmask.load(tmp_path / "nope")


def test_config_that_does_not_match_weights(saved_model_dir):
    cfg = json.loads((saved_model_dir / "config.json").read_text())
    cfg["dim"] = 128
    (saved_model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match the weights"):
        unmask.load(saved_model_dir)


def test_corrupt_shard(saved_model_dir):
    f = saved_model_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        unmask.load(saved_model_dir)


def test_missing_shard(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    save_model(model, tmp_path / "m", max_shard_bytes=50_000)
    Pipeline(model, tokenizer).tokenizer.save(tmp_path / "m")
    sorted((tmp_path / "m").glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        unmask.load(tmp_path / "m")


def test_mask_id_outside_vocab(saved_model_dir):
    cfg = json.loads((saved_model_dir / "config.json").read_text())
    cfg["mask_id"] = cfg["vocab_size"] + 5
    (saved_model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mask_id .* outside the vocabulary"):
        unmask.load(saved_model_dir)


def test_bad_device_is_a_clear_error(saved_model_dir):
    from unmask.errors import UnmaskError

    with pytest.raises(UnmaskError, match="unknown device 'gpu0'"):
        unmask.load(saved_model_dir, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UnmaskError, match="CUDA is not available"):
            unmask.load(saved_model_dir, device="cuda")
    assert unmask.load(saved_model_dir, device="").device.type in ("cpu", "cuda")  # "" = the default


def test_a_failed_resave_keeps_the_previous_weights(tmp_path, tokenizer, monkeypatch):
    """Saving over a folder with another sharding: the old files go only after the new ones are written."""
    from unmask.model.checkpoints import load_model

    old, new = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=1)
    save_model(old, tmp_path, max_shard_bytes=50_000)  # sharded
    assert (tmp_path / "model.safetensors.index.json").exists()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("unmask.model.weights.save_file", disk_full)
    with pytest.raises(OSError):
        save_model(new, tmp_path)  # one file this time
    monkeypatch.undo()
    x = torch.randint(0, old.config.vocab_size, (1, 12))
    assert torch.equal(load_model(tmp_path)(x), old(x))
    save_model(new, tmp_path)  # and a save that succeeds leaves only its own files
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    assert torch.equal(load_model(tmp_path)(x), new(x))
