"""Token healing: the prompt's last token is re-decoded as the start of the answer."""

import pytest
import torch

from conftest import tiny_model
from engine_helpers import sharp_model
from unmask.decoding.engine import Engine
from unmask.decoding.healing import heal
from unmask.decoding.options import DecodeOptions
from unmask.pipeline import Pipeline

PROMPT = 'def f(x):\n    """Return x."""\n'


def test_heal_drops_a_newline_and_allows_its_indented_extensions(tokenizer):
    ids = tokenizer.encode(PROMPT)
    h = heal(tokenizer, ids)
    assert h.prompt_ids == ids[:-1] and h.removed == "\n"
    allowed = {tokenizer.decode([i]) for i in h.allowed.nonzero().flatten().tolist()}
    # training text had "\n   " here (the pre-tokenizer leaves the last space to the next word)
    assert "\n" in allowed and "\n   " in allowed
    assert all(s.startswith("\n") for s in allowed)
    assert heal(tokenizer, ids[:1]) is None  # nothing left to condition on
    assert heal(tokenizer, ids + [tokenizer.eos_id]) is None  # special tokens are not healed


def test_engine_restricts_the_first_new_token(tokenizer):
    model = sharp_model(tokenizer)
    prompt = tokenizer.encode("def main(args):\n    return")
    o = DecodeOptions(max_new_tokens=16, block_length=8)
    free = Engine(model).generate(prompt, o)
    only = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    forced = (free.tokens[0] + 7) % 200 + 20
    only[forced] = True
    r = Engine(model).generate(prompt, o, first_allowed=only)
    assert r.tokens[0] == forced != free.tokens[0]


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_pipeline_heals_text_prompts_and_keeps_the_prompt_intact(tokenizer, attention):
    pipe = Pipeline(tiny_model(tokenizer, attention=attention), tokenizer)
    o = DecodeOptions(max_new_tokens=12, block_length=4, early_stop=False)
    healed = pipe.generate(PROMPT, o)
    first = tokenizer.decode(healed.tokens[:1])
    assert first.startswith("\n")  # the answer re-decodes the prompt's last token ...
    assert tokenizer.decode(healed.tokens) == "\n" + healed.text  # ... and that "\n" is not printed twice
    assert healed.prompt_tokens == len(tokenizer.encode(PROMPT))
    plain = pipe.generate(PROMPT, o.replace(heal=False))
    assert plain.text == tokenizer.decode(plain.tokens) and len(plain.tokens) == 12
