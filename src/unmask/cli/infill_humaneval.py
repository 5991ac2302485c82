"""`unmask eval infill --humaneval`: the three systems of eval/infill_humaneval.py on the same tasks."""

from __future__ import annotations

import json
import sys
from pathlib import Path


SYSTEMS = ("suffix", "ar", "denoised")


def run_humaneval_infill(model: Path | None, ar_model: Path | None, multi_line: bool, limit: int | None, seed: int,
                         device, dtype, quantize, systems: list[str] = SYSTEMS) -> None:
    from unmask.cli.common import console, load_pipeline, out
    from unmask.eval.infill_humaneval import (MULTI_LINE_SPANS, PrefixOnly, SuffixScoring, ar_continuation,
                                              denoised_fill, load_tasks, reports_markdown, run_system)

    from unmask.errors import UnmaskError

    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not systems:
        raise UnmaskError(f"--systems: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SYSTEMS)}")
    tasks = load_tasks(multi_line, limit, seed)
    pipe = load_pipeline(model, device, dtype, quantize)
    max_lines = MULTI_LINE_SPANS[1] + 1 if multi_line else 1
    build = {
        "suffix": lambda: SuffixScoring(pipe, max_lines),
        "ar": lambda: PrefixOnly(load_pipeline(ar_model or Path("smollm2"), device, dtype, quantize),
                                 "AR base, prefix only (greedy)", ar_continuation),
        "denoised": lambda: PrefixOnly(pipe, "default model, suffix scoring off (denoised fill)", denoised_fill),
    }
    chosen = [build[name]() for name in SYSTEMS if name in systems]

    def show(label: str, o) -> None:
        console.print(f"[dim]{label[:24]} · {o.task_id}: {'pass' if o.passed else 'fail'} · {o.middle!r}[/dim]")
        sys.stderr.flush()

    reports = [run_system(s, tasks, on_task=show) for s in chosen]
    kind = "multi-line (2-5 lines)" if multi_line else "single-line"
    out.print(f"HumanEval {kind} infilling, {len(tasks)} tasks (seed {seed})\n")
    out.print(reports_markdown(reports))
    out.print(json.dumps([r.row() for r in reports]))
