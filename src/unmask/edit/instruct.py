"""Instruction edits on an instruct model: ask for the rewrite, decode it fast, keep only what it changed.

The request is the chat template's user turn: the instruction and the text in a code block; the answer is
pre-filled with the opening of a code block, so the model writes the rewritten text and closes the block.
Most of a rewrite ("rename total to acc", "add a docstring") is the original text again, and the verify
policy drafts by copying from the context (decoding/drafts.py): where the rewrite follows the original, a
whole run of copied tokens is confirmed in one step. The answer is then compared with the original line by
line and only the lines that changed, inside the requested regions, are replaced: every other character,
line endings included, stays as it was.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from unmask.decoding.options import DecodeOptions
from unmask.edit.spans import EditError, Span

FENCE = "```"
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


@dataclass
class Rewrite:
    text: str  # the original with the changed lines replaced
    spans: list[Span]  # regions of the original that changed
    replacements: list[str]
    answer: str  # the model's whole rewrite
    steps: int
    tokens: int  # tokens the model wrote


def request_prompt(pipe, text: str, instruction: str) -> str:
    tok = pipe.tokenizer
    body = text if text.endswith("\n") else text + "\n"
    request = f"{instruction.strip()}\n\n{FENCE}\n{body}{FENCE}"
    if tok.chat_template:
        return tok.apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True) + FENCE + "\n"
    return request + "\n\n" + FENCE + "\n"


def rewrite_by_instruction(pipe, text: str, regions: list[Span], instruction: str,
                           options: DecodeOptions) -> Rewrite:
    """The rewrite of `text` the instruction asks for, applied only inside `regions` (module docstring)."""
    from unmask.edit.canvas import encode_literal

    n = len(encode_literal(pipe.tokenizer, text))
    budget = min(pipe.config.max_seq_len // 2, 2 * n + 32)
    prompt = request_prompt(pipe, text.replace("\r\n", "\n").replace("\r", "\n"), instruction)
    if len(pipe.encode(prompt)) + budget > pipe.config.max_seq_len:
        raise EditError(f"the text ({n} tokens) is too long for an instruction edit in a context of "
                        f"{pipe.config.max_seq_len}; edit a part of it")
    result = pipe.generate(prompt, options.replace(max_new_tokens=budget, stop=[FENCE], heal=False))
    answer = result.text
    new_text, spans, replacements = apply_changed_lines(text, answer, regions)
    return Rewrite(new_text, spans, replacements, answer, result.steps, len(result.tokens))


def _lines(text: str) -> list[str]:
    return _LINE.findall(text)


def apply_changed_lines(original: str, answer: str, regions: list[Span]) -> tuple[str, list[Span], list[str]]:
    """`original` with the lines `answer` changed (compared without line endings) replaced, where the change
    lies inside `regions`. New lines take the original's line ending. Returns (text, spans, replacements)."""
    old = _lines(original)
    new = answer.split("\n")
    if new and new[-1] == "":
        new.pop()
    ending = next((m.group(0) for m in re.finditer(r"\r\n|\r|\n", original)), "\n")
    starts = [0]
    for line in old:
        starts.append(starts[-1] + len(line))
    matcher = difflib.SequenceMatcher(a=[line.rstrip("\r\n") for line in old], b=new, autojunk=False)
    edits = []
    for tag, i1, i2, j1, j2 in _line_by_line(matcher.get_opcodes()):
        if tag == "equal":
            continue
        s, e = starts[i1], starts[i2]
        last_has_end = i2 > i1 and old[i2 - 1].endswith(("\n", "\r"))
        block = new[j1:j2]
        repl = ending.join(block) + (ending if block and (last_has_end or i2 == i1) else "")
        if i2 == i1 and i1 == len(old) and old and not old[-1].endswith(("\n", "\r")):
            repl = ending + ending.join(block)  # lines added after a last line without an ending
        if any(rs <= s and e <= re_ for rs, re_ in regions) and original[s:e] != repl:
            edits.append((s, e, repl))
    out = original
    for s, e, repl in reversed(edits):
        out = out[:s] + repl + out[e:]
    return out, [(s, e) for s, e, _ in edits], [r for _, _, r in edits]


def _line_by_line(opcodes):
    """A replacement of n lines by n lines is n one-line changes: each lies in a region or not on its own."""
    for tag, i1, i2, j1, j2 in opcodes:
        if tag == "replace" and i2 - i1 == j2 - j1:
            yield from (("replace", i1 + k, i1 + k + 1, j1 + k, j1 + k + 1) for k in range(i2 - i1))
        else:
            yield tag, i1, i2, j1, j2
