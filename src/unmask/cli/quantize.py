"""`unmask quantize MODEL OUT/` (a quantized copy of a model) and `unmask eval kl MODEL` (how far it drifts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from unmask.cli.apps import app, eval_app
from unmask.cli.common import Device, Dtype, Quantize, console, load_pipeline, out


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="Model folder, .gguf file or named base (e.g. smollm2)."),
    out_dir: Path = typer.Argument(..., help="Folder to write: config.json records the scheme."),
    scheme: str = typer.Option("int8", "--scheme", help="int8 | fp8 | int4 (= int4-g32) | int4-g64 | int4-g128"),
    dtype: Dtype = None,
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it holds a model."),
) -> None:
    """Write a copy of MODEL with its weights quantized (loads quantized, no flag needed)."""
    from unmask.errors import UnmaskError
    from unmask.model.quantize import scheme_named

    scheme_named(scheme)  # an unknown scheme fails before the model loads
    if (out_dir / "config.json").exists() and not force:
        raise UnmaskError(f"{out_dir} already holds a model (use --force to replace it)")
    pipe = load_pipeline(model, "cpu", dtype, scheme)
    with console.status(f"writing {out_dir} …"):
        pipe.save(out_dir)
        keep_generation_config(pipe.path, out_dir)
    size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    console.print(f"[green]wrote {out_dir}[/green] [dim]({scheme}, {size / 2**20:.1f} MiB of weights)[/dim]")


def keep_generation_config(source: Optional[Path], out_dir: Path) -> None:
    """The copy recommends the decoding the model does: its generation_config.json, copied whole. Saving
    writes only the options that differ from the built-in defaults, which dropped the ones that happen to
    equal them (`cache`, `max_new_tokens`) and the keys that are not options (`eos_token_id`)."""
    import shutil

    from unmask.decoding.options import GENERATION_CONFIG

    if source is not None and (source / GENERATION_CONFIG).is_file():
        shutil.copyfile(source / GENERATION_CONFIG, out_dir / GENERATION_CONFIG)


@eval_app.command("kl")
def kl(
    model: Optional[Path] = typer.Argument(None, help="Model folder, .gguf file or named base (default: the default model)."),
    quantize: Quantize = None,
    dtype: Dtype = None,
    reference_dtype: str = typer.Option("float32", "--reference-dtype", help="The reference's compute dtype."),
    window: int = typer.Option(256, "--window", min=2, help="Tokens per scored window."),
    max_windows: int = typer.Option(16, "--max-windows", min=1),
    device: Device = None,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """KL divergence of MODEL's token distributions, as --quantize / --dtype change it, from the unquantized
    reference on held-out code (CPython's json, textwrap, heapq, bisect, shlex and csv modules)."""
    from unmask.eval.divergence import divergence, held_out_code

    reference = load_pipeline(model, device, reference_dtype)
    candidate = load_pipeline(model, device, dtype, quantize)
    tokens: list[int] = []
    for text in held_out_code():
        tokens += reference.encode(text) + [reference.config.eos_id]
    with console.status(f"scoring {min(len(tokens), window * max_windows):,} tokens …"):
        d = divergence(reference.model, candidate.model, tokens, window=window, max_windows=max_windows)
    label = f"{str(candidate.model.dtype).removeprefix('torch.')}" + (f", {quantize}" if quantize else "")
    if as_json:
        out.print_json(json.dumps({"model": str(model or "default"), "candidate": label, "reference": reference_dtype,
                                   **d.as_dict()}))
        return
    out.print(f"{label} vs {reference_dtype}: KL {d.kl:.5f} nats/token · top-1 agreement {d.top1_agreement:.2%} · "
              f"{d.positions:,} {d.mode} positions")
