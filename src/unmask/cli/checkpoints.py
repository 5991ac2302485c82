"""`unmask chat [MODEL]` (chat with a checkpoint, in its own template) and `unmask eval humaneval [MODEL]`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from unmask.cli.apps import app, eval_app
from unmask.cli.common import (BlockLength, Cache, Device, Dtype, MaxNewTokens, Quantize, Seed, Steps, Temperature,
                               TopP, console, decode_options, load_pipeline, out, policy_options, print_stats,
                               write_text)


def template_variables(pairs: list[str]) -> dict[str, Any]:
    """--template-var KEY=VALUE pairs -> template variables; VALUE is JSON when it parses (false, 3, [..])."""
    import json

    from unmask.errors import UnmaskError

    variables: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier() or key in ("messages", "add_generation_prompt"):
            raise UnmaskError(f"--template-var {pair!r}: expected KEY=VALUE with KEY a variable name other than "
                              "messages and add_generation_prompt")
        try:
            variables[key] = json.loads(value)
        except json.JSONDecodeError:
            variables[key] = value
    return variables


@app.command()
@policy_options
def chat(
    model: Optional[Path] = typer.Argument(None, help="Model folder (ours, LLaDA, Dream or a block-diffusion Qwen; "
                                                       "default: the embedded model)."),
    message: Optional[str] = typer.Option(None, "--message", help="Send one message, print the reply and exit."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    max_new_tokens: MaxNewTokens = 256,
    block_length: BlockLength = None,
    steps: Steps = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    seed: Seed = None,
    cache: Cache = None,
    show_prompt: bool = typer.Option(False, "--show-prompt", help="Print each formatted prompt (to stderr)."),
    template_var: Optional[list[str]] = typer.Option(None, "--template-var", metavar="KEY=VALUE",
                                           help="A chat template variable (VALUE as JSON, else a string), "
                                                "e.g. enable_thinking=false for Qwen3-based models. Repeatable."),
    device: Device = None,
    dtype: Dtype = None,
    quantize: Quantize = None,
    **policy: Any,  # --policy and the policies' knobs (policy_options)
) -> None:
    """Chat with a model, prompts formatted with the checkpoint's chat template. /reset clears, /exit quits."""
    from rich.prompt import Prompt

    from unmask.chat import ChatSession
    from unmask.errors import UnmaskError

    pipe = load_pipeline(model, device, dtype, quantize)
    options = decode_options(pipe, max_new_tokens=max_new_tokens, block_length=block_length, steps=steps,
                             temperature=temperature, top_p=top_p, seed=seed, cache=cache, **policy)
    session = ChatSession(pipe, options, system=system, template_variables=template_variables(template_var or []))

    def turn(text: str) -> None:
        with console.status("denoising …"):
            reply = session.send(text)
        if show_prompt:
            console.print(reply.prompt, markup=False, highlight=False, style="dim")
        write_text(reply.reply + "\n")
        print_stats(reply.result)

    if message is not None:
        turn(message)
        return
    console.print(f"[bold]{model or 'default model'}[/bold] · /reset clears the conversation, /exit (or Ctrl-D) quits")
    while True:
        try:
            text = Prompt.ask("[bold cyan]you[/bold cyan]", console=console)
        except EOFError:
            break
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            session.reset()
            console.print("[dim]conversation cleared[/dim]")
            continue
        if not text.strip():
            continue
        try:
            turn(text)
        except UnmaskError as e:  # e.g. the conversation no longer fits the context: say so, keep the REPL
            console.print(f"[red]error:[/red] {e} (try /reset)")


@eval_app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                  add_help_option=False)
def eval_lm_eval(ctx: typer.Context) -> None:
    """lm-evaluation-harness with unmask models: every argument goes to lm_eval, e.g.
    `unmask eval lm-eval --model unmask --model_args pretrained=PATH,mc_samples=64 --tasks hellaswag`."""
    from unmask.eval.lm_eval import run_harness_cli

    run_harness_cli(list(ctx.args))


@eval_app.command("humaneval")
@policy_options
def humaneval(
    model: Optional[Path] = typer.Argument(None, help="Model folder (default: the embedded model)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N problems."),
    max_new_tokens: MaxNewTokens = 256,
    block_length: BlockLength = None,
    steps: Steps = None,
    temperature: Temperature = 0.0,
    top_p: TopP = None,
    seed: Seed = 0,
    cache: Cache = None,
    chat_format: bool = typer.Option(False, "--chat", help="Ask in the chat template (instruct models)."),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help="Seconds per program in the sandbox."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write one JSON line per problem."),
    batch_size: int = typer.Option(1, "--batch-size", min=1,
                                   help="Problems generated together (same answers; tokens/s over the wall time)."),
    device: Device = None,
    dtype: Dtype = None,
    quantize: Quantize = None,
    **policy: Any,  # --policy and the policies' knobs (policy_options)
) -> None:
    """HumanEval pass@1 with tokens/s and NFE per problem (generated code runs in a sandboxed subprocess)."""
    from rich.table import Table

    from unmask.eval.humaneval import load_problems, run_humaneval

    problems = load_problems(limit)
    pipe = load_pipeline(model, device, dtype, quantize)
    # greedy unless --temperature (pass@1 of one deterministic answer); the rest from the model's defaults
    options = decode_options(pipe, max_new_tokens=max_new_tokens, block_length=block_length, steps=steps,
                             temperature=temperature, top_p=top_p, seed=seed, cache=cache, **policy)
    table = Table(title=f"HumanEval · {model or 'default model'}")
    for col in ("task", "result", "tokens", "NFE", "tokens/s", "detail"):
        table.add_column(col, justify="right" if col in ("tokens", "NFE", "tokens/s") else "left")
    done = [0]

    def progress(r) -> None:
        done[0] += 1
        mark = "[green]pass[/green]" if r.passed else f"[red]{r.result}[/red]"
        console.print(f"[dim]{done[0]}/{len(problems)}[/dim] {r.task_id} {mark} · {r.new_tokens} tokens · "
                      f"NFE {r.nfe} · {r.tokens_per_second:.1f} tokens/s")
        table.add_row(r.task_id, "pass" if r.passed else r.result, str(r.new_tokens), str(r.nfe),
                      f"{r.tokens_per_second:.1f}", r.detail[:40])

    report = run_humaneval(pipe, options, problems=problems, chat=chat_format, timeout=timeout, on_result=progress,
                           out=out_file, batch_size=batch_size)
    s = report.summary()
    out.print(table)
    out.print(f"pass@1 {s['pass@1']:.3f} ({s['passed']}/{s['problems']}) · {s['tokens_per_second']:.1f} tokens/s · "
              f"mean NFE {s['mean_nfe']:.1f} · mean {s['mean_new_tokens']:.1f} new tokens")
    if out_file is not None:
        console.print(f"[dim]per-problem results: {out_file}[/dim]")
