"""The compute dtype a model runs in when none is asked for.

On CPUs with native bf16 matrix units (AVX512-BF16, AMX) a bf16 matmul over a block's window of 8–32 tokens
costs about half of the float32 one, while a single-token matmul (autoregressive decoding) is slower in bf16
than in float32 there: oneDNN's bf16 path pays off only once a few rows share each weight read. So diffusion
models, which always compute a window, run in bf16 on such CPUs; causal models keep float32. Tiny models
keep their stored dtype: their steps are bound by per-operator overhead, not by the matmuls.
`docs/engine.md` has the measurements; `--dtype` overrides.
"""

from __future__ import annotations

import torch

from unmask.decoding.layout import layout_for
from unmask.model.transformer import Transformer

AUTO_BF16_MIN_PARAMS = 20_000_000


def native_cpu_bf16() -> bool:
    """True where this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def auto_dtype(model: Transformer) -> torch.dtype | None:
    """bf16 for a float32 diffusion model of >= 20M parameters on a CPU with native bf16; else None (keep)."""
    if model.device.type != "cpu" or model.dtype != torch.float32 or not layout_for(model.config).diffusion:
        return None
    if model.norm.weight.is_meta or sum(p.numel() for p in model.parameters()) < AUTO_BF16_MIN_PARAMS:
        return None
    return torch.bfloat16 if native_cpu_bf16() else None
