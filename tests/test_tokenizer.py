from hypothesis import given, settings
from hypothesis import strategies as st


def test_special_ids_are_distinct(tokenizer):
    ids = {tokenizer.mask_id, tokenizer.eos_id, tokenizer.pad_id}
    assert len(ids) == 3


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_byte_level_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chat_template_renders(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|user|>hi") and text.endswith("<|assistant|>")
