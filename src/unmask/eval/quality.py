"""Quality of sampled code, cheap enough to run after every training run:

- held-out function prompts: a function's signature + docstring, taken from real source with `ast`;
- degenerate repetition: some 4-gram of tokens occurs >= 4 times in a sample;
- parse rate: prompt + sampled body (cut where the function ends, or after its last finished line)
  parses with `ast.parse`;
- generative NLL: how likely the AR twin finds the samples (bits per byte of the sampled text).
"""

from __future__ import annotations

import ast
import math
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from unmask.decoding.layout import layout_for
from unmask.decoding.options import DecodeOptions


@dataclass
class FunctionPrompt:
    prompt: str  # "def name(args):\n    \"\"\"docstring\"\"\"\n"
    body: str  # the original body after the docstring (reference)


def function_prompts(texts: Iterable[str], limit: int = 32, seed: int = 0, max_prompt_chars: int = 600) -> list[FunctionPrompt]:
    """Top-level or method functions with a docstring, in a deterministic random order."""
    found: list[FunctionPrompt] = []
    for text in texts:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
                continue
            doc = node.body[0]
            if not (isinstance(doc, ast.Expr) and isinstance(getattr(doc, "value", None), ast.Constant)
                    and isinstance(doc.value.value, str)):
                continue
            indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
            head = "".join(lines[node.lineno - 1 : doc.end_lineno])
            body = "".join(lines[doc.end_lineno : node.end_lineno])
            # dedent so the prompt is a top-level function
            head = "".join(l[indent:] if l[:indent].strip() == "" else l for l in head.splitlines(keepends=True))
            body = "".join(l[indent:] if l[:indent].strip() == "" else l for l in body.splitlines(keepends=True))
            if len(head) <= max_prompt_chars and body.strip():
                found.append(FunctionPrompt(head if head.endswith("\n") else head + "\n", body))
    random.Random(seed).shuffle(found)
    return found[:limit]


def has_degenerate_repetition(tokens: Sequence[int], n: int = 4, times: int = 4) -> bool:
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return any(c >= times for c in counts.values())


def function_body(completion: str) -> str:
    """The completion up to the first line that leaves the function (non-blank at column 0). A body that
    never leaves the function ran out of tokens: its last line, cut mid-way (no newline), is dropped —
    a sample is judged on the lines it finished, as HumanEval-style runners cut at stop sequences."""
    out = []
    for line in completion.splitlines(keepends=True):
        if line.strip() and not line[0].isspace():
            return "".join(out)
        out.append(line)
    if out and not out[-1].endswith(("\n", "\r")):
        out.pop()
    return "".join(out)


def body_parses(prompt: str, completion: str) -> bool:
    body = function_body(completion)
    if not any(l.strip() and not l.strip().startswith("#") for l in body.splitlines()):
        return False  # an empty body would "parse" thanks to the docstring alone
    try:
        ast.parse(prompt + body)
        return True
    except (SyntaxError, ValueError):
        return False


@dataclass
class SampleQuality:
    samples: int
    repetition_rate: float
    parse_rate: float
    nfe_per_256: float  # forward passes per 256 generated tokens
    tokens_per_step: float
    tokens_per_second: float
    completions: list[str]

    def as_dict(self) -> dict:
        d = dict(vars(self))
        d.pop("completions")
        return d


def sample_quality(pipe, prompts: Sequence[FunctionPrompt], options: DecodeOptions) -> SampleQuality:
    rep = parsed = 0
    nfe = tokens = steps = 0
    seconds = 0.0
    completions = []
    for p in prompts:
        t0 = time.perf_counter()
        result = pipe.generate(p.prompt, options)
        seconds += time.perf_counter() - t0
        completions.append(result.text)
        rep += has_degenerate_repetition(result.tokens)
        parsed += body_parses(p.prompt, result.text)
        # cost of the full budget: generation stopped early still spent what it spent
        nfe += result.nfe
        steps += result.steps
        tokens += max(len(result.tokens), 1)
    n = max(len(prompts), 1)
    return SampleQuality(
        samples=len(prompts), repetition_rate=rep / n, parse_rate=parsed / n,
        nfe_per_256=256 * nfe / max(tokens, 1), tokens_per_step=tokens / max(steps, 1),
        tokens_per_second=tokens / max(seconds, 1e-9), completions=completions,
    )


@torch.no_grad()
def generative_bits_per_byte(ar_pipe, prompts: Sequence[str], completions: Sequence[str]) -> float:
    """Bits per byte of the completions under a causal model, each conditioned on its prompt."""
    model = ar_pipe.model
    if layout_for(model.config).diffusion:
        raise ValueError("generative NLL needs a causal (AR twin) model")
    nats, n_bytes = 0.0, 0
    for prompt, completion in zip(prompts, completions):
        if not completion:
            continue
        p_ids = ar_pipe.encode(prompt)
        c_ids = ar_pipe.encode(completion)
        ids = (p_ids + c_ids)[-model.config.max_seq_len :]
        n_c = min(len(c_ids), len(ids) - 1)
        x = torch.tensor([ids], device=ar_pipe.device)
        logp = model(x[:, :-1]).float().log_softmax(-1)
        target = x[:, 1:]
        tok_lp = logp.gather(-1, target[..., None]).squeeze(-1)[0, -n_c:]
        nats -= float(tok_lp.sum())
        n_bytes += len(completion.encode("utf-8"))
    return nats / (math.log(2) * max(n_bytes, 1))
