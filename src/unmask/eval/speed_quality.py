"""Speed vs quality: for each model and each decoding budget (fixed steps or a confidence threshold),
NFE per 256 tokens, tokens/s and sample quality; one table and one plot of quality against NFE."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unmask.decoding.options import DecodeOptions
from unmask.eval.quality import FunctionPrompt, generative_bits_per_byte, sample_quality


@dataclass
class Setting:
    label: str
    options: DecodeOptions


def settings(max_new_tokens: int, block_length: int, steps: list[int], thresholds: list[float],
             entropy_bounds: list[float] = (), threshold_policy: str = "threshold", **sampling) -> list[Setting]:
    """Fixed-step budgets, thresholds (of `threshold_policy`: threshold or leftmost) and eb bounds, each with
    the same `sampling` options (temperature, top_p, penalties); sampling is seeded, so every row is
    reproducible."""
    common = dict(max_new_tokens=max_new_tokens, block_length=block_length, seed=0, **sampling)
    out = [Setting(f"steps={s}", DecodeOptions(steps=s, policy="fixed", **common)) for s in steps]
    mark = "" if threshold_policy == "threshold" else f" {threshold_policy}"
    out += [Setting(f"τ={t:g}{mark}", DecodeOptions(threshold=t, policy=threshold_policy, **common))
            for t in thresholds]
    out += [Setting(f"eb γ={g:g}", DecodeOptions(entropy_bound=g, policy="eb", **common)) for g in entropy_bounds]
    return out


def evaluate(models: dict[str, object], prompts: list[FunctionPrompt], grid: list[Setting], ar_pipe=None,
             elbo: dict[str, float] | None = None, progress=None) -> list[dict]:
    """One row per (model, setting)."""
    rows = []
    for name, pipe in models.items():
        for setting in grid:
            q = sample_quality(pipe, prompts, setting.options)
            row = {"model": name, "setting": setting.label, **q.as_dict()}
            if elbo is not None:
                row["elbo_bpb"] = elbo.get(name)
            if ar_pipe is not None:
                row["gen_bpb"] = generative_bits_per_byte(ar_pipe, [p.prompt for p in prompts], q.completions)
            rows.append(row)
            if progress is not None:
                progress()
    return rows


def plot(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("parse_rate", "parse rate (higher is better)"), ("repetition_rate", "repetition rate (lower is better)")]
    if any(r.get("gen_bpb") is not None for r in rows):
        metrics.append(("gen_bpb", "AR-twin bits/byte of samples (lower is better)"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    for ax, (key, title) in zip(axes, metrics):
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = sorted((r["nfe_per_256"], r[key]) for r in rows if r["model"] == model and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE per 256 tokens")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
