"""HumanEval infilling tasks (eval/infill_humaneval.py): the gaps are cut from the canonical solutions as the
FIM papers cut them, a filled solution is judged by the problem's tests, and the command refuses unknown
systems before loading anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from unmask.eval.humaneval import load_problems
from unmask.eval.infill_humaneval import judge, multi_line_tasks, single_line_tasks, subsample

UNMASK = Path(sys.executable).parent / "unmask"


def test_every_non_blank_solution_line_is_one_task_and_the_pieces_are_the_solution():
    problems = load_problems()
    tasks = single_line_tasks(problems)
    assert len(tasks) == sum(1 for p in problems for line in p["canonical_solution"].split("\n") if line.strip())
    for t in tasks[:200]:
        assert t.prefix + t.middle + t.suffix == t.problem["prompt"] + t.problem["canonical_solution"]
        assert t.lines == 1 and t.middle == t.middle.strip()  # its indentation stays in the prefix
    spans = multi_line_tasks(problems, seed=1)
    assert all(2 <= sum(1 for line in t.middle.split("\n") if line.strip()) <= 5 for t in spans)
    assert [t.task_id for t in spans] == [t.task_id for t in multi_line_tasks(problems, seed=1)]
    assert [t.task_id for t in subsample(tasks, 5, seed=2)] == [t.task_id for t in subsample(tasks, 5, seed=2)]


def test_the_canonical_middle_passes_and_a_wrong_one_fails_the_tests():
    task = next(t for t in single_line_tasks(load_problems()) if t.middle.startswith("return "))
    assert judge(task, task.middle) == (True, True)
    assert judge(task, "return None") == (False, False)


def test_unknown_systems_are_refused_by_name():
    proc = subprocess.run([str(UNMASK), "eval", "infill", "--humaneval", "--systems", "suffix,gpt"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "gpt" in proc.stderr and "suffix, ar, denoised" in proc.stderr
