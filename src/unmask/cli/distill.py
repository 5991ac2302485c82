"""`unmask distill` (step distillation) and `unmask eval speed-quality`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from unmask.cli.apps import app, eval_app
from unmask.cli.common import FrequencyPenalty, Temperature, TopP, console, load_pipeline, out


def _numbers(text: str, kind: type, option: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of {kind.__name__}s",
                                 param_hint=option) from None


@app.command()
def distill(
    teacher: Path = typer.Option(..., "--teacher", help="Teacher model folder (the student starts as a copy)."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder: the distilled model + checkpoints."),
    method: str = typer.Option("sdtt", "--method", help="sdtt | trajectory"),
    data: Path = typer.Option(..., "--data", help="Corpus folder (from `unmask corpus`) or a .jsonl/.txt file."),
    config: Optional[Path] = typer.Option(None, "--config", help="Training YAML for batch/lr/etc. (optional)."),
    overrides: List[str] = typer.Option([], "--set", help="Override a training key: --set optim.lr=1e-4"),
    rounds: int = typer.Option(3, "--rounds", help="sdtt: rounds, each halving the steps."),
    steps_per_round: int = typer.Option(500, "--steps-per-round"),
    teacher_steps: int = typer.Option(64, "--teacher-steps", help="sdtt: the first teacher's steps per window."),
    divergence: str = typer.Option("reverse_kl", "--divergence", help="sdtt: kl | reverse_kl"),
    prompts: int = typer.Option(256, "--prompts", help="trajectory: prompts the teacher answers."),
    prompt_source: str = typer.Option("cut", "--prompt-source",
                                      help="trajectory: cut (random windows of the data) | functions "
                                           "(signature + docstring of the data's functions)."),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens",
                                      help="trajectory: prompt length (cut) or the longest prompt (functions)."),
    answer_tokens: int = typer.Option(64, "--answer-tokens",
                                      help="trajectory: rows are prompt + answer = prompt + answer tokens."),
    entropy_weight: float = typer.Option(0.5, "--entropy-weight"),
    teacher_temperature: float = typer.Option(0.0, "--teacher-temperature",
                                              help="trajectory: sample the teacher's answers (0 = greedy)."),
    teacher_top_p: Optional[float] = typer.Option(None, "--teacher-top-p"),
    teacher_frequency_penalty: float = typer.Option(0.0, "--teacher-frequency-penalty",
                                                    help="trajectory: against loops in the teacher's answers."),
    answers_from: Optional[Path] = typer.Option(None, "--answers-from",
                                                help="trajectory: another model answers the prompts (same "
                                                     "tokenizer, e.g. the AR twin): sequence-level distillation."),
    answer_batch: int = typer.Option(32, "--answer-batch", help="trajectory: prompts answered together."),
    steps: int = typer.Option(500, "--steps", help="trajectory: optimizer steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
) -> None:
    """Distil a model into one that needs far fewer denoising steps."""
    from unmask.data.corpus import iter_corpus_texts
    from unmask.train.config import load_config
    from unmask.train.distill import DistillConfig, Distiller, collect_trajectories, distill_config

    dcfg = DistillConfig(method=method, rounds=rounds, steps_per_round=steps_per_round, teacher_steps=teacher_steps,
                         divergence=divergence, prompts=prompts, prompt_source=prompt_source,
                         prompt_tokens=prompt_tokens, answer_tokens=answer_tokens, entropy_weight=entropy_weight,
                         teacher_temperature=teacher_temperature, teacher_top_p=teacher_top_p,
                         teacher_frequency_penalty=teacher_frequency_penalty,
                         answer_model=str(answers_from) if answers_from else None, answer_batch=answer_batch)
    dcfg.validate()
    if answers_from and method != "trajectory":
        raise typer.BadParameter("only trajectory distillation has answers to take from another model",
                                 param_hint="--answers-from")
    base = load_config(config, [f"steps={steps}", *overrides], base={"data": {"train": str(data)}})
    train_data = str(data)
    if method == "trajectory":
        traj = out_dir / "trajectories.jsonl"
        if not (resume and traj.exists()):
            n = collect_trajectories(teacher, iter_corpus_texts(data), dcfg, traj, seed=base.seed)
            console.print(f"{'teacher' if answers_from is None else answers_from} answered {n} prompts -> {traj}")
        train_data = str(traj)
    cfg = distill_config(teacher, out_dir, train_data, dcfg, base)
    trainer = Distiller(cfg, dcfg, resume=resume)
    first, before = trainer.round, trainer.few_step_loss()
    metrics = trainer.fit()
    last, after = trainer.round, trainer.few_step_loss()
    if first == last:
        console.print(f"few-step loss of round {last}: {before:.4f} -> {after:.4f}; model in {out_dir}")
    else:  # each round has its own teacher and step count: the two numbers measure different objectives
        console.print(f"few-step loss: {before:.4f} at the start of round {first}, {after:.4f} at the end of round "
                      f"{last} (against that round's teacher); model in {out_dir}")
    if metrics:
        console.print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))


@eval_app.command("speed-quality")
def speed_quality(
    models: List[Path] = typer.Argument(..., help="Model folders to compare."),
    data: Path = typer.Option(..., "--data", help="Held-out code: corpus folder (val split) or one .jsonl/.txt/.py file."),
    ar_model: Optional[Path] = typer.Option(None, "--ar-model", help="AR twin for the generative NLL column."),
    steps: str = typer.Option("256,64,32,16", "--steps", help="Fixed step budgets (comma separated)."),
    thresholds: str = typer.Option("0.9,0.7,0.5", "--thresholds", help="Confidence thresholds (comma separated)."),
    entropy_bounds: str = typer.Option("", "--entropy-bounds", help="γ of the eb policy (comma separated)."),
    threshold_policy: str = typer.Option("threshold", "--threshold-policy",
                                         help="The policy of the --thresholds rows: threshold | leftmost."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n"),
    block_length: int = typer.Option(32, "--block-length"),
    temperature: Temperature = 0.0,
    top_p: TopP = None,
    frequency_penalty: FrequencyPenalty = 0.0,
    n_prompts: int = typer.Option(16, "--prompts", help="Held-out function prompts."),
    elbo_tokens: int = typer.Option(20000, "--elbo-tokens", help="Held-out tokens for the ELBO column (0: skip)."),
    plot_path: Path = typer.Option(Path("speed_quality.png"), "--plot"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Quality vs NFE for each model and decoding budget: one table and one plot."""
    from rich.progress import Progress
    from rich.table import Table

    from unmask.data.corpus import iter_corpus_texts
    from unmask.eval.elbo import evaluate_bits_per_byte, token_stream
    from unmask.eval.quality import function_prompts
    from unmask.eval.speed_quality import evaluate, plot, settings

    step_budgets, taus = _numbers(steps, int, "--steps"), _numbers(thresholds, float, "--thresholds")
    gammas = _numbers(entropy_bounds, float, "--entropy-bounds")
    if not (step_budgets or taus or gammas):
        raise typer.BadParameter("nothing to compare: give --steps, --thresholds or --entropy-bounds",
                                 param_hint="--steps")
    texts = list(iter_corpus_texts(data, split="val")) if data.is_dir() and (data / "val.jsonl").exists() \
        else list(iter_corpus_texts(data))
    prompts = function_prompts(texts, limit=n_prompts)
    if not prompts:
        raise typer.BadParameter(f"no function with a docstring found in {data}", param_hint="--data")
    pipes = {str(m): load_pipeline(m, device) for m in models}
    elbo = {}
    if elbo_tokens:
        for name, pipe in pipes.items():
            tokens = token_stream(texts, pipe.tokenizer)[:elbo_tokens]
            elbo[name] = evaluate_bits_per_byte(pipe.model, pipe.tokenizer, tokens, seq_len=min(256, pipe.config.max_seq_len)).bits_per_byte
    ar = load_pipeline(ar_model, device) if ar_model else None
    grid = settings(max_new_tokens, block_length, step_budgets, taus, gammas, threshold_policy, temperature=temperature,
                    top_p=top_p, frequency_penalty=frequency_penalty)
    with Progress(console=console) as bar:
        task = bar.add_task("speed-quality", total=len(pipes) * len(grid))
        rows = evaluate(pipes, prompts, grid, ar, elbo or None, progress=lambda: bar.advance(task))
    sampling = f"temperature {temperature:g}" + (f", top-p {top_p:g}" if top_p else "") if temperature else "greedy"
    sampling += f", frequency penalty {frequency_penalty:g}" if frequency_penalty else ""
    table = Table(title=f"speed vs quality · {len(prompts)} held-out function prompts · {max_new_tokens} new tokens"
                        f" · {sampling}")
    cols = ["model", "setting", "nfe_per_256", "tokens_per_step", "tokens_per_second", "parse_rate",
            "repetition_rate", "elbo_bpb", "gen_bpb"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("model", "setting") else "right")
    for r in rows:
        table.add_row(*[(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "–"))) for c in cols])
    out.print(table)
    plot(rows, plot_path)
    console.print(f"plot: {plot_path}")
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))
