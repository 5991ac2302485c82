"""Helpers shared by command modules: model loading with a spinner, option parsing, rich output."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

console = Console(stderr=True)
out = Console()


def load_pipeline(model: Path | None, device: str | None = None, dtype: str | None = None,
                  quantize: str | None = None):
    import unmask

    with console.status(f"loading {model or 'default model'} …"):
        return unmask.load(model, device=device, dtype=dtype, quantize=quantize)


# Decoding options shared by every command that decodes (generate, chat, humaneval, edit, infill).
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

# None = not given: the model's generation_config.json decides, then DecodeOptions' defaults.
MaxNewTokens = Annotated[Optional[int], typer.Option("--max-new-tokens", "-n", help="New tokens (masked positions).")]
BlockLength = Annotated[Optional[int], typer.Option("--block-length", help="Masked positions decoded together.")]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Total denoising steps (the fixed policy: "
                                                               "implies --policy fixed unless --policy is given).")]
Policy = Annotated[Optional[str], typer.Option("--policy", help="fixed | threshold | factor | eb | leftmost | verify")]
Threshold = Annotated[Optional[float], typer.Option("--threshold", help="Confidence threshold of the threshold policy.")]
EntropyBound = Annotated[Optional[float], typer.Option("--entropy-bound", help="γ of the eb policy: the error "
                                                       "(-log confidence) a step may add beyond its surest token.")]
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
Quantize = Annotated[Optional[str], typer.Option("--quantize", help="int8 | fp8: quantize the weights per output row "
                                                 "(fp8 needs a Hopper GPU to be fast)")]


def decode_options(pipe=None, **values):
    """DecodeOptions from the shared CLI options: the flags given (not None) over the model's recommended
    decoding (`pipe.defaults`, from its generation_config.json) — or over the built-in defaults without a
    pipe (benchmarks that must decode the same way for every model)."""
    from unmask.decoding.options import DecodeOptions

    given = {k: v for k, v in values.items() if v is not None}
    if "steps" in given and "policy" not in given:
        given["policy"] = "fixed"  # only the fixed policy takes a step budget: under threshold --steps did nothing
    return pipe.options(**given) if pipe is not None else DecodeOptions(**given)
