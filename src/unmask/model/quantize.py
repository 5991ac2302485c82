"""Weight quantization: int8 (CPU and CUDA) and fp8 e4m3 (Hopper), per output channel.

A denoising step at small batch reads every weight once, so its floor is the bytes of the weights; int8
halves bf16's and quarters fp32's. Each scheme stores a linear layer's weight in its own dtype plus one
float32 scale per output row, and multiplies through PyTorch's own kernels:

    int8   weight-only: activations stay in the compute dtype. On a CPU `aten._weight_int8pack_mm`
           (the kernel torchao's int8 weight-only mode dispatches to there); elsewhere the weight is
           converted inside the matmul, `x @ w.to(x.dtype).T * scale`, which torch.compile fuses into one
           kernel that reads int8 (gpt-fast's formulation)
    fp8    e4m3 weights, activations quantized per row on the fly, `torch._scaled_mm` with row-wise scales
           (Hopper's fp8 tensor cores; PyTorch also runs it on a CPU, slowly, which the tests use)

We call these ops directly rather than through torchao's tensor subclasses: our linear layers are wrapped by
the mask-gated adapter and saved as plain safetensors, and the kernels would be the same.

What is quantized: the attention and dense FFN projections of every layer and the output head (a tied head
gets its own quantized copy; the embedding stays in the compute dtype, as only a few rows of it are read per
step). MoE experts, routers and norms stay as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from unmask.errors import UnmaskError
from unmask.model.adapter import AdaptedLinear, adapter_delta

FP8_MAX = 448.0  # largest finite float8_e4m3fn


class QuantizationError(UnmaskError, ValueError):
    pass


class Scheme:
    """How a weight [out, in] is stored and multiplied. Subclasses set `name` and `storage`."""

    name = "none"
    storage: torch.dtype

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored weight [out, in], float32 scale [out]) with weight ≈ stored * scale[:, None]."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ (weight * scale).T, in x's dtype."""
        raise NotImplementedError

    def dequantize(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (weight.float() * scale[:, None]).to(dtype)


class Int8Weights(Scheme):
    name = "int8"
    storage = torch.int8

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        return (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            flat = x.reshape(-1, x.shape[-1])
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), weight, scale.to(x.dtype))
            return out.view(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)


class Fp8Weights(Scheme):
    name = "fp8"
    storage = torch.float8_e4m3fn

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.float()
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)
        return (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        rows = flat.shape[0]
        if x.device.type == "cuda" and rows % 16:  # the fp8 GEMMs want row counts in multiples of 16
            flat = F.pad(flat, (0, 0, 0, 16 - rows % 16))
        x_scale = (flat.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
        x8 = (flat / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(x8, weight.t(), scale_a=x_scale, scale_b=scale[None, :].float(),
                               out_dtype=torch.bfloat16)
        return out[:rows].to(x.dtype).view(*x.shape[:-1], weight.shape[0])


SCHEMES: dict[str, Scheme] = {s.name: s for s in (Int8Weights(), Fp8Weights())}


def scheme_named(name: str) -> Scheme:
    if name not in SCHEMES:
        raise QuantizationError(f"unknown quantization {name!r}; use one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


class QuantizedLinear(nn.Module):
    """A linear layer whose `weight` buffer is stored by `scheme`, with a float32 `weight_scale` per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: Scheme,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=scheme.storage, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme) -> "QuantizedLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, linear.weight.device)
        q.weight, q.weight_scale = scheme.quantize(linear.weight.detach())
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    def _apply(self, fn, recurse: bool = True):
        # model.to(dtype) casts every floating tensor, fp8 included: the stored weight and its float32 scale
        # keep their dtypes and follow only device moves
        stored = {"weight": self.weight, "weight_scale": self.weight_scale}
        super()._apply(fn, recurse)
        for name, t in stored.items():
            setattr(self, name, t.to(getattr(self, name).device))
        return self

    def base(self, x: torch.Tensor) -> torch.Tensor:
        out = self.scheme.linear(x, self.weight, self.weight_scale)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme.name}"


class QuantizedAdaptedLinear(QuantizedLinear):
    """A quantized base weight under the mask-gated low-rank adapter (model/adapter.py); the adapter's own
    small matrices stay in the compute dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: Scheme, rank: int, scale: float,
                 gate, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias, scheme, device)
        self.lora_a = nn.Parameter(torch.zeros(rank, in_features, device=device), requires_grad=False)
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device), requires_grad=False)
        self.scale, self.gate = scale, gate

    @classmethod
    def from_adapted(cls, layer: AdaptedLinear, scheme: Scheme) -> "QuantizedAdaptedLinear":
        q = cls(layer.in_features, layer.out_features, layer.bias is not None, scheme, layer.lora_a.shape[0],
                layer.scale, layer.gate, layer.weight.device)
        q.weight, q.weight_scale = scheme.quantize(layer.weight.detach())
        if layer.bias is not None:
            q.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        q.lora_a = nn.Parameter(layer.lora_a.detach().clone(), requires_grad=False)
        q.lora_b = nn.Parameter(layer.lora_b.detach().clone(), requires_grad=False)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adapter_delta(self.base(x), x, self.lora_a, self.lora_b, self.scale, self.gate)


QUANTIZED_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def quantize_model(model: nn.Module, scheme: Scheme | str) -> nn.Module:
    """Quantize `model`'s layer projections and output head in place (see the module docstring); returns it.
    The model's config records the scheme, so a saved copy loads quantized."""
    scheme = scheme_named(scheme) if isinstance(scheme, str) else scheme
    config = getattr(model, "config", None)
    if config is not None and config.quantization not in (None, scheme.name):
        raise QuantizationError(f"model is already quantized as {config.quantization}")
    _swap(model, scheme)
    if isinstance(getattr(model, "output", None), nn.Linear):
        model.output = QuantizedLinear.from_linear(model.output, scheme)
    if config is not None:
        config.quantization = scheme.name
    return model


def _swap(module: nn.Module, scheme: Scheme) -> None:
    for name, child in list(module.named_children()):
        if name in QUANTIZED_LINEARS and isinstance(child, AdaptedLinear):
            setattr(module, name, QuantizedAdaptedLinear.from_adapted(child, scheme))
        elif name in QUANTIZED_LINEARS and isinstance(child, nn.Linear):
            setattr(module, name, QuantizedLinear.from_linear(child, scheme))
        elif name != "experts":
            _swap(child, scheme)
