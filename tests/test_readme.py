"""The README's commands run as written: every ```bash and ```python block is extracted and run, in a
folder laid out as a fresh clone (the repository's files, no data/ or runs/), one block after another as a
reader would. A block preceded by `<!-- readme-check: skip REASON -->` is left out, with its reason.

    .venv/bin/python -m pytest -q tests/test_readme.py     # slow: trains the tiny model, loads the default
    .venv/bin/python tests/test_readme.py                  # the same, printing each block's output
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"(?:<!-- readme-check: skip (?P<skip>[^>]*?) -->\n)?```(?P<lang>bash|python)\n(?P<code>.*?)```",
                   re.S)
CLONE = (".venv", "Makefile", "pyproject.toml", "README.md", "docs", "models", "recipes", "src", "tests")
SECONDS_PER_BLOCK = 1800


@dataclass
class Block:
    section: str
    lang: str
    code: str
    skip: str | None

    @property
    def name(self) -> str:
        return f"{self.section} ({self.lang})"


def readme_blocks(text: str | None = None) -> list[Block]:
    """Each ```bash / ```python block of the README, with the heading of its section."""
    text = README.read_text(encoding="utf-8") if text is None else text
    blocks = []
    for match in FENCE.finditer(text):
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        blocks.append(Block(headings[-1] if headings else "top", match["lang"], match["code"], match["skip"]))
    return blocks


def fresh_clone(folder: Path) -> Path:
    """`folder` laid out as a clone with `make` run: the repository's files (linked), nothing generated."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in CLONE:
        if (ROOT / name).exists() and not (folder / name).exists():
            (folder / name).symlink_to(ROOT / name)
    return folder


def run_block(block: Block, folder: Path) -> subprocess.CompletedProcess:
    """Run a block in `folder`: bash stops at the first failing command; python runs with the venv's."""
    if block.lang == "bash":
        argv = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    else:
        argv = [str(ROOT / ".venv" / "bin" / "python"), "-c", block.code]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=SECONDS_PER_BLOCK)


def test_the_readme_has_blocks_to_run():
    blocks = readme_blocks()
    assert any(b.skip is None and b.lang == "bash" for b in blocks)
    assert any(b.skip is None and b.lang == "python" for b in blocks)
    assert all(b.skip.strip() for b in blocks if b.skip is not None), "a skipped block says why"


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return fresh_clone(tmp_path_factory.mktemp("clone"))


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.parametrize("block", readme_blocks(), ids=lambda b: b.name)
def test_readme_block_runs_as_written(block: Block, clone: Path):
    if block.skip is not None:
        pytest.skip(block.skip)
    done = run_block(block, clone)
    assert done.returncode == 0, f"{block.name} failed:\n{block.code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


def main() -> int:
    import tempfile

    folder = fresh_clone(Path(tempfile.mkdtemp(prefix="readme-")))
    failed = 0
    for block in readme_blocks():
        print(f"=== {block.name}" + (f": skipped ({block.skip})" if block.skip else ""), flush=True)
        if block.skip:
            continue
        done = run_block(block, folder)
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        if done.returncode != 0:
            failed += 1
            print(f"=== {block.name}: FAILED (exit {done.returncode})", flush=True)
    print(f"{failed} block(s) failed; ran in {folder}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
