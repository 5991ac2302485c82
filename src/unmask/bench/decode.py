"""Decoding speed: the reference sampler vs the engine's caches and policies vs the AR twin.

Every decoder produces exactly `new_tokens` tokens from the same prompt (EOS early stop off, so random
weights and trained models are measured alike). Figures per decoder: ms per denoising step (wall time /
steps), NFE (forward passes), tokens per step and tokens per second. Tests never assert these numbers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from unmask.decoding.ar import ar_generate
from unmask.decoding.engine import Engine
from unmask.decoding.options import DecodeOptions
from unmask.decoding.reference import reference_generate
from unmask.model.config import ModelConfig
from unmask.model.transformer import Transformer

log = logging.getLogger(__name__)


@dataclass
class BenchRow:
    name: str
    seconds: float
    steps: int
    nfe: int
    tokens: int

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / max(self.steps, 1)

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def random_model(config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> Transformer:
    """Random weights of a given shape, initialised directly on the device (an 8B model in seconds)."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = 0.02
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                scale = std / (2 * config.n_layers) ** 0.5 if name.endswith(("wo.weight", "w2.weight")) else std
                p.normal_(0.0, scale, generator=gen)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], tuple[int, int]], device: torch.device, repeats: int) -> tuple[float, int, int]:
    """Best of `repeats` runs after one warm-up: (seconds, steps, nfe)."""
    fn()
    best = None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        steps, nfe = fn()
        _sync(device)
        dt = time.perf_counter() - t0
        if best is None or dt < best[0]:
            best = (dt, steps, nfe)
    return best


@torch.inference_mode()
def bench_decode(model: Transformer, prompt_ids: list[int], new_tokens: int = 256, block_length: int = 32,
                 threshold: float = 0.9, ar_model: Transformer | None = None, repeats: int = 1,
                 compile: bool | str = False, policy: str = "threshold") -> list[BenchRow]:
    """Time each decoder on `prompt_ids` -> `new_tokens` tokens (rounded up to whole blocks)."""
    device = model.output.weight.device
    new_tokens = -(-new_tokens // block_length) * block_length
    rows: list[BenchRow] = []
    prompt = torch.tensor([prompt_ids], device=device)

    def reference():
        _, nfe = reference_generate(model, prompt, gen_length=new_tokens, block_length=block_length, steps=new_tokens)
        return nfe, nfe

    rows.append(BenchRow("reference sampler (no cache)", *_timed(reference, device, repeats), new_tokens))

    engine = Engine(model, max_batch=1, compile=compile)
    base = DecodeOptions(max_new_tokens=new_tokens, block_length=block_length, early_stop=False)
    variants = [
        ("engine, no cache", base.replace(policy="fixed", cache="none")),
        ("prefix cache", base.replace(policy="fixed", cache="prefix")),
        ("dual cache", base.replace(policy="fixed", cache="dual")),
        (f"{policy} {threshold} + dual cache", base.replace(policy=policy, threshold=threshold, cache="dual")),
    ]
    for name, opts in variants:
        def run(opts=opts):
            r = engine.generate(prompt_ids, opts)
            return r.steps, r.nfe

        rows.append(BenchRow(name, *_timed(run, device, repeats), new_tokens))

    if ar_model is not None:
        def ar():
            r = ar_generate(ar_model, prompt_ids, max_new_tokens=new_tokens, stop_at_eos=False)
            return r.steps, r.nfe

        rows.append(BenchRow("AR twin + KV cache", *_timed(ar, device, repeats), new_tokens))
    return rows
