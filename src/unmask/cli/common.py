"""Helpers shared by command modules: model loading with a spinner, option parsing, rich output."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)
out = Console(soft_wrap=True)  # tables and reports; a result's text goes through write_text


def write_text(text: str) -> None:
    """A result's text on stdout, byte for byte: no wrapping at the console's width, no padding, tabs kept.
    A terminal also gets a final newline when the text lacks one, so the statistics that follow on stderr
    start on a line of their own; a pipe or a file gets exactly `text`."""
    sys.stdout.write(text)
    if text and not text.endswith("\n") and sys.stdout.isatty():
        sys.stdout.write("\n")
    sys.stdout.flush()


def stats_line(result) -> str:
    """The statistics every decoding command prints after its text (on stderr): generate and chat alike."""
    return (f"{len(result.tokens)} tokens · {result.steps} steps · NFE {result.nfe} · "
            f"{result.tokens_per_step:.2f} tokens/step · {result.tokens_per_second:.1f} tokens/s")


def print_stats(result) -> None:
    console.print(stats_line(result), style="dim", markup=False, highlight=False)


def default_model_path(model: Path | None) -> Path:
    """The model a command uses: the one named, else the embedded default (as `unmask.load()`)."""
    from unmask.pipeline import DEFAULT_MODEL

    return model if model is not None else DEFAULT_MODEL


def load_pipeline(model: Path | None, device: str | None = None, dtype: str | None = None,
                  quantize: str | None = None):
    import unmask

    with console.status(f"loading {model or 'default model'} …"):
        return unmask.load(model, device=device, dtype=dtype, quantize=quantize)


# Decoding options shared by every command that decodes (generate, chat, humaneval, edit, infill).
import inspect  # noqa: E402
from typing import Annotated, Any, Callable, Optional  # noqa: E402

import typer  # noqa: E402

from unmask.decoding.params import Param  # noqa: E402
from unmask.decoding.policies import POLICIES, declared_params, param_problem  # noqa: E402

# None = not given: the model's generation_config.json decides, then DecodeOptions' defaults.
MaxNewTokens = Annotated[Optional[int], typer.Option("--max-new-tokens", "-n", help="New tokens (masked positions).")]
BlockLength = Annotated[Optional[int], typer.Option("--block-length", help="Masked positions decoded together.")]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Total denoising steps (the fixed policy: "
                                                               "implies --policy fixed unless --policy is given).")]


def policy_option() -> Any:
    """--policy, naming the registered policies (decoding/policies.py's POLICIES)."""

    def check(value: Optional[str]) -> Optional[str]:
        if value is not None and value not in POLICIES:
            raise typer.BadParameter(f"policy must be one of {', '.join(POLICIES)}, got {value!r}")
        return value

    return Annotated[Optional[str], typer.Option("--policy", help=" | ".join(POLICIES), callback=check)]


def param_option(param: Param) -> Any:
    """The option of a policy's declared knob: its flag, help and range from the declaration; a value out of
    range is a usage error (exit 2) naming the policy and the knob, before any model is loaded."""
    users = [name for name, cls in POLICIES.items() if param in cls.params]
    owner = f"{' and '.join(users)} {'policy' if len(users) == 1 else 'policies'}"

    def check(value: Any) -> Any:
        problem = None if value is None else param_problem(param.name, value)
        if problem:
            raise typer.BadParameter(problem)
        return value

    text = f"{param.help} ({owner}; {param.bounds()})"
    return Annotated[Optional[param.kind], typer.Option(param.flag, help=text, callback=check)]


Policy = policy_option()
Threshold = param_option(declared_params()["threshold"])  # for commands with a threshold default of their own
Temperature = Annotated[Optional[float], typer.Option("--temperature")]
TopP = Annotated[Optional[float], typer.Option("--top-p")]
Seed = Annotated[Optional[int], typer.Option("--seed")]
Cache = Annotated[Optional[str], typer.Option("--cache", help="none | prefix | dual")]
FrequencyPenalty = Annotated[float, typer.Option("--frequency-penalty",
                                                 help="As OpenAI: -2..2; > 0 counters repetition loops.")]
Heal = Annotated[bool, typer.Option("--heal/--no-heal", help="Token healing: re-decode the prompt's last token.")]
Device = Annotated[Optional[str], typer.Option("--device", help="cpu | cuda | cuda:1 … (default: cuda if present)")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="auto | float32 | bfloat16 | float16 (auto: bf16 for "
                                              "diffusion models on CPUs with native bf16, else as stored)")]
Quantize = Annotated[Optional[str], typer.Option("--quantize", help="auto (default: a GGUF's 4-bit layers stay "
                                                 "int4 on a CPU) | none | int4 | int4-g64 | int4-g128 | int8 | fp8 "
                                                 "(fp8 needs a Hopper GPU to be fast)")]


def policy_options(command: Callable) -> Callable:
    """Gives a command --policy and an option per knob the registered policies declare (--threshold,
    --factor, --entropy-bound, ...), except those it declares itself. The command takes them as `**policy`
    and hands them to decode_options, so a new policy's knob reaches every decoding command unwritten.
    Typer builds a command from its signature: this one shows the options in place of `**policy`."""
    own = inspect.signature(command, eval_str=True)
    kept = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert len(kept) < len(own.parameters), f"{command.__name__} takes the policy options as **policy"
    options = {"policy": policy_option(), **{name: param_option(p) for name, p in declared_params().items()}}
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
             for name, annotation in options.items() if name not in {p.name for p in kept}]

    command.__signature__ = own.replace(parameters=kept + added)
    command.__annotations__ = {p.name: p.annotation for p in kept + added}
    return command


def decode_options(pipe=None, **values):
    """DecodeOptions from the shared CLI options: the flags given (not None) over the model's recommended
    decoding (`pipe.defaults`, from its generation_config.json) — or over the built-in defaults without a
    pipe (benchmarks that must decode the same way for every model)."""
    from unmask.decoding.options import DecodeOptions

    given = {k: v for k, v in values.items() if v is not None}
    if "steps" in given and "policy" not in given:
        given["policy"] = "fixed"  # only the fixed policy takes a step budget: under threshold --steps did nothing
    return pipe.options(**given) if pipe is not None else DecodeOptions().replace(**given)
