"""Attention layouts answer the engine's mode questions (decoding/layout.py)."""

from unmask.decoding.engine import plan_blocks
from unmask.decoding.layout import AttentionLayout, BlockCausal, BlockCausalCausalBlocks, Causal, layout_for
from unmask.model.config import ModelConfig


def _config(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=64, **kw)


def test_one_layout_per_attention_mode():
    assert type(layout_for(_config())) is AttentionLayout
    assert type(layout_for(_config(attention="causal"))) is Causal
    assert type(layout_for(_config(attention="block_causal", block_size=4))) is BlockCausal
    causal_blocks = layout_for(_config(attention="block_causal", block_size=4, block_attention="causal",
                                       logits_shift=True))
    assert type(causal_blocks) is BlockCausalCausalBlocks and causal_blocks.drafting
    assert not layout_for(_config(attention="block_causal", block_size=4, block_attention="causal")).drafting
    assert not layout_for(_config(attention="causal")).diffusion
    assert [layout_for(_config(attention=a, block_size=4)).prefix_reuse
            for a in ("bidirectional", "block_causal")] == [False, True]


def test_windows_and_refresh_reach():
    bidi = layout_for(_config())
    assert bidi.block_window([5, 6], 20, "prefix") == (5, 20) and bidi.block_window([5, 6], 20, "dual") == (5, 7)
    assert bidi.entry_window((5, 7), [3, 4]) is None and bidi.visible((5, 7), 20, False) == 20
    bc = layout_for(_config(attention="block_causal", block_size=4))
    assert bc.block_window([5, 6], 20, "prefix") == (4, 8) == bc.block_window([5, 6], 20, "dual")
    assert bc.entry_window((8, 12), [5, 6, 7]) == (4, 12)
    assert bc.visible((4, 8), 20, False) == 8 and bc.visible((4, 8), 20, True) == 20
    cb = layout_for(_config(attention="block_causal", block_size=4, block_attention="causal", logits_shift=True))
    assert cb.block_window([5, 6], 20, "prefix") == (4, 7) and cb.entry_window((7, 10), [5, 6]) == (5, 10)


def test_blocks_cross_model_blocks_only_where_nothing_depends_on_them():
    masks = list(range(2, 12))
    assert plan_blocks(masks, 4, _config(attention="block_causal", block_size=4)) == [
        [2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert plan_blocks(masks, 4, _config(attention="block_causal", block_size=4, block_attention="causal")) == [
        [2, 3, 4, 5], [6, 7, 8, 9], [10, 11]]
    assert plan_blocks(masks, 4, _config()) == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11]]
