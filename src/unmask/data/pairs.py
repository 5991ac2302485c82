"""Chat-format training pairs from source code: a function's docstring becomes the request, its code the
answer; optionally the answer a model itself gives to that request (sequence-level self-distillation, which
keeps an adapted model's chat behaviour its base's)."""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    request: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.request}, {"role": "assistant", "content": self.answer}]


def _request(node: ast.FunctionDef | ast.AsyncFunctionDef, doc: str) -> str:
    args = ast.unparse(node.args)
    summary = doc.strip().split("\n\n")[0]
    summary = " ".join(line.strip() for line in summary.splitlines())
    return f"Write a Python function `{node.name}({args})`. {summary}"


def docstring_pairs(texts: Iterable[str], min_doc_chars: int = 20, max_answer_chars: int = 1500) -> Iterator[Pair]:
    """One pair per documented top-level function or method of the given Python sources (unparsable sources
    and private, undocumented or very long functions are skipped). The answer is the function as written, in a
    fenced code block."""
    for text in texts:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < min_doc_chars or node.end_lineno is None:
                continue
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            code = textwrap.dedent("\n".join(lines[start - 1 : node.end_lineno]))
            if len(code) > max_answer_chars:
                continue
            yield Pair(_request(node, doc), f"```python\n{code}\n```")


def chat_document(tokenizer, pair: Pair) -> str:
    """The pair as one training document in the tokenizer's chat template."""
    return tokenizer.apply_chat_template(pair.messages(), add_generation_prompt=False)
