"""Line infilling on held-out code: the diffusion model (prefix + suffix) against its AR twin (prefix only).

One random non-blank line per sample is removed (its indentation stays in the prefix); the model writes it
back. Metrics, per system, averaged over samples:
  exact match     the written line equals the reference after stripping surrounding whitespace
  token accuracy  fraction of the reference's tokens matched position by position
Both systems' outputs are cut at the first newline: the task is one line.
"""

from __future__ import annotations

import importlib.util
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from unmask.decoding.ar import ar_generate
from unmask.decoding.layout import layout_for
from unmask.decoding.options import DecodeOptions
from unmask.edit.canvas import encode_literal
from unmask.edit.spans import EditError, line_bounds

log = logging.getLogger(__name__)

LENGTH_LABELS = {
    "oracle": "diffusion, oracle length",
    "absorb": "diffusion, length by pad absorption",
    "search": "diffusion, length by ELBO search",
}


@dataclass
class InfillSample:
    prefix: str
    middle: str
    suffix: str
    source: str  # file:line


@dataclass
class InfillRow:
    system: str
    n: int
    exact: float
    token_accuracy: float
    nfe: float
    seconds: float


def find_files(data: str, pattern: str = "*.py") -> list[Path]:
    """A folder (searched recursively) or the folder of an importable package."""
    path = Path(data)
    if not path.exists():
        spec = importlib.util.find_spec(data) if data.replace(".", "").replace("_", "").isalnum() else None
        if spec is None or not (spec.submodule_search_locations or spec.origin):
            raise EditError(f"--data {data!r} is neither a folder nor an importable package")
        path = Path(next(iter(spec.submodule_search_locations))) if spec.submodule_search_locations \
            else Path(spec.origin)
    files = [path] if path.is_file() else sorted(p for p in path.rglob(pattern) if p.is_file())
    if not files:
        raise EditError(f"no files matching {pattern} under {path}")
    return files


def make_samples(data: str, n: int, seed: int = 0, context_lines: int = 40, pattern: str = "*.py",
                 min_chars: int = 4, max_chars: int = 80) -> list[InfillSample]:
    """n distinct masked lines drawn at random (seeded) from the files; at most `context_lines` lines either side."""
    rng = random.Random(seed)
    files = find_files(data, pattern)
    samples: list[InfillSample] = []
    taken: set[tuple[Path, int]] = set()  # a line drawn twice would be counted twice in the table
    tries = 0
    while len(samples) < n and tries < 50 * n:
        tries += 1
        f = rng.choice(files)
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        bounds = line_bounds(text)
        good = [i for i, (s, e) in enumerate(bounds) if min_chars <= len(text[s:e].strip()) <= max_chars]
        if not good:
            continue
        i = rng.choice(good)
        if (f, i) in taken:
            continue
        taken.add((f, i))
        s, e = bounds[i]
        line = text[s:e]
        s += len(line) - len(line.lstrip())  # keep the indentation: the task is the code, not the spaces
        e -= len(line) - len(line.rstrip())
        lo = bounds[max(0, i - context_lines)][0]
        hi = bounds[min(len(bounds) - 1, i + context_lines)][1]
        samples.append(InfillSample(text[lo:s], text[s:e], text[e:hi], f"{f.name}:{i + 1}"))
    if not samples:
        raise EditError(f"no usable line ({min_chars}-{max_chars} characters) in the {pattern} files of {data}")
    if len(samples) < n:
        log.warning("only %d usable lines found (asked for %d)", len(samples), n)
    return samples


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].split("\r", 1)[0]


def score(tokenizer, pred: str, ref: str) -> tuple[bool, float]:
    pred = first_line(pred)
    exact = pred.strip() == ref.strip()
    p, r = encode_literal(tokenizer, pred.strip()), encode_literal(tokenizer, ref.strip())
    acc = sum(a == b for a, b in zip(p, r)) / max(len(r), 1)
    return exact, acc


def _row(system: str, scores: list[tuple[bool, float]], nfe: list[int], seconds: float) -> InfillRow:
    n = max(len(scores), 1)
    return InfillRow(system, len(scores), sum(e for e, _ in scores) / n, sum(a for _, a in scores) / n,
                     sum(nfe) / n, seconds)


def run_infill_eval(pipe, samples: list[InfillSample], ar_pipe=None, lengths: list[str] = ("oracle", "absorb"),
                    max_new_tokens: int = 32, options: DecodeOptions | None = None) -> list[InfillRow]:
    options = options or DecodeOptions()
    rows = []
    for mode in lengths:
        if mode not in LENGTH_LABELS:
            raise EditError(f"unknown length mode {mode!r}; use oracle, absorb or search")
        scores, nfe, t0 = [], [], time.perf_counter()
        for s in samples:
            if mode == "oracle":
                n = max(1, len(encode_literal(pipe.tokenizer, s.middle)))
                r = pipe.infill(s.prefix, s.suffix, max_new_tokens=n, length="fixed", options=options)
            else:
                r = pipe.infill(s.prefix, s.suffix, max_new_tokens=max_new_tokens, length=mode, options=options)
            scores.append(score(pipe.tokenizer, r.middle, s.middle))
            nfe.append(r.nfe)
        rows.append(_row(LENGTH_LABELS[mode], scores, nfe, time.perf_counter() - t0))
    if ar_pipe is not None:
        if layout_for(ar_pipe.config).diffusion:
            raise EditError("--ar-model must be a causal model folder")
        c = ar_pipe.config
        if max_new_tokens >= c.max_seq_len:  # no room left for any of the prefix
            raise EditError(f"--max-new-tokens {max_new_tokens} leaves no context in the AR twin's "
                            f"{c.max_seq_len} positions")
        scores, nfe, t0 = [], [], time.perf_counter()
        for s in samples:
            ids = encode_literal(ar_pipe.tokenizer, s.prefix)[-(c.max_seq_len - max_new_tokens):] or [c.eos_id]
            g = ar_generate(ar_pipe.model, ids, max_new_tokens=max_new_tokens)
            scores.append(score(ar_pipe.tokenizer, ar_pipe.tokenizer.decode(g.tokens), s.middle))
            nfe.append(g.nfe)
        rows.append(_row("AR twin, prefix only", scores, nfe, time.perf_counter() - t0))
    return rows


def infill_table(rows: list[InfillRow], title: str = "infill"):
    from rich.table import Table

    table = Table(title=title)
    for col in ("system", "lines", "exact match", "token accuracy", "mean NFE", "seconds"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for r in rows:
        table.add_row(r.system, str(r.n), f"{100 * r.exact:.1f}%", f"{100 * r.token_accuracy:.1f}%",
                      f"{r.nfe:.1f}", f"{r.seconds:.1f}")
    return table


def rows_markdown(rows: list[InfillRow]) -> str:
    lines = ["| system | lines | exact match | token accuracy | mean NFE | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.system} | {r.n} | {100 * r.exact:.1f}% | {100 * r.token_accuracy:.1f}% | "
                     f"{r.nfe:.1f} | {r.seconds:.1f} |")
    return "\n".join(lines)
