"""Decoding speed: the reference sampler vs the engine's caches and policies vs the AR twin.

Every decoder produces exactly `new_tokens` tokens from the same prompt (EOS early stop off, so random
weights and trained models are measured alike). Figures per decoder: ms per denoising step (wall time /
steps), NFE (forward passes), the positions each step computes (the forward passes' input widths: a whole-
canvas refresh computes the canvas, a cached window step its window, so a cache that does more work than it
should shows), tokens per step and tokens per second. Tests never assert the timings.
"""

from __future__ import annotations

import logging
import time
import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from unmask.decoding.ar import ar_generate
from unmask.decoding.engine import Engine
from unmask.decoding.options import DecodeOptions
from unmask.decoding.reference import reference_generate
from unmask.model.config import ModelConfig
from unmask.model.transformer import Transformer

log = logging.getLogger(__name__)

DEFAULT_PROMPT_LEN = 64
DEFAULT_NEW_TOKENS = 256


@dataclass
class BenchRow:
    name: str
    seconds: float
    steps: int
    nfe: int
    positions: int  # input positions of all forward passes together
    tokens: int

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / max(self.steps, 1)

    @property
    def positions_per_step(self) -> float:
        return self.positions / max(self.steps, 1)

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def max_rss_mib() -> float:
    """The peak resident memory of this process so far, in MiB (what `/usr/bin/time -v` calls max RSS)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def round_to_blocks(new_tokens: int, block_length: int) -> int:
    return -(-new_tokens // block_length) * block_length


def fit_sizes(context: int, block_length: int, prompt_len: int | None = None,
              new_tokens: int | None = None) -> tuple[int, int]:
    """(prompt length, new tokens) for a model of `context` positions. A size not given shrinks from its default
    to fit: the prompt to at most a quarter of the context, the new tokens to the whole blocks left after it.
    Sizes given are kept (the caller refuses a run that does not fit)."""
    if prompt_len is None:
        prompt_len = min(DEFAULT_PROMPT_LEN, context // 4)
    if new_tokens is None:
        room = (context - prompt_len) // block_length * block_length
        new_tokens = min(DEFAULT_NEW_TOKENS, max(room, block_length))
    return prompt_len, new_tokens


class PositionCounter:
    """Counts the input positions of the forward passes it sees (`input_ids.shape[1]` per call): the work a
    decoder does, without a host sync."""

    def __init__(self):
        self.positions = 0

    def wrap(self, forward: Callable) -> Callable:
        def counted(input_ids, *args, **kwargs):
            self.positions += input_ids.shape[1]
            return forward(input_ids, *args, **kwargs)

        return counted

    @contextlib.contextmanager
    def hooked(self, model: torch.nn.Module) -> Iterator[None]:
        """Count `model`'s calls (decoders that call the module itself: the reference sampler, AR)."""
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            self.positions += x.shape[1]

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


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


def _timed(fn: Callable[[list[int]], tuple[int, int]], prompts: list[list[int]], device: torch.device, repeats: int,
           counter: PositionCounter) -> tuple[float, int, int, int]:
    """Best of `repeats` runs over all prompts after a warm-up on the first: (seconds, steps, nfe, positions)."""
    fn(prompts[0])
    best = None
    for _ in range(repeats):
        _sync(device)
        counter.positions = 0
        t0 = time.perf_counter()
        steps = nfe = 0
        for prompt in prompts:
            s, n = fn(prompt)
            steps, nfe = steps + s, nfe + n
        _sync(device)
        dt = time.perf_counter() - t0
        if best is None or dt < best[0]:
            best = (dt, steps, nfe, counter.positions)
    return best


DECODERS = ("reference", "none", "prefix", "dual", "policy", "ar")  # the rows bench_decode can time


@torch.inference_mode()
def bench_decode(model: Transformer, prompt_ids: list[int] | list[list[int]], new_tokens: int = 256,
                 block_length: int = 32, threshold: float = 0.9, ar_model: Transformer | None = None,
                 repeats: int = 1, compile: bool | str = False, policy: str = "threshold",
                 decoders: tuple[str, ...] = DECODERS) -> list[BenchRow]:
    """Time each decoder on the prompt (or each of several prompts) -> `new_tokens` tokens each (rounded up to
    whole blocks); `decoders` picks the rows (DECODERS; "ar" needs `ar_model`)."""
    unknown = set(decoders) - set(DECODERS)
    if unknown:
        raise ValueError(f"unknown decoder {sorted(unknown)[0]!r}; use {', '.join(DECODERS)}")
    device = model.output.weight.device
    new_tokens = round_to_blocks(new_tokens, block_length)
    prompts = [prompt_ids] if prompt_ids and isinstance(prompt_ids[0], int) else list(prompt_ids)
    total = new_tokens * len(prompts)
    rows: list[BenchRow] = []
    counter = PositionCounter()

    def reference(prompt: list[int]) -> tuple[int, int]:
        x = torch.tensor([prompt], device=device)
        _, nfe = reference_generate(model, x, gen_length=new_tokens, block_length=block_length, steps=new_tokens)
        return nfe, nfe

    if "reference" in decoders:
        with counter.hooked(model):
            rows.append(BenchRow("reference sampler (no cache)", *_timed(reference, prompts, device, repeats, counter),
                                 total))

    engine = Engine(model, max_batch=1, compile=compile)
    # counted outside a compiled forward, so compilation and CUDA graphs see the model alone
    engine._forward = counter.wrap(engine._forward)
    base = DecodeOptions(max_new_tokens=new_tokens, block_length=block_length, early_stop=False)
    variants = [
        ("none", "engine, no cache", base.replace(policy="fixed", cache="none")),
        ("prefix", "prefix cache", base.replace(policy="fixed", cache="prefix")),
        ("dual", "dual cache", base.replace(policy="fixed", cache="dual")),
        ("policy", f"{policy} {threshold} + dual cache" if policy != "verify" else "verify + dual cache",
         base.replace(policy=policy, threshold=threshold, cache="dual")),
    ]
    for key, name, opts in variants:
        if key not in decoders:
            continue

        def run(prompt: list[int], opts=opts) -> tuple[int, int]:
            r = engine.generate(prompt, opts)
            return r.steps, r.nfe

        rows.append(BenchRow(name, *_timed(run, prompts, device, repeats, counter), total))

    if ar_model is not None and "ar" in decoders:
        def ar(prompt: list[int]) -> tuple[int, int]:
            r = ar_generate(ar_model, prompt, max_new_tokens=new_tokens, stop_at_eos=False)
            return r.steps, r.nfe

        with counter.hooked(ar_model):
            rows.append(BenchRow("AR twin + KV cache", *_timed(ar, prompts, device, repeats, counter), total))
    return rows
