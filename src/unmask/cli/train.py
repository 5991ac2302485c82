"""`unmask train`, `unmask eval elbo`, `unmask bench train`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import typer

from unmask.cli.apps import app, bench_app, eval_app
from unmask.cli.common import Quantize, console, out
from unmask.decoding.layout import layout_for


@app.command()
def train(
    config: Path = typer.Option(..., "--config", "-c", help="Training recipe (YAML)."),
    overrides: List[str] = typer.Option([], "--set", help="Override a key: --set optim.lr=1e-3 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from out_dir/checkpoints/latest."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train a model (diffusion | ar | sft) from a YAML recipe; run under torchrun for DDP / FSDP2."""
    from rich.logging import RichHandler

    from unmask.train import distributed as dist_utils
    from unmask.train.config import load_config
    from unmask.train.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    cfg = load_config(config, overrides)
    try:
        trainer = Trainer(cfg, resume=resume, progress=not quiet)
        if trainer.dist.is_main:
            c = trainer.model.config
            console.print(f"[bold]{cfg.mode}[/bold] · {c.num_params():,} parameters · {c.attention} · "
                          f"{trainer.train_data.n:,} training sequences of {cfg.seq_len} · "
                          f"{trainer.dist.world_size} process(es) on {trainer.device}")
        metrics = trainer.fit()
        if trainer.dist.is_main:
            shown = ", ".join(f"{k} {v:,.4f}" for k, v in metrics.items() if k != "step")
            out.print(f"{cfg.out_dir}: step {trainer.step}, {shown}")
    finally:
        dist_utils.cleanup()


@eval_app.command("elbo")
def elbo(
    model: Path = typer.Argument(..., help="Model folder."),
    data: Path = typer.Option(..., "--data", help="Corpus folder (its val.jsonl), .jsonl, .txt or .bin shard."),
    split: str = typer.Option("val", "--split", help="Split of a corpus folder: val | train."),
    seq_len: int = typer.Option(512, "--seq-len", min=1, help="Window length in tokens (capped by the model context)."),
    samples: int = typer.Option(8, "--samples", min=1, help="Monte-Carlo samples per window (diffusion ELBO)."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", min=1, help="Score at most this many windows."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    quantize: Quantize = None,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Bits per byte of held-out text: diffusion ELBO (upper bound) or the AR twin's exact NLL."""
    from unmask.cli.common import load_pipeline
    from unmask.data.corpus import iter_corpus_texts
    from unmask.data.shards import ShardError, TokenShard, tokenizer_digest
    from unmask.eval.elbo import evaluate_bits_per_byte, token_stream

    if split not in ("val", "train"):
        raise typer.BadParameter(f"{split!r} is not val or train", param_hint="--split")
    if not data.exists():
        raise ShardError(f"no such data: {data}")
    pipe = load_pipeline(model, device, dtype, quantize)
    if data.suffix == ".bin":
        shard = TokenShard.open(data)
        if shard.meta.get("tokenizer_sha256") not in (None, tokenizer_digest(pipe.tokenizer)):
            raise ShardError(f"{data} was tokenized with another tokenizer than {model}'s")
        tokens = shard.tokens
    else:
        tokens = token_stream(iter_corpus_texts(data, split), pipe.tokenizer)
    if len(tokens) < 2:
        raise ShardError(f"no text to score in {data}" + (f" ({split} split)" if data.is_dir() else ""))
    autocast = None
    if pipe.device.type == "cuda":
        import torch

        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    with console.status(f"scoring {len(tokens):,} tokens …"):
        r = evaluate_bits_per_byte(pipe.model, pipe.tokenizer, tokens, seq_len=seq_len, n_samples=samples,
                                   max_windows=max_windows, batch_size=batch_size, seed=seed, autocast=autocast)
    if as_json:
        out.print_json(json.dumps({"model": str(model), "data": str(data), **r.as_dict()}))
        return
    kind = "exact NLL (causal)" if r.exact else f"ELBO bound, {samples} samples"
    out.print(f"bits/byte {r.bits_per_byte:.4f} · nats/token {r.nats_per_token:.4f} · {r.tokens:,} tokens · "
              f"{r.bytes:,} bytes · {kind}")


@bench_app.command("train")
def bench_train(
    shape: Optional[str] = typer.Option(None, "--shape", help="Named model shape (model.config.SHAPES). Default: "
                                        "small-34m on a GPU, tiny on a CPU."),
    steps: int = typer.Option(20, "--steps", min=1),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed steps first (compilation)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Default: 64 on a GPU, 8 on a CPU."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1, help="Default: the shape's context."),
    mode: str = typer.Option("diffusion", "--mode", help="diffusion | ar"),
    attention: Optional[str] = typer.Option(None, "--attention", help="Override the shape's attention mode."),
    compile: bool = typer.Option(False, "--compile/--no-compile"),
    device: Optional[str] = typer.Option(None, "--device"),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="Peak FLOP/s for MFU (known GPUs: auto)."),
) -> None:
    """Training tokens/s and MFU on random tokens."""
    import torch

    from unmask.model.config import shape_config
    from unmask.pipeline import parse_device
    from unmask.train.bench import bench_train as run
    from unmask.train.bench import default_run
    from unmask.train.config import TrainConfigError

    if mode not in ("diffusion", "ar"):
        raise TrainConfigError(f"--mode must be diffusion or ar, got {mode!r}")
    dev = parse_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default_shape, default_batch = default_run(dev)
    shape, batch_size = shape or default_shape, batch_size or default_batch
    overrides = {"attention": "causal"} if mode == "ar" else {}
    if attention:
        overrides["attention"] = attention
    config = shape_config(shape, **overrides)
    layout = layout_for(config)
    if (mode == "ar") == layout.diffusion:  # as `unmask train` refuses it
        raise TrainConfigError(f"--mode {mode} cannot train {layout.name} attention")
    L = seq_len or config.max_seq_len
    need = 2 * L if layout.block_causal and mode != "ar" else L
    if need > config.max_seq_len:  # random weights: a longer context only lengthens the RoPE tables
        config = shape_config(shape, **overrides, max_seq_len=need)
    r = run(config, batch_size, L, steps=steps, warmup=warmup, mode=mode, device=str(dev),
            compile=compile, peak=peak_tflops)
    mfu = f"{100 * r.mfu:.1f}% of {r.peak_tflops:.0f} TFLOP/s" if r.mfu is not None else "n/a (give --peak-tflops)"
    out.print(f"{shape} ({r.params / 1e6:.1f}M params) {mode} {layout.name} · batch {batch_size} × {L} · "
              f"{r.device}{' · compiled' if compile else ''}")
    out.print(f"tokens/s {r.tokens_per_s:,.0f} · step {r.step_ms:.1f} ms · MFU {mfu}")
