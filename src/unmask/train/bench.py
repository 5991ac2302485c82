"""Training throughput on random tokens: tokens/s and model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / peak FLOP/s, with the usual count of 6 FLOPs per parameter per token (forward +
backward) plus 12·layers·dim·seq for attention scores (PaLM appendix B). Embedding lookups are not FLOPs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from unmask.decoding.layout import layout_for
from unmask.model.config import ModelConfig
from unmask.model.transformer import Transformer
from unmask.train.trainer import compute_loss

# dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0,
               "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():  # ordered so "H100 PCIe" wins over "H100"
        if key in name:
            return value
    return None


def flops_per_token(config: ModelConfig, seq_len: int, block_diffusion: bool = False) -> float:
    # a mixture of experts computes only the experts each token is routed to
    n = config.num_params(include_embeddings=False, active=True) + config.vocab_size * config.dim  # + the head
    attn = 12 * config.n_layers * config.dim * seq_len
    if block_diffusion:  # the [x_t, x_0] input doubles the tokens the network processes
        return 2 * (6 * n + 2 * attn)
    return 6 * n + attn


def default_run(device: torch.device) -> tuple[str, int]:
    """(shape, batch size) of `unmask bench train` without options: the 34M calibration shape on a GPU; the tiny
    shape on a CPU, where a 34M step of 64 x 512 tokens takes minutes."""
    return ("small-34m", 64) if device.type == "cuda" else ("tiny", 8)


@dataclass
class BenchResult:
    tokens_per_s: float
    step_ms: float
    params: int
    mfu: float | None
    peak_tflops: float | None
    device: str


def bench_train(config: ModelConfig, batch_size: int, seq_len: int, steps: int = 20, warmup: int = 3,
                mode: str = "diffusion", device: str | None = None, compile: bool = False,
                dtype: str = "bfloat16", peak: float | None = None, seed: int = 0) -> BenchResult:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    model = Transformer(config).init_weights(seed).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=dev.type == "cuda" or None)
    run = torch.compile(model) if compile else model
    gen = torch.Generator().manual_seed(seed)
    low = max(config.mask_id, config.eos_id, config.pad_id) + 1
    extra = 1 if mode == "ar" else 0
    amp = (torch.autocast("cuda", dtype=torch.bfloat16 if dtype.startswith("b") else torch.float16)
           if dev.type == "cuda" else torch.autocast("cpu", enabled=False))

    def step() -> None:
        x = torch.randint(low, config.vocab_size, (batch_size, seq_len + extra), device=dev)
        with amp:
            loss = compute_loss(run, {"input_ids": x}, mode, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):  # compilation and allocator warm-up stay out of the timing
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    tps = steps * batch_size * seq_len / dt
    peak = peak if peak is not None else peak_tflops(dev)
    fpt = flops_per_token(config, seq_len, block_diffusion=mode != "ar" and layout_for(config).block_causal)
    mfu = fpt * tps / (peak * 1e12) if peak else None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return BenchResult(tps, 1000 * dt / steps, config.num_params(), mfu, peak, name)
