"""`unmask convert FILE.gguf OUT/`: a GGUF file (llama.cpp) as one of our model folders."""

from __future__ import annotations

from pathlib import Path

import typer

from unmask.cli.apps import app
from unmask.cli.common import Dtype, console


@app.command()
def convert(
    file: Path = typer.Argument(..., help="GGUF file (llama, llada, llada-moe or dream architecture)."),
    out_dir: Path = typer.Argument(..., help="Folder to write (config.json, model.safetensors, tokenizer files)."),
    dtype: Dtype = None,
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists."),
) -> None:
    """Dequantize a GGUF file into a model folder that `unmask.load` reads (float32 unless --dtype)."""
    import time

    from unmask.model.gguf import convert_gguf
    from unmask.pipeline import parse_dtype

    t0 = time.perf_counter()
    with console.status(f"converting {file} …"):
        convert_gguf(file, out_dir, dtype=parse_dtype(dtype), replace=force)
    console.print(f"[green]wrote {out_dir}[/green] [dim]({time.perf_counter() - t0:.1f} s)[/dim]")
