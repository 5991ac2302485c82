import pytest
import torch

from conftest import tiny_model
from unmask.model.config import ConfigError, ModelConfig


def test_causal_mode_is_causal(tokenizer):
    model = tiny_model(tokenizer, attention="causal")
    x = torch.randint(10, 500, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(10, 500, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def test_bidirectional_sees_the_future(tokenizer):
    model = tiny_model(tokenizer)
    x = torch.randint(10, 500, (1, 20))
    y = x.clone()
    y[:, -1] = (x[:, -1] + 1) % 500
    with torch.no_grad():
        assert not torch.allclose(model(x)[:, 0], model(y)[:, 0], atol=1e-5)


def test_block_causal_is_causal_across_blocks_only(tokenizer):
    model = tiny_model(tokenizer, attention="block_causal", block_size=8)
    x = torch.randint(10, 500, (1, 24))
    y = x.clone()
    y[:, 13] = (x[:, 13] + 1) % 500  # a token inside the second block (8..15)
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-5)  # earlier block: unchanged
    assert not torch.allclose(a[:, 8:13], b[:, 8:13], atol=1e-4)  # same block, earlier positions: changed
    assert not torch.allclose(a[:, 16:], b[:, 16:], atol=1e-4)  # later block: changed


def test_left_padding_does_not_change_logits(tokenizer):
    model = tiny_model(tokenizer)
    x = torch.randint(10, 500, (1, 10))
    padded = torch.cat([torch.full((1, 3), tokenizer.pad_id), x], dim=1)
    positions = torch.tensor([[0, 0, 0] + list(range(10))])
    valid = padded != tokenizer.pad_id
    with torch.no_grad():
        a = model(x)
        b = model(padded, positions=positions, key_valid=valid)
    assert torch.allclose(a, b[:, 3:], atol=1e-5)


def test_kv_cache_matches_full_forward_for_causal(tokenizer):
    model = tiny_model(tokenizer, attention="causal")
    x = torch.randint(10, 500, (1, 16))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(1, 16)
        first = model(x[:, :10], cache=cache)
        rest = [model(x[:, i : i + 1], cache=cache, cache_start=i) for i in range(10, 16)]
    assert torch.allclose(full[:, :10], first, atol=1e-5)
    assert torch.allclose(full[:, 10:], torch.cat(rest, 1), atol=1e-5)


def test_logits_shift_reads_the_previous_output(tokenizer):
    plain = tiny_model(tokenizer)
    shifted = tiny_model(tokenizer, logits_shift=True)
    shifted.load_state_dict(plain.state_dict())
    x = torch.randint(10, 500, (1, 12))
    with torch.no_grad():
        a, b = plain(x), shifted(x)
    assert torch.allclose(b[:, 1:], a[:, :-1])
    assert torch.allclose(b[:, 0], a[:, 0])


def test_context_overflow_is_a_clear_error(tokenizer):
    model = tiny_model(tokenizer, max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds the model context"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("bad, msg", [
    (dict(attention="sideways"), "attention must be"),
    (dict(dim=65), "divisible"),
    (dict(head_dim=15), "head_dim 15 must be even"),
    (dict(mask_id=10_000), "outside the vocabulary"),
])
def test_bad_configs_are_rejected(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig(**{"vocab_size": 512, "dim": 64, "n_heads": 4, **bad})


@pytest.mark.parametrize("head_dim", [None, 24])
def test_param_count_matches_module(tokenizer, head_dim):
    model = tiny_model(tokenizer, qk_norm=True, attn_bias=True, head_dim=head_dim)
    assert model.config.num_params() == sum(p.numel() for p in model.parameters())


def test_decoupled_head_dim_shapes_the_projections(tokenizer):
    # Qwen3-style: 4 heads of 24 on a 64-wide model (4 * 24 != 64)
    model = tiny_model(tokenizer, head_dim=24, qk_norm=True)
    attn = model.layers[0].attention
    assert attn.wq.weight.shape == (4 * 24, 64) and attn.wk.weight.shape == (2 * 24, 64)
    assert attn.wo.weight.shape == (64, 4 * 24) and attn.q_norm.weight.shape == (24,)
    x = torch.randint(10, 500, (2, 12))
    full = model(x)
    cache = model.new_cache(2, 12)
    assert cache.k.shape[-1] == 24
    assert torch.allclose(model(x, cache=cache), full, atol=1e-5)


def test_config_without_head_dim_takes_dim_over_heads():
    # config.json files saved before head_dim existed (models/code-small) have no such key
    assert ModelConfig.from_dict({"vocab_size": 512, "dim": 64, "n_heads": 4}).head_dim == 16
