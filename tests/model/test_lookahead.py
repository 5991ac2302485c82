"""Block-diffusion adaptation of an AR model: the mask-gated adapter, causal-inside blocks, the leftmost
policy (AR quality as the floor) and the adaptation objective."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_model
from engine_helpers import sharpen
from unmask.decoding.ar import ar_generate
from unmask.decoding.engine import Engine
from unmask.decoding.options import DecodeOptions
from unmask.diffusion import objective
from unmask.model.adapter import is_adapter_param
from unmask.model.transformer import Transformer


def adapted(base: Transformer, block_attention: str = "causal", tokens: str = "masks", seed: int = 1) -> Transformer:
    """`base` (a causal model) as a block-diffusion model with a random, non-zero adapter."""
    config = dataclasses.replace(base.config, attention="block_causal", block_size=8, block_attention=block_attention,
                                 logits_shift=True, adapter_rank=4, adapter_tokens=tokens)
    model = Transformer(config)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(is_adapter_param(n) for n in missing)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_param(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


@pytest.fixture
def base(tokenizer):
    return sharpen(tiny_model(tokenizer, attention="causal"))


def test_gated_adapter_leaves_committed_tokens_exactly_as_the_base(base, tokenizer):
    model = adapted(base)
    ids = torch.randint(10, tokenizer.vocab_size, (2, 24))
    with torch.no_grad():
        want = base(ids)
        got = model(ids)  # no [MASK] in the input: the adapter is off everywhere
        assert torch.equal(got[:, 1:], want[:, :-1])  # shifted: output i is the base's output i-1
        masked = ids.clone()
        masked[:, 20:] = tokenizer.mask_id
        after = model(masked)
    assert torch.equal(after[:, 1:21], want[:, :20])  # causal: masks to the right change nothing before them
    assert not torch.allclose(after[:, 21:], want[:, 20:-1])  # ...and the adapter acts at the masks


def test_ungated_adapter_changes_every_token(base, tokenizer):
    model = adapted(base, tokens="all")
    ids = torch.randint(10, tokenizer.vocab_size, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(model(ids)[:, 1:], base(ids)[:, :-1])


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("block_length", [4, 8, 11])
def test_leftmost_policy_at_threshold_one_decodes_exactly_as_greedy_ar(base, tokenizer, cache, block_length):
    """AR quality is the floor: with the leftmost policy the step's committed token is the base model's own
    greedy choice, however wrong the (random) adapter's look-ahead is."""
    model = adapted(base)
    prompt = tokenizer.encode("def parse(line):\n    return")
    want = ar_generate(base, prompt, max_new_tokens=30, stop_at_eos=False).tokens
    options = DecodeOptions(max_new_tokens=30, block_length=block_length, policy="leftmost", threshold=1.0,
                            cache=cache, early_stop=False)
    got = Engine(model).generate(prompt, options)
    assert got.tokens == want
    assert got.steps == 30


def test_leftmost_policy_commits_sure_look_ahead_tokens(base, tokenizer):
    """Low τ: look-ahead tokens go too, so fewer steps than tokens (and the leftmost each step regardless)."""
    model = adapted(base)
    prompt = tokenizer.encode("import os\n")
    options = DecodeOptions(max_new_tokens=32, block_length=8, policy="leftmost", threshold=0.05, early_stop=False)
    result = Engine(model).generate(prompt, options)
    assert result.steps < 32


def test_two_pass_training_forward_equals_the_joint_forward(base, tokenizer):
    """With the adapter gated to masks and the base frozen, the clean copy runs alone without gradients; the
    hidden states equal the single [x_t, x_0] pass."""
    model = adapted(base)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name))
    x0 = torch.randint(10, tokenizer.vocab_size, (3, 32))
    masked = objective.decoder_like_masks(x0, 8, torch.Generator().manual_seed(0))
    x_t = torch.where(masked, torch.full_like(x0, tokenizer.mask_id), x0)
    assert objective._clean_half_frozen(model)
    two_pass = objective.block_hidden(model, x_t, x0)
    with torch.no_grad():
        joint = objective.block_hidden(model, x_t, x0)
    torch.testing.assert_close(two_pass, joint, rtol=1e-5, atol=1e-5)
    two_pass.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("lora_a"))


def test_decoder_like_masks():
    x0 = torch.zeros(64, 32, dtype=torch.long)
    masked = objective.decoder_like_masks(x0, 8, torch.Generator().manual_seed(0)).view(64, 4, 8)
    assert masked.any(-1).all()  # every block keeps a mask
    tails = masked[0::2]
    first = tails.float().argmax(-1, keepdim=True)
    assert torch.equal(tails, torch.arange(8) >= first)  # even rows: a block's tail after one cut
    assert not torch.equal(masked[1::2], torch.arange(8) >= masked[1::2].float().argmax(-1, keepdim=True))


@pytest.mark.parametrize("block_attention,tokens", [("causal", "masks"), ("bidirectional", "all")])
def test_adaptation_loss_trains_the_adapter_only(base, tokenizer, block_attention, tokens):
    model = adapted(base, block_attention, tokens).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.zero_()
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    x0 = torch.randint(10, tokenizer.vocab_size, (4, 32))
    losses = []
    for step in range(40):
        loss = objective.adaptation_loss(model, x0, torch.Generator().manual_seed(step % 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0  # nats; the leftmost masks (the base's own AR predictions) cannot move
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_auto_edit_of_a_left_context_model_flags_only_where_it_was_sure_of_another(base, tokenizer):
    """A causal-inside model finds a text's first tokens and every new name improbable; auto mode flags a
    token only where the model's own choice there was sure (>= SURE_OF_ANOTHER), and never the first one."""
    from unmask.edit.editor import SURE_OF_ANOTHER, _correction_scores
    from unmask.edit.probe import token_probs

    model = adapted(base)
    ids = tokenizer.encode("def average(values):\n    return total / len(vaules)\n")
    scores, _ = _correction_scores(model, ids, None)
    probs, best, _ = token_probs(model, ids, best=True)
    assert scores[0] == 1.0
    sure = best >= SURE_OF_ANOTHER
    assert torch.equal(scores[1:][sure[1:]], probs[1:][sure[1:]])
    assert bool((scores[1:][~sure[1:]] == 1.0).all())


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("block_length", [4, 8, 11])
def test_verify_policy_decodes_exactly_as_greedy_ar_in_fewer_steps(base, tokenizer, cache, block_length):
    """The verify policy feeds drafts (look-ahead, copies from the context) and commits a token only where the
    inputs before it were the committed ones: the base's greedy tokens exactly, however wrong the drafts."""
    model = adapted(base)
    prompt = tokenizer.encode("def parse(line):\n    return line.split(line)\n\ndef parse(line):\n    return")
    want = ar_generate(base, prompt, max_new_tokens=40, stop_at_eos=False).tokens
    options = DecodeOptions(max_new_tokens=40, block_length=block_length, policy="verify", cache=cache,
                            early_stop=False)
    got = Engine(model).generate(prompt, options)
    assert got.tokens == want
    assert got.steps < 40  # the sharpened tiny base repeats itself: copied drafts are confirmed


def test_verify_policy_batched_equals_alone_and_samples_as_the_base(base, tokenizer):
    model = adapted(base)
    prompts = [tokenizer.encode(t) for t in ("import os\n", "def f(x):\n    return x", "class A:\n")]
    greedy = DecodeOptions(max_new_tokens=24, block_length=8, policy="verify", early_stop=False)
    engine = Engine(model, max_batch=3)
    ids = [engine.submit(p, greedy) for p in prompts]
    done = {}
    while engine.has_work():
        for ev in engine.step():
            if ev.done:
                done[ev.request_id] = ev.result.tokens
    for rid, p in zip(ids, prompts):
        assert done[rid] == ar_generate(base, p, max_new_tokens=24, stop_at_eos=False).tokens
    # sampled: each token is drawn from the base's distribution given the committed text before it, so with a
    # near-deterministic temperature the draws equal greedy ones (a wrong conditional would show as a change)
    sampled = Engine(model).generate(prompts[1], greedy.replace(temperature=1e-4, seed=3))
    assert sampled.tokens == done[ids[1]]


def test_verify_policy_needs_causal_blocks(base, tokenizer):
    from unmask.decoding.options import OptionsError

    model = adapted(base, block_attention="bidirectional", tokens="all")
    with pytest.raises(OptionsError, match="causal attention inside its blocks"):
        Engine(model).submit([5, 6, 7], DecodeOptions(max_new_tokens=4, policy="verify"))
    with pytest.raises(OptionsError, match="self_correct"):
        DecodeOptions(policy="verify", self_correct=True)
