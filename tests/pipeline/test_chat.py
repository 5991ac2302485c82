"""`unmask chat`: prompts in the checkpoint's own template, replies cut at its end-of-turn token, multi-turn."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

import unmask
from published_checkpoints import llada_checkpoint, qwen2_checkpoint
from unmask.chat import ChatSession, end_of_turn_strings
from unmask.cli.main import main
from unmask.decoding.options import DecodeOptions


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "llada"
    llada_checkpoint(path)
    return path


def _always(pipe, token: str) -> int:
    """Rig the model's head so that every position predicts `token`."""
    model, tid = pipe.model, pipe.tokenizer.token_to_id(token)
    head = nn.Linear(model.config.dim, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tid] = 20.0
    model.output = head
    return tid


def test_end_of_turn_strings_from_the_checkpoint(tmp_path, llada_dir):
    assert end_of_turn_strings(unmask.load(llada_dir, device="cpu"))[:2] == ["<|endoftext|>", "<|eot_id|>"]
    qwen2_checkpoint(tmp_path / "dream", kind="dream")
    stops = end_of_turn_strings(unmask.load(tmp_path / "dream", device="cpu"))
    assert "<|im_end|>" in stops and "<|endoftext|>" in stops  # generation_config.json lists both


def test_reply_is_cut_at_the_end_of_turn_token(llada_dir):
    pipe = unmask.load(llada_dir, device="cpu")
    _always(pipe, "<|eot_id|>")  # a model that immediately ends its turn
    raw = pipe.generate(pipe.encode("hi"), DecodeOptions(max_new_tokens=8, block_length=8))
    assert raw.text.startswith("<|eot_id|><|eot_id|>")  # without the chat's stops the marker leaks into the text
    session = ChatSession(pipe, DecodeOptions(max_new_tokens=8, block_length=8))
    turn = session.send("hello")
    assert turn.reply == "" and turn.result.finish_reason == "stop"


def test_multi_turn_history_is_formatted_with_the_template(llada_dir):
    pipe = unmask.load(llada_dir, device="cpu")
    session = ChatSession(pipe, DecodeOptions(max_new_tokens=8, block_length=8, seed=0), system="Be brief.")
    first = session.send("hello")
    assert first.prompt == ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                            "<|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
                            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    second = session.send("again")
    assert second.prompt.startswith(first.prompt + first.reply.strip())
    assert second.prompt.endswith("<|start_header_id|>user<|end_header_id|>\n\nagain<|eot_id|>"
                                  "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_a_turn_that_does_not_fit_leaves_the_history_unchanged(llada_dir):
    pipe = unmask.load(llada_dir, device="cpu")
    session = ChatSession(pipe, DecodeOptions(max_new_tokens=8, block_length=8))
    with pytest.raises(unmask.errors.UnmaskError, match="context"):
        session.send("word " * 400)
    assert session.messages == []


def test_cli_one_shot_message(tmp_path, capsys):
    qwen2_checkpoint(tmp_path / "dream", kind="dream")
    rc = main(["chat", str(tmp_path / "dream"), "--message", "hello", "--show-prompt", "-n", "8",
               "--block-length", "8", "--seed", "0"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n" in err
    assert "NFE" in err


def test_cli_repl(llada_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nagain\n/exit\n"))
    rc = main(["chat", str(llada_dir), "-n", "8", "--block-length", "8", "--show-prompt"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "conversation cleared" in err
    # after /reset the second prompt holds only the new message
    assert err.count("user<|end_header_id|>") == 2 and "hello<|eot_id|>" in err
    assert err.count("NFE") == 2


def test_checkpoint_special_tokens_are_skipped_on_request(llada_dir):
    tok = unmask.load(llada_dir, device="cpu").tokenizer
    ids = tok.encode("hello<|eot_id|><|start_header_id|>")
    assert "<|eot_id|>" in tok.decode(ids)
    assert tok.decode(ids, skip_special=True) == "hello"


def test_chat_template_variables_from_the_command_line(tmp_path, llada_dir, capsys, monkeypatch):
    from unmask.cli.checkpoints import template_variables
    from unmask.tokenizer import Tokenizer

    assert template_variables(["enable_thinking=false", "who=ada", "n=3"]) == \
        {"enable_thinking": False, "who": "ada", "n": 3}
    seen = []
    real = Tokenizer.apply_chat_template
    monkeypatch.setattr(Tokenizer, "apply_chat_template",
                        lambda self, messages, add_generation_prompt=True, **kw: seen.append(kw) or
                        real(self, messages, add_generation_prompt, **kw))
    args = ["chat", str(llada_dir), "--message", "hi", "-n", "4", "--steps", "2", "--device", "cpu"]
    assert main([*args, "--template-var", "enable_thinking=false"]) == 0
    assert seen == [{"enable_thinking": False}]
    assert main([*args, "--template-var", "messages=[]"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
