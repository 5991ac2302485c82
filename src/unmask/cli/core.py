"""`unmask generate`, `unmask info`, `unmask demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from unmask.cli.apps import app
from unmask.cli.common import console, load_pipeline, out


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="Text to continue."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder (default: the embedded model)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    block_length: int = typer.Option(32, "--block-length"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Total denoising steps (fixed policy)."),
    policy: str = typer.Option("threshold", "--policy", help="fixed | threshold | factor"),
    threshold: float = typer.Option(0.9, "--threshold"),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
) -> None:
    """Continue a prompt with a diffusion model (or AR-decode a causal twin)."""
    from unmask.decoding.options import DecodeOptions

    opts = DecodeOptions(max_new_tokens=max_new_tokens, block_length=block_length, steps=steps, policy=policy,
                         threshold=threshold, temperature=temperature, top_p=top_p, seed=seed)
    pipe = load_pipeline(model, device, dtype)
    result = pipe.generate(prompt, opts)
    out.print(prompt + result.text, markup=False, highlight=False)
    console.print(f"[dim]{len(result.tokens)} tokens · {result.steps} steps · NFE {result.nfe} · "
                  f"{result.tokens_per_step:.2f} tokens/step · {result.tokens_per_second:.1f} tokens/s[/dim]")


@app.command()
def info(model: Path = typer.Argument(..., help="Model folder.")) -> None:
    """Print a model's config, parameter count and special ids."""
    from rich.table import Table

    from unmask.model.checkpoints import read_config, weight_files

    config, family, _ = read_config(model)
    weight_files(model)  # fails clearly on missing/corrupt shards
    table = Table(title=str(model), show_header=False)
    table.add_row("family", family.name)
    table.add_row("parameters", f"{config.num_params():,}")
    for key, value in config.to_dict().items():
        if key != "extra":
            table.add_row(key, str(value))
    out.print(table)
