"""`unmask edit FILE`, `unmask infill`, `unmask eval infill`: thin translations into unmask.edit / unmask.eval."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from unmask.cli.apps import app, eval_app
from unmask.cli.common import (BlockLength, Cache, Device, Dtype, Quantize, Seed, Steps, Temperature, Threshold,
                               console, decode_options, load_pipeline, out, policy_options, write_text)

MODEL = typer.Option(None, "--model", "-m", help="Model folder (default: the embedded model).")




def _read(file: Path) -> str:
    from unmask.edit.files import decode_text, read_text_exact

    if str(file) == "-":
        return decode_text(sys.stdin.buffer.read(), "stdin")
    return read_text_exact(file)


def _check_write_flags(in_place: bool, no_backup: bool) -> None:
    from unmask.edit import EditError

    # a flag that would silently do nothing: the user believes something happened that did not
    if no_backup and not in_place:
        raise EditError("--no-backup only applies with --in-place")


def _write(file: Path, text: str, original: str, backup: bool) -> None:
    """--in-place: rewrite FILE atomically; a failure (read-only folder, disk full) is a one-line error.
    An edit that changed nothing leaves FILE alone: no new mtime for make/watchers, no .bak."""
    from unmask.edit import EditError, write_in_place

    if text == original:
        console.print(f"[dim]{file} unchanged: nothing written[/dim]")
        return
    try:
        bak = write_in_place(file, text, backup=backup)
    except OSError as e:
        raise EditError(f"{file}: cannot write it ({e.strerror or e}); the file is unchanged") from None
    console.print(f"[dim]wrote {file}" + (f" (original in {bak})" if bak else "") + "[/dim]")


@contextlib.contextmanager
def _stream_printer(stream: bool):
    """--stream: an on_step callback showing a one-line live status of the denoising on stderr (None
    without --stream). Stopped however the edit ends: a spinner left running after an error stays on
    screen and leaves the terminal's cursor hidden."""
    if not stream:
        yield None
        return
    status = console.status("denoising …")
    status.start()

    def on_step(event):
        if event.done:
            status.stop()
        else:
            status.update(f"step {event.step} · {event.committed} tokens committed")

    try:
        yield on_step
    finally:
        status.stop()


@app.command()
@policy_options
def edit(
    file: Path = typer.Argument(..., help="Text file to edit ('-' reads stdin)."),
    model: Optional[Path] = MODEL,
    span: Optional[list[str]] = typer.Option(None, "--span", help="START:END in characters (repeatable)."),
    lines: Optional[list[str]] = typer.Option(None, "--lines", help="A-B, 1-based inclusive (repeatable)."),
    mode: str = typer.Option("spans", "--mode", help="spans | auto | instruction"),
    instruction: Optional[str] = typer.Option(None, "--instruction", "-i", help="What to do (instruction mode)."),
    strength: float = typer.Option(0.5, "--strength", help="Fraction of the text re-noised (instruction mode)."),
    flag_below: float = typer.Option(0.05, "--flag-below", "--remask-below",
                                     help="Auto mode: rewrite tokens whose probability given the rest is below this."),
    neighbors: int = typer.Option(0, "--neighbors", help="Auto mode: also re-mask this many tokens either side."),
    rounds: int = typer.Option(4, "--rounds", help="Auto mode: at most this many correction rounds."),
    extra_tokens: Optional[int] = typer.Option(None, "--extra-tokens", help="Masks beyond a region's own size."),
    length: str = typer.Option("absorb", "--length", help="absorb | search | fixed: how a region's length is chosen."),
    diff: bool = typer.Option(False, "--diff", help="Print a unified diff instead of the edited text."),
    in_place: bool = typer.Option(False, "--in-place", help="Rewrite FILE atomically (FILE.bak kept)."),
    no_backup: bool = typer.Option(False, "--no-backup", help="With --in-place: do not keep FILE.bak."),
    stream: bool = typer.Option(False, "--stream", help="Show denoising progress on stderr."),
    block_length: BlockLength = None,
    steps: Steps = None,
    temperature: Temperature = None,
    seed: Seed = None,
    cache: Cache = None,
    device: Device = None,
    dtype: Dtype = None,
    quantize: Quantize = None,
    **policy: Any,  # --policy and the policies' knobs (policy_options)
) -> None:
    """Rewrite parts of a file in place: marked spans / lines, improbable tokens (auto), or by instruction.

    Regions come from --span, --lines or <<< >>> markers in the file. Text outside them is kept byte for byte.
    """
    from unmask.edit import EditError

    if in_place and str(file) == "-":
        raise EditError("--in-place needs a file, not stdin")
    _check_write_flags(in_place, no_backup)
    text = _read(file)
    pipe = load_pipeline(model, device, dtype, quantize)
    opts = decode_options(pipe, block_length=block_length, steps=steps, temperature=temperature, seed=seed,
                          cache=cache, **policy)
    with _stream_printer(stream) as on_step:
        result = pipe.edit(text, spans=span, lines=lines, mode=mode, instruction=instruction, strength=strength,
                           flag_below=flag_below, neighbors=neighbors, max_rounds=rounds,
                           extra_tokens=extra_tokens, length=length, options=opts, on_step=on_step)
    if diff:
        sys.stdout.write(result.diff(name=file.name if str(file) != "-" else "stdin"))
    elif not in_place:
        sys.stdout.write(result.text)
    sys.stdout.flush()
    if in_place:
        _write(file, result.text, text, backup=not no_backup)
    console.print(f"[dim]{len(result.spans)} region(s) · {result.steps} steps · NFE {result.nfe} · "
                  f"{result.seconds:.2f} s" + (f" · {result.rounds} round(s)" if mode == "auto" else "")
                  + (f" · {result.tokens_per_step:.2f} tokens/step" if result.tokens else "") + "[/dim]")


@app.command()
@policy_options
def infill(
    file: Optional[Path] = typer.Argument(None, help="File holding the marker where text goes ('-' = stdin)."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="Text before the gap (instead of FILE)."),
    suffix: Optional[str] = typer.Option(None, "--suffix", help="Text after the gap (instead of FILE)."),
    marker: str = typer.Option("<<<FILL>>>", "--marker", help="The gap's marker in FILE (exactly once)."),
    model: Optional[Path] = MODEL,
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Longest middle the model may write."),
    max_lines: int = typer.Option(1, "--max-lines", min=1,
                                  help="Most lines of the middle (models that read left to right)."),
    length: str = typer.Option("absorb", "--length", help="absorb | search | fixed"),
    middle_only: bool = typer.Option(False, "--middle-only", help="Print only the text written into the gap."),
    in_place: bool = typer.Option(False, "--in-place", help="Rewrite FILE atomically (FILE.bak kept)."),
    no_backup: bool = typer.Option(False, "--no-backup", help="With --in-place: do not keep FILE.bak."),
    stream: bool = typer.Option(False, "--stream", help="Show denoising progress on stderr."),
    block_length: BlockLength = None,
    steps: Steps = None,
    temperature: Temperature = None,
    seed: Seed = None,
    cache: Cache = None,
    device: Device = None,
    dtype: Dtype = None,
    quantize: Quantize = None,
    **policy: Any,  # --policy and the policies' knobs (policy_options)
) -> None:
    """Fill the gap between a prefix and a suffix; the model picks the length (up to --max-new-tokens)."""
    from unmask.edit import EditError

    if file is not None:
        if prefix is not None or suffix is not None:
            raise EditError("give FILE with a marker or --prefix/--suffix, not both")
        text = _read(file)
        if text.count(marker) != 1:
            raise EditError(f"{file}: the marker {marker!r} must occur exactly once, found {text.count(marker)}")
        prefix, suffix = text.split(marker)
    elif prefix is None and suffix is None:
        raise EditError("give FILE with a marker, or --prefix and/or --suffix")
    if in_place and (file is None or str(file) == "-"):
        raise EditError("--in-place needs FILE")
    _check_write_flags(in_place, no_backup)
    if in_place and middle_only:
        raise EditError("--middle-only prints the middle; with --in-place the whole file is written")
    pipe = load_pipeline(model, device, dtype, quantize)
    opts = decode_options(pipe, block_length=block_length, steps=steps, temperature=temperature, seed=seed,
                          cache=cache, **policy)
    with _stream_printer(stream) as on_step:
        result = pipe.infill(prefix or "", suffix or "", max_new_tokens=max_new_tokens, length=length,
                             options=opts, on_step=on_step, max_lines=max_lines)
    if in_place:
        _write(file, result.text, text, backup=not no_backup)
    else:  # a terminal also gets a final newline, so the statistics below start on a line of their own
        write_text(result.middle if middle_only else result.text)
    budget = "tokens chosen" if length == "search" else "token budget"  # search reports the length it picked
    console.print(f"[dim]{result.lengths[0]} {budget} · {result.steps} steps · NFE {result.nfe} · "
                  f"{result.seconds:.2f} s[/dim]")


@eval_app.command("infill")
@policy_options
def eval_infill(
    model: Optional[Path] = typer.Argument(None, help="Diffusion model folder (default: the embedded model)."),
    ar_model: Optional[Path] = typer.Option(None, "--ar-model", help="Causal twin folder (given the prefix only)."),
    data: Optional[str] = typer.Option(None, "--data",
                                       help="Folder of held-out source files, or an importable package name."),
    humaneval: bool = typer.Option(False, "--humaneval", help="HumanEval infilling, judged by the tests."),
    multi_line: bool = typer.Option(False, "--multi-line", help="With --humaneval: gaps of 2-5 lines."),
    systems: str = typer.Option("suffix,ar,denoised", "--systems",
                                help="With --humaneval: which systems run (comma-separated)."),
    limit: int = typer.Option(50, "--limit", min=1, help="Number of masked lines (distinct; fewer if the data has "
                                                          "fewer); with --humaneval, tasks drawn from all."),
    length: Optional[list[str]] = typer.Option(None, "--length",
                                               help="Diffusion length modes to report: oracle absorb search "
                                                    "(repeatable; default oracle + absorb)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Budget for the middle (absorb/search, AR)."),
    context_lines: int = typer.Option(40, "--context-lines", help="Lines of prefix and of suffix kept."),
    pattern: str = typer.Option("*.py", "--pattern", help="Files to read from a folder."),
    seed: int = typer.Option(0, "--seed", help="Picks the lines (and seeds sampling)."),
    block_length: BlockLength = 32,
    steps: Steps = None,
    threshold: Threshold = 0.9,  # policy: threshold (DecodeOptions), or fixed when --steps is given
    cache: Cache = "prefix",
    device: Device = None,
    dtype: Dtype = None,
    quantize: Quantize = None,
    **policy: Any,  # --policy and the policies' knobs (policy_options)
) -> None:
    """Mask one random line of held-out code, infill it; exact match and token accuracy vs the AR twin.

    --humaneval: HumanEval's canonical solutions with a line (or 2-5 lines) cut out; pass@1 by the tests, for
    the model with the suffix, the AR base (--ar-model, default smollm2) with the prefix only, and the model
    with suffix scoring off. --limit subsamples the tasks (seeded)."""
    from unmask.eval.infill import infill_table, make_samples, run_infill_eval

    if humaneval:
        from unmask.cli.infill_humaneval import run_humaneval_infill

        run_humaneval_infill(model, ar_model, multi_line, limit, seed, device, dtype, quantize,
                             systems=[name.strip() for name in systems.split(",") if name.strip()])
        return
    if model is None or data is None:
        from unmask.edit import EditError

        raise EditError("give a model folder and --data (or --humaneval)")

    opts = decode_options(block_length=block_length, steps=steps, threshold=threshold, seed=seed, cache=cache,
                          **policy)
    pipe = load_pipeline(model, device, dtype, quantize)
    ar_pipe = load_pipeline(ar_model, device, dtype, quantize) if ar_model is not None else None
    samples = make_samples(data, limit, seed=seed, context_lines=context_lines, pattern=pattern)
    with console.status(f"infilling {len(samples)} lines …"):
        rows = run_infill_eval(pipe, samples, ar_pipe=ar_pipe, lengths=length or ["oracle", "absorb"],
                               max_new_tokens=max_new_tokens, options=opts)
    out.print(infill_table(rows, title=f"infill: {len(samples)} masked lines from {data}"))
