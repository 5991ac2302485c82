"""The engine's stages alone: a Request advancing from given logits, the Runner's logits against the model."""

import torch

from conftest import tiny_model
from unmask.decoding.engine import Engine
from unmask.decoding.options import DecodeOptions
from unmask.decoding.runner import Runner


def _admitted(engine: Engine, prompt: list[int], options: DecodeOptions):
    engine.submit(prompt, options)
    r = engine._waiting.popleft()
    r.slot.row = 0  # the runner's part of a request: its Slot (decoding/plan.py)
    r.enter_block()
    return r


def test_a_request_advances_from_logits_alone(tokenizer):
    model = tiny_model(tokenizer)
    c = model.config
    prompt = tokenizer.encode("import os")
    r = _admitted(Engine(model), prompt, DecodeOptions(max_new_tokens=6, block_length=3, policy="fixed",
                                                       early_stop=False))
    want = next(t for t in range(10, c.vocab_size) if t not in (c.mask_id, c.eos_id))
    logits = torch.zeros(3, c.vocab_size)
    logits[:, want] = 50.0
    events = []
    while not (events and events[-1].done):
        events.append(r.update(logits[: r.pos.numel()]))
    assert [e.step for e in events] == list(range(1, 7)) and [e.committed for e in events] == list(range(1, 7))
    assert events[-1].result.tokens == [want] * 6 and events[-1].result.steps_per_block == [3, 3]
    assert events[-1].result.nfe == 6 and events[-1].result.finish_reason == "length"


def test_the_runner_gives_the_models_logits_at_the_blocks_positions(tokenizer):
    model = tiny_model(tokenizer)
    r = _admitted(Engine(model), tokenizer.encode("class A:"), DecodeOptions(max_new_tokens=8, block_length=4,
                                                                               cache="none"))
    with torch.inference_mode():
        got = Runner(model, max_batch=1).logits([r])[0]
        want = model.output(model(r.x[None], return_hidden=True))[0, r.src]
    torch.testing.assert_close(got, want)
