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


# A condensed Qwen3 chat template: namespace objects, a reversed slice, str methods, `is defined`,
# tojson of tool calls and the enable_thinking switch (HF passes extra keyword arguments to the template).
QWEN3_STYLE = (
    "{%- set ns = namespace(last_query=messages|length - 1) %}"
    "{%- for m in messages[::-1] %}{%- if m.role == 'user' and ns.last_query == messages|length - 1 %}"
    "{%- set ns.last_query = (messages|length - 1) - loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- set content = m.content.split('</think>')[-1].lstrip('\\n') if m.role == 'assistant' else m.content %}"
    "{{- '<|im_start|>' + m.role + '\\n' + content }}"
    "{%- if m.tool_calls is defined %}{{- '\\n' + m.tool_calls | tojson }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _with_template(tokenizer, template):
    import copy

    tok = copy.copy(tokenizer)
    tok.chat_template = template
    return tok


def test_chat_template_renders_like_transformers(tokenizer):
    tok = _with_template(tokenizer, QWEN3_STYLE)
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "<think>hm</think>\nyo",
                 "tool_calls": [{"name": "f", "arguments": {"z": "<b>é", "a": 1}}]},
                {"role": "user", "content": "more"}]
    text = tok.apply_chat_template(messages)
    # tojson as transformers: no HTML escaping, no ASCII escaping, keys in their order
    assert '<|im_start|>assistant\nyo\n[{"name": "f", "arguments": {"z": "<b>é", "a": 1}}]<|im_end|>' in text
    assert text.endswith("<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages, enable_thinking=False).endswith("assistant\n<think>\n\n</think>\n\n")


def test_chat_template_loop_controls_and_errors(tokenizer):
    import pytest

    from unmask.tokenizer import TokenizerError

    tok = _with_template(tokenizer, "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                                    "{{ m.content }}{% endfor %}")
    assert tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a"
    with pytest.raises(TokenizerError, match="chat template: .*"):
        _with_template(tokenizer, "{% for m in messages %}").apply_chat_template([])  # never closed
    with pytest.raises(TokenizerError, match="chat template: .*"):
        _with_template(tokenizer, "{{ messages.__class__.__mro__ }}").apply_chat_template([])  # sandboxed


def test_token_bytes_spell_the_text_even_inside_a_character(tokenizer):
    text = "naïve → 日本 déf f():\n\treturn '✓'"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode("utf-8")
    assert any(not _valid_utf8(p) for p in pieces)  # some tokens hold part of a character: decode can't say which
    assert tokenizer.token_bytes(tokenizer.eos_id) == tokenizer.decode([tokenizer.eos_id]).encode("utf-8")


def _valid_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
