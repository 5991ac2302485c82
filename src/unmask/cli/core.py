"""`unmask generate`, `unmask info`, `unmask demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from rich.text import Text

from unmask.cli.apps import app

from unmask.cli.common import (BlockLength, Cache, Device, Dtype, Heal, MaxNewTokens, Quantize, Seed, Steps,
                               Temperature, Threshold, TopP, console, decode_options, default_model_path,
                               load_pipeline, out, policy_options, print_stats, write_text)


@app.command()
@policy_options
def generate(
    prompt: Optional[str] = typer.Argument(None, help="Text to continue (or --input for many)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder (default: the embedded model)."),
    input_file: Optional[Path] = typer.Option(None, "--input", "-i",
                                              help="JSONL of {\"prompt\": ...} records: continue each, batched."),
    output_file: Optional[Path] = typer.Option(None, "--output", "-o",
                                               help="With --input: write the results here as JSONL (default: stdout)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="With --input: prompts decoded together."),
    max_new_tokens: MaxNewTokens = None,
    block_length: BlockLength = None,
    steps: Steps = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    seed: Seed = None,
    cache: Cache = None,
    presence_penalty: Annotated[Optional[float], typer.Option("--presence-penalty")] = None,
    frequency_penalty: Annotated[Optional[float], typer.Option("--frequency-penalty")] = None,
    heal: Heal = True,
    logprobs: Annotated[Optional[int], typer.Option(
        "--logprobs", min=0, max=20, help="With --input: each record also lists its tokens with their log-probabilities "
                                          "and this many alternatives.")] = None,
    device: Device = None,
    dtype: Dtype = None,
    quantize: Quantize = None,
    **policy: Any,  # --policy and the policies' knobs (policy_options)
) -> None:
    """Continue a prompt with a diffusion model (or AR-decode a causal twin). Options not given come from
    the model's generation_config.json (its recommended decoding), then from the built-in defaults."""
    given = dict(max_new_tokens=max_new_tokens, block_length=block_length, steps=steps, temperature=temperature,
                 top_p=top_p, seed=seed, cache=cache, presence_penalty=presence_penalty,
                 frequency_penalty=frequency_penalty, heal=heal, logprobs=logprobs, **policy)
    if (prompt is None) == (input_file is None):
        raise typer.BadParameter("give a prompt or --input FILE.jsonl, not both" if prompt is not None
                                 else "give a prompt, or --input FILE.jsonl for many", param_hint="PROMPT")
    if prompt == "":
        raise typer.BadParameter("the prompt is empty; give some text to continue", param_hint="PROMPT")
    if output_file is not None and input_file is None:
        raise typer.BadParameter("--output goes with --input", param_hint="--output")
    if logprobs is not None and input_file is None:
        raise typer.BadParameter("--logprobs goes with --input (they are written into its JSONL records)",
                                 param_hint="--logprobs")
    prompts = read_prompts(input_file) if input_file is not None else None
    pipe = load_pipeline(model, device, dtype, quantize)
    if prompts is not None:
        return generate_batch(pipe, prompts, decode_options(pipe, **given), output_file, batch_size)
    result = pipe.generate(prompt, decode_options(pipe, **given))
    write_text(prompt + result.text)
    print_stats(result)


def read_prompts(path: Path) -> list[str]:
    """The "prompt" of every record of a JSONL file; a bad line is named by its number."""
    import json

    if not path.is_file():
        raise typer.BadParameter(f"no such file: {path}", param_hint="--input")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise typer.BadParameter(f"{path}:{n}: not JSON ({e.msg})", param_hint="--input") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise typer.BadParameter(f'{path}:{n}: expected {{"prompt": "..."}}', param_hint="--input")
        prompts.append(record["prompt"])
    if not prompts:
        raise typer.BadParameter(f"{path} holds no prompts", param_hint="--input")
    return prompts


def record(pipe, prompt: str, result) -> dict:
    """One output line of `generate --input`; with logprobs, its tokens (as ids and text) and theirs."""
    rec = {"prompt": prompt, "text": result.text, "tokens": len(result.tokens), "nfe": result.nfe,
           "finish_reason": result.finish_reason}
    if result.logprobs is not None:
        decode = pipe.tokenizer.decode
        rec["logprobs"] = [{"id": t, "token": decode([t]), "logprob": lp,
                            "top": [{"id": a, "token": decode([a]), "logprob": alp} for a, alp in top]}
                           for t, lp, top in zip(result.tokens, result.logprobs, result.top_logprobs)]
    return rec


def generate_batch(pipe, prompts: list[str], options, output: Path | None, batch_size: int) -> None:
    """Continue every prompt, `batch_size` at a time; one JSONL record per prompt, in input order."""
    import json
    import time

    from rich.progress import Progress

    from unmask.decoding.generate import generate_many
    from unmask.io import atomic_path

    results = [None] * len(prompts)
    t0 = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("generate", total=len(prompts))
        for i, result in generate_many(pipe, prompts, [options] * len(prompts), max_batch=batch_size):
            results[i] = result
            bar.advance(task)
    seconds = time.perf_counter() - t0
    lines = [json.dumps(record(pipe, p, r)) + "\n" for p, r in zip(prompts, results)]
    if output is None:
        write_text("".join(lines))
    else:
        with atomic_path(output) as tmp:
            tmp.write_text("".join(lines), encoding="utf-8")
    tokens = sum(len(r.tokens) for r in results)
    console.print(f"[dim]{len(prompts)} prompts · {tokens} tokens in {seconds:.1f} s · {tokens / seconds:.1f} "
                  f"tokens/s{f' -> {output}' if output else ''}[/dim]")


@app.command()
def info(model: Optional[Path] = typer.Argument(None, help="Model folder or .gguf file (default: the embedded "
                                                                  "model).")) -> None:
    """Print a model's config, parameter count and special ids."""
    from rich.table import Table

    from unmask.model.checkpoints import read_config, weight_files
    from unmask.model.gguf import is_gguf

    model = default_model_path(model)
    config, family, raw = read_config(model)
    if not is_gguf(model):
        weight_files(model)  # fails clearly on missing/corrupt shards (a GGUF file's tensors were checked)
    table = Table(title=str(model), show_header=False)
    table.add_row("family", family.name)
    if is_gguf(model):
        for key in ("name", "license", "tensor_types"):
            if raw.get(key) is not None:
                table.add_row(key, str(raw[key]))
    table.add_row("parameters", f"{config.num_params():,}")
    if config.n_experts:
        table.add_row("active parameters", f"{config.num_params(active=True):,}")
    for key, value in config.to_dict().items():
        if key != "extra":
            table.add_row(key, str(value))
    table.add_row("on a CPU runs", _cpu_layout(model, config))
    out.print(table)


def _cpu_layout(model: Path, config) -> str:
    """What `unmask.load` makes of the weights on a CPU without --quantize / --dtype."""
    import torch

    from unmask.model.checkpoints import auto_quantization
    from unmask.model.quantize import scheme_named

    scheme = auto_quantization(model, torch.device("cpu")) or config.quantization
    if scheme is None:
        return "its stored weights (--quantize int4 | int8 to quantize)"
    activations = scheme_named(scheme).activations
    source = " (the GGUF's 4-bit blocks as they are)" if scheme == "int4-g32" and not config.quantization else ""
    return f"{scheme} weights{source}" + (f", {str(activations).removeprefix('torch.')} activations"
                                          if activations else "")


def _train_fallback_model() -> Path:
    """No embedded model in this checkout: train the tiny recipe (a minute or two on a CPU) and use it."""
    import subprocess
    import sys

    from unmask.pipeline import DEFAULT_MODEL

    root = DEFAULT_MODEL.parents[1]
    recipe, out_dir = root / "recipes" / "tiny.yaml", root / "runs" / "tiny"
    if not (out_dir / "config.json").exists():
        console.print(f"[yellow]no embedded model at {DEFAULT_MODEL}: training {recipe.name} on this CPU first[/yellow]")
        for args in (["corpus", "--recipe", str(recipe)], ["train", "--config", str(recipe)]):
            subprocess.run([sys.executable, "-m", "unmask.cli.main", *args], cwd=root, check=True)
    return out_dir


DEMO_PROMPT = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
'''


@app.command()
def demo(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder (default: the embedded model)."),
    prompt: str = typer.Option(DEMO_PROMPT, "--prompt", "-p"),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", "-n"),
    threshold: Threshold = None,  # the model's own (generation_config.json)
    # sampling and a frequency penalty come from the model's generation_config.json: small diffusion models
    # loop under greedy confidence decoding (REFERENCE.md §4); the penalty took the default model's
    # degenerate repetition from ~80 % of samples to ~2 %
    temperature: Temperature = None,
    top_p: TopP = None,
    frequency_penalty: Annotated[Optional[float], typer.Option("--frequency-penalty")] = None,
    seed: int = typer.Option(0, "--seed"),
    delay: float = typer.Option(0.05, "--delay", min=0.0, help="Seconds to hold each frame so the eye can follow."),
) -> None:
    """Complete code with the embedded model, showing the denoising live in the terminal."""
    import time

    from rich.console import Group
    from rich.live import Live
    from rich.panel import Panel

    from unmask.cli.live import render_canvas
    from unmask.pipeline import DEFAULT_MODEL

    if model is None and not (DEFAULT_MODEL / "config.json").exists():
        model = _train_fallback_model()
    pipe = load_pipeline(model)
    opts = decode_options(pipe, max_new_tokens=max_new_tokens, threshold=threshold, temperature=temperature,
                          top_p=top_p, frequency_penalty=frequency_penalty, seed=seed,
                          cache="dual")  # the fastest step in `unmask bench decode`
    shown = 0.0  # seconds spent holding frames, kept out of the speed figures

    with Live(console=out, auto_refresh=False, transient=False) as live:  # redraw per step, no refresh thread
        def show(event) -> None:
            nonlocal shown
            t0 = time.perf_counter()
            body = render_canvas(pipe.tokenizer, event.canvas, set(event.changed))  # the generated region
            if prompt.endswith("\n") and body.plain.startswith("\n"):
                body = body[1:]  # a healed prompt's newline comes back as the answer's first character
            live.update(Panel(Group(Text(prompt.rstrip("\n"), style="dim"), body),
                              title=f"denoising · step {event.step}", border_style="cyan"), refresh=True)
            time.sleep(delay)
            shown += time.perf_counter() - t0

        result = pipe.generate(prompt, opts, on_step=show)
        live.update(Panel(Group(Text(prompt.rstrip("\n"), style="dim"), Text(result.text, style="bold")),
                          title="done", border_style="green"), refresh=True)
    out.print()
    compute = max(result.seconds - shown, 1e-9)
    console.print(f"{len(result.tokens)} tokens in {result.steps} steps ({result.tokens_per_step:.2f} tokens/step), "
                  f"NFE {result.nfe}, {len(result.tokens) / compute:.1f} tokens/s (decoding only, display excluded)")
