"""HumanEval infilling: a gap cut out of a canonical solution, filled, and judged by the problem's tests.

Tasks (as the FIM papers build them from HumanEval's canonical solutions):
  single-line  each non-blank line of each solution removed in turn (1,033 tasks); its indentation stays in
               the prefix, the rest of the solution is the suffix
  multi-line   per problem, one random span of 2-5 whole lines (seeded), cut the same way

A filled solution passes if prompt + solution + the problem's tests run clean in the sandbox. Systems:
  suffix scoring   the default model: middles proposed by its base and scored with the suffix (edit/suffix.py)
  AR, prefix only  the AR base decoding greedily from the prefix, cut to the reference's number of lines
                   (it cannot know where the gap ends; it is given that much)
  no suffix        the default model's denoising fill, which cannot see past the gap, cut the same way
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from unmask.eval.humaneval import check_program, load_problems
from unmask.eval.sandbox import run_program

MULTI_LINE_SPANS = (2, 5)  # lines per multi-line gap, inclusive
SINGLE_LINE_BUDGET = 32  # tokens a one-line middle may take
MULTI_LINE_BUDGET = 160


@dataclass(frozen=True)
class InfillTask:
    task_id: str  # "HumanEval/3 line 2" / "HumanEval/3 lines 2-4" (lines of the solution, 1-based)
    problem: dict = field(repr=False, hash=False, compare=False)
    prefix: str = field(repr=False)
    middle: str = field(repr=False)
    suffix: str = field(repr=False)

    @property
    def lines(self) -> int:
        return self.middle.count("\n") + 1

    def program(self, middle: str) -> str:
        """The problem's test program with `middle` in the gap."""
        solution = self.prefix[len(self.problem["prompt"]):] + middle + self.suffix
        return check_program(self.problem, solution)


def _solution_lines(solution: str) -> list[tuple[int, int]]:
    """(start of content after indentation, end of content) of every non-blank line of a solution."""
    out, pos = [], 0
    for line in solution.split("\n"):
        if line.strip():
            out.append((pos + len(line) - len(line.lstrip()), pos + len(line.rstrip())))
        pos += len(line) + 1
    return out


def _task(problem: dict, start: int, end: int, name: str) -> InfillTask:
    prompt, solution = problem["prompt"], problem["canonical_solution"]
    return InfillTask(f"{problem['task_id']} {name}", problem, prompt + solution[:start], solution[start:end],
                      solution[end:])


def single_line_tasks(problems: list[dict]) -> list[InfillTask]:
    return [_task(p, s, e, f"line {i + 1}") for p in problems
            for i, (s, e) in enumerate(_solution_lines(p["canonical_solution"]))]


def multi_line_tasks(problems: list[dict], seed: int = 0) -> list[InfillTask]:
    """One span of 2-5 non-blank lines per problem with at least two lines (seeded per problem)."""
    out = []
    for p in problems:
        lines = _solution_lines(p["canonical_solution"])
        if len(lines) < MULTI_LINE_SPANS[0]:
            continue
        rng = random.Random(f"{seed}:{p['task_id']}")
        k = rng.randint(MULTI_LINE_SPANS[0], min(MULTI_LINE_SPANS[1], len(lines)))
        i = rng.randrange(len(lines) - k + 1)
        out.append(_task(p, lines[i][0], lines[i + k - 1][1], f"lines {i + 1}-{i + k}"))
    return out


def subsample(tasks: list[InfillTask], limit: int | None, seed: int = 0) -> list[InfillTask]:
    """`limit` tasks drawn without replacement (seeded), in their original order; all if limit is None."""
    if limit is None or limit >= len(tasks):
        return tasks
    keep = set(random.Random(seed).sample(range(len(tasks)), limit))
    return [t for i, t in enumerate(tasks) if i in keep]


# --- systems ------------------------------------------------------------------------------------------

@dataclass
class Filled:
    middle: str
    tokens: int  # tokens written into the gap
    steps: int  # forward passes (or denoising steps) spent


class InfillSystem(Protocol):
    label: str

    def fill(self, task: InfillTask) -> Filled: ...


def first_lines(text: str, n: int) -> str:
    return "\n".join(text.split("\n")[:n])


def budget(task: InfillTask) -> int:
    return SINGLE_LINE_BUDGET if task.lines == 1 else MULTI_LINE_BUDGET


class SuffixScoring:
    """The default model reading the suffix: proposals scored by how well the suffix follows them."""

    def __init__(self, pipe, max_lines: int):
        self.pipe, self.max_lines = pipe, max_lines
        self.label = "default model, prefix + suffix (suffix scoring)"

    def fill(self, task: InfillTask) -> Filled:
        r = self.pipe.infill(task.prefix, task.suffix, max_new_tokens=budget(task), max_lines=self.max_lines)
        return Filled(r.middle, len(self.pipe.tokenizer.encode(r.middle)), r.steps)


class PrefixOnly:
    """A model continuing the prefix alone (the AR base, or the default model's fill with suffix scoring
    off): cut to the reference's number of lines, which it is given."""

    def __init__(self, pipe, label: str, fill: Callable[[Any, InfillTask], tuple[str, int]]):
        self.pipe, self.label, self._fill = pipe, label, fill

    def fill(self, task: InfillTask) -> Filled:
        text, steps = self._fill(self.pipe, task)
        middle = first_lines(text, task.lines).lstrip(" \t")  # the prefix holds the first line's indentation
        return Filled(middle, len(self.pipe.tokenizer.encode(middle)), steps)


def ar_continuation(pipe, task: InfillTask) -> tuple[str, int]:
    lines = task.lines
    g = pipe.generate(task.prefix, max_new_tokens=budget(task), temperature=0.0,
                      stop=["\n"] if lines == 1 else [])
    return g.text, g.steps or g.nfe


def denoised_fill(pipe, task: InfillTask) -> tuple[str, int]:
    r = pipe.infill(task.prefix, task.suffix, max_new_tokens=budget(task), suffix_scoring=False)
    return r.middle, r.steps


# --- scoring ------------------------------------------------------------------------------------------

def exact(pred: str, ref: str) -> bool:
    return [line.strip() for line in pred.strip().split("\n")] == [line.strip() for line in ref.strip().split("\n")]


@dataclass
class TaskOutcome:
    task_id: str
    middle: str
    exact: bool
    passed: bool
    tokens: int
    steps: int
    seconds: float


@dataclass
class SystemReport:
    label: str
    outcomes: list[TaskOutcome] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(o.passed for o in self.outcomes)

    def row(self) -> dict[str, Any]:
        n = max(len(self.outcomes), 1)
        steps = sum(o.steps for o in self.outcomes)
        return {"system": self.label, "tasks": len(self.outcomes), "passed": self.passed,
                "pass@1": self.passed / n, "exact": sum(o.exact for o in self.outcomes) / n,
                "tokens/step": sum(o.tokens for o in self.outcomes) / steps if steps else 0.0,
                "seconds": sum(o.seconds for o in self.outcomes)}


def judge(task: InfillTask, middle: str, timeout: float = 10.0) -> tuple[bool, bool]:
    """(exact match, passes the tests). An exact middle is the canonical solution: it passes unrun."""
    if exact(middle, task.middle):
        return True, True
    return False, run_program(task.program(middle), timeout=timeout).passed


def run_system(system: InfillSystem, tasks: list[InfillTask],
               on_task: Callable[[str, TaskOutcome], None] | None = None) -> SystemReport:
    report = SystemReport(system.label)
    for task in tasks:
        t0 = time.perf_counter()
        filled = system.fill(task)
        seconds = time.perf_counter() - t0
        is_exact, passed = judge(task, filled.middle)
        outcome = TaskOutcome(task.task_id, filled.middle, is_exact, passed, filled.tokens, filled.steps, seconds)
        report.outcomes.append(outcome)
        if on_task is not None:
            on_task(system.label, outcome)
    return report


def load_tasks(multi_line: bool, limit: int | None, seed: int = 0) -> list[InfillTask]:
    problems = load_problems()
    tasks = multi_line_tasks(problems, seed) if multi_line else single_line_tasks(problems)
    return subsample(tasks, limit, seed)


def reports_markdown(reports: list[SystemReport]) -> str:
    lines = ["| system | tasks | passed | pass@1 | exact match | tokens/step | seconds |", "|---|---|---|---|---|---|---|"]
    for r in reports:
        row = r.row()
        lines.append(f"| {row['system']} | {row['tasks']} | {row['passed']} | {100 * row['pass@1']:.1f}% | "
                     f"{100 * row['exact']:.1f}% | {row['tokens/step']:.2f} | {row['seconds']:.0f} |")
    return "\n".join(lines)
