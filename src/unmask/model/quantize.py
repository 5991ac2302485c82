"""Weight quantization: int8 (CPU and CUDA), int4 in groups (CPU) and fp8 e4m3 (Hopper).

A decoding step at small batch reads every weight once, so its floor is the bytes of the weights; int8
halves bf16's and int4 quarters it. Each scheme stores a linear layer's weight in its own layout beside its
scales, and multiplies through PyTorch's own kernels:

    int8   weight-only, one float32 scale per output row: activations stay in the compute dtype. On a CPU
           `aten._weight_int8pack_mm` (the kernel torchao's int8 weight-only mode dispatches to there);
           elsewhere the weight is converted inside the matmul, `x @ w.to(x.dtype).T * scale`, which
           torch.compile fuses into one kernel that reads int8 (gpt-fast's formulation)
    int4   weight-only, 4-bit codes in groups of 32/64/128 input columns, each group with a scale and a zero
           (w = (q - 8) * scale + zero): `aten._weight_int4pack_mm_for_cpu`, bf16 activations. GGUF's Q4_0
           and Q4_1 blocks are exactly this with groups of 32, so a GGUF loads into it without a float
           round trip (model/gguf.py). Elsewhere the weight is unpacked inside the matmul (correct, slow)
    fp8    e4m3 weights, activations quantized per row on the fly, `torch._scaled_mm` with row-wise scales
           (Hopper's fp8 tensor cores; PyTorch also runs it on a CPU, slowly, which the tests use)

We call these ops directly rather than through torchao's tensor subclasses: our linear layers are wrapped by
the mask-gated adapter and saved as plain safetensors, and the kernels would be the same.

What is quantized: the attention and dense FFN projections of every layer and the output head. A tied
embedding table under int8 or int4 becomes one int8 table with a scale per row (QuantizedEmbedding), stored
once, as GGUF stores its tied table (Q8_0), so a quantized folder is no larger than the GGUF it came from.
The embedding reads a few of its rows; the head (TableHead) multiplies by a bf16 copy made at load, which
keeps the table's 8 bits where every logit is read (see TableHead for why not int8 or int4 kernels). Under
fp8 the embedding stays in the compute dtype and the head gets a quantized copy of its own. MoE experts,
routers and norms stay as they are.
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
    activations: torch.dtype | None = None  # the dtype the kernel multiplies in, where it needs one
    scale_rows_dim = 0  # the dimension of `weight_scale` that follows the output rows

    @property
    def head(self) -> "Scheme":
        """The scheme of an output head of its own (not tied to the embedding)."""
        return self

    @property
    def table(self) -> "Scheme | None":
        """How a tied embedding table is stored, shared by the embedding and the head; None: the embedding
        stays in the compute dtype and the head gets a quantized copy of its own."""
        return None

    def fits(self, out_features: int, in_features: int) -> bool:
        """Whether a layer of this shape can be stored this way (others stay as they are)."""
        return True

    def empty(self, out_features: int, in_features: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Placeholders of the stored layout, which a checkpoint's tensors are loaded into."""
        return (torch.zeros(out_features, in_features, dtype=self.storage, device=device),
                torch.ones(out_features, device=device))

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored weight [out, in], float32 scale [out]) with weight ≈ stored * scale[:, None]."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ (weight * scale).T, in x's dtype."""
        raise NotImplementedError

    def dequantize(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (weight.float() * scale[:, None]).to(dtype)


# The CPU kernels as opaque custom ops under torch.compile: inductor lowers the aten ops themselves only when
# their input is a realized buffer, and fails on a fused view; eager calls skip the wrapper's overhead.
@torch.library.custom_op("unmask::int8_linear_cpu", mutates_args=())
def _int8_linear_cpu(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scale)


@_int8_linear_cpu.register_fake
def _(x, weight, scale):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("unmask::int4_linear_cpu", mutates_args=())
def _int4_linear_cpu(x: torch.Tensor, weight: torch.Tensor, group_size: int, scale: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), weight, group_size, scale)


@_int4_linear_cpu.register_fake
def _(x, weight, group_size, scale):
    return x.new_empty(x.shape[0], weight.shape[0])


def int8_linear_cpu(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _int8_linear_cpu(x, weight, scale)
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scale)


def int4_linear_cpu(x: torch.Tensor, weight: torch.Tensor, group_size: int, scale: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _int4_linear_cpu(x, weight, group_size, scale)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), weight, group_size, scale)


class Int8Weights(Scheme):
    name = "int8"
    storage = torch.int8

    @property
    def table(self) -> Scheme:
        return self

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        return (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            flat = x.reshape(-1, x.shape[-1])
            out = int8_linear_cpu(flat, weight, scale.to(x.dtype))
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


INT4_ROW_BLOCK = 64  # output rows the CPU kernel interleaves (its BLOCK_N)


class Int4Weights(Scheme):
    """4-bit codes q in 0..15 in groups of `group_size` input columns: w = (q - 8) * scale + zero.

    `weight` is the CPU kernel's packed layout, stored as is: uint8 [out, in/2] that reads as
    [out/64, in, 32] bytes, byte (b, k, j) = q[64b + j, k] | q[64b + 32 + j, k] << 4 (pack_int4 / unpack_int4;
    tested against `aten._convert_weight_to_int4pack_for_cpu`). `weight_scale` is [in/group, out, 2]
    (scale, zero) in bf16, the kernel's activation dtype."""

    storage = torch.uint8
    activations = torch.bfloat16
    scale_rows_dim = 1

    def __init__(self, group_size: int):
        self.group_size = group_size
        self.name = f"int4-g{group_size}"

    @property
    def table(self) -> Scheme:
        return INT8  # one scale per row: rows read one at a time, the same layout as the int8 head

    def fits(self, out_features: int, in_features: int) -> bool:
        return out_features % INT4_ROW_BLOCK == 0 and in_features % self.group_size == 0

    def empty(self, out_features: int, in_features: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
                torch.zeros(in_features // self.group_size, out_features, 2, dtype=torch.bfloat16, device=device))

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.float().reshape(weight.shape[0], -1, self.group_size)
        lo, hi = w.amin(dim=2), w.amax(dim=2)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        codes = ((w - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).reshape(weight.shape)
        return self.from_codes(codes.to(torch.uint8), scale, lo + 8 * scale)

    def from_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored pair for codes [out, in] (0..15) with scale and zero [out, in/group]."""
        scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        return pack_int4(codes), scale_zero

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if x.device.type == "cpu":
            # .contiguous(): a fused layer's own scale is a strided view (FusedProjections); no-op otherwise
            out = int4_linear_cpu(flat.to(torch.bfloat16), weight, self.group_size, scale.contiguous())
        else:
            out = F.linear(flat.to(scale.dtype), self.dequantize(weight, scale, scale.dtype))
        return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])

    def dequantize(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack_int4(weight).float()
        s, z = (t.t().float().repeat_interleave(self.group_size, dim=1) for t in scale.unbind(-1))
        return ((codes - 8) * s + z).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [out, in] (0..15) -> the CPU int4 kernel's packed layout (see Int4Weights)."""
    out, k = codes.shape
    half = INT4_ROW_BLOCK // 2
    blocks = codes.to(torch.uint8).view(out // INT4_ROW_BLOCK, INT4_ROW_BLOCK, k).transpose(1, 2)
    return (blocks[..., :half] | (blocks[..., half:] << 4)).contiguous().view(out, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: uint8 codes [out, in]."""
    out, k = packed.shape[0], packed.shape[1] * 2
    blocks = packed.view(out // INT4_ROW_BLOCK, k, INT4_ROW_BLOCK // 2)
    codes = torch.cat([blocks & 0xF, blocks >> 4], dim=2)  # [out/64, in, 64]
    return codes.transpose(1, 2).reshape(out, k)


INT8 = Int8Weights()
INT4_GROUP_SIZES = (32, 64, 128)
SCHEMES: dict[str, Scheme] = {s.name: s for s in (INT8, Fp8Weights(),
                                                  *(Int4Weights(g) for g in INT4_GROUP_SIZES))}
ALIASES = {"int4": "int4-g32"}  # groups of 32: GGUF's Q4 blocks, and the least error


def scheme_named(name: str) -> Scheme:
    name = ALIASES.get(name, name)
    if name not in SCHEMES:
        raise QuantizationError(f"unknown quantization {name!r}; use one of {', '.join([*SCHEMES, *ALIASES])}")
    return SCHEMES[name]


class StoredBuffers(nn.Module):
    """A module whose `weight` and `weight_scale` buffers keep the dtypes of their scheme: model.to(dtype)
    casts every floating tensor, fp8 included, so those two follow only device moves."""

    def _apply(self, fn, recurse: bool = True):
        stored = {"weight": self.weight, "weight_scale": self.weight_scale}
        super()._apply(fn, recurse)
        for name, t in stored.items():
            setattr(self, name, t.to(getattr(self, name).device))
        return self


class QuantizedLinear(StoredBuffers):
    """A linear layer whose `weight` buffer is stored by `scheme`, with a float32 `weight_scale` per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: Scheme,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        weight, scale = scheme.empty(out_features, in_features, device)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme) -> "QuantizedLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, linear.weight.device)
        q.weight, q.weight_scale = scheme.quantize(linear.weight.detach())
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    def base(self, x: torch.Tensor) -> torch.Tensor:
        out = self.scheme.linear(x, self.weight, self.weight_scale)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def adapt(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What the layer adds to its base output `out` for input `x` (nothing here; the adapter's update)."""
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme.name}"


class QuantizedEmbedding(StoredBuffers):
    """An embedding table stored by a scheme with one scale per row (int8). A step reads a few of its rows;
    a tied head (`head()`) multiplies by the very same buffers, so the table is stored once."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: Scheme,
                 device: torch.device | str | None = None):
        super().__init__()
        if scheme.scale_rows_dim != 0:
            raise QuantizationError(f"an embedding table needs one scale per row, which {scheme.name} does not store")
        self.num_embeddings, self.embedding_dim, self.scheme = num_embeddings, embedding_dim, scheme
        weight, scale = scheme.empty(num_embeddings, embedding_dim, device)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, scheme: Scheme) -> "QuantizedEmbedding":
        q = cls(embedding.num_embeddings, embedding.embedding_dim, scheme, embedding.weight.device)
        q.weight, q.weight_scale = scheme.quantize(embedding.weight.detach())
        return q

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Rows in float32 (the model casts them to its compute dtype)."""
        return self.weight[input_ids].float() * self.weight_scale[input_ids].float().unsqueeze(-1)

    def head(self) -> "TableHead":
        """The output head tied to this table."""
        return TableHead(self)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme.name}"


TABLE_ROWS_AT_ONCE = 4096  # rows dequantized per float32 temporary (9 MB at SmolLM2's width, not 113 MB)


class TableHead(nn.Module):
    """The output head tied to a QuantizedEmbedding: its table dequantized once, at first use, to bf16, kept
    beside it and never saved. Why not the table's own kernel: PyTorch's CPU int8 kernel costs about as much
    again per added row, so a verify window or a batch of scored candidates pays many times what a bf16
    matmul costs; and why not an int4 copy: it drifts 12x further from float32 (KL 0.044 against 0.0032
    nats per token on held-out code, top-1 agreement 89 % against 97 %)."""

    def __init__(self, table: QuantizedEmbedding):
        super().__init__()
        self.tie(table)

    def tie(self, table: QuantizedEmbedding) -> None:
        self.__dict__["table"] = table  # not a submodule: the table is saved once, as the embedding
        self.__dict__["dense"] = None

    @property
    def weight(self) -> torch.Tensor:
        """The table's stored weight (its device and dtype: what `.weight` tells a caller)."""
        return self.table.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, dense = self.table, self.dense
        if dense is None or dense.device != t.weight.device or t.weight.device.type == "meta":
            # a plain tensor even when first called under inference_mode: later calls may track gradients
            with torch.inference_mode(False), torch.no_grad():
                dense = torch.empty(t.weight.shape, dtype=torch.bfloat16, device=t.weight.device)
                for rows in torch.arange(t.weight.shape[0], device=t.weight.device).split(TABLE_ROWS_AT_ONCE):
                    dense[rows] = (t.weight[rows].float() * t.weight_scale[rows].float()[:, None]).to(torch.bfloat16)
            self.__dict__["dense"] = dense
        return F.linear(x.to(torch.bfloat16), dense).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bf16 from the {self.table.scheme.name} table"


def tie_head(head: nn.Module, embedding: nn.Module) -> None:
    """Point `head` at `embedding`'s tensors: after building a tied model, and after every load that assigns
    new tensors to the embedding."""
    if isinstance(head, TableHead):
        head.tie(embedding)
    else:
        head.weight = embedding.weight


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

    def adapt(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return adapter_delta(out, x, self.lora_a, self.lora_b, self.scale, self.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt(self.base(x), x)


class FusedProjections:
    """Quantized projections of one input (q, k, v; gate and up) run as one matmul: a decoding step is a
    few hundred small kernels, so calls saved are time saved. The layers' stored weights are concatenated
    once and each layer's buffers become views of the fused ones, so nothing is stored twice and state
    dicts are unchanged; each layer's adapter still applies to its own part. A plain object, not a module:
    it owns no tensors of the checkpoint."""

    def __init__(self, layers: list[QuantizedLinear]):
        self.layers, self.scheme = layers, layers[0].scheme
        dim = self.scheme.scale_rows_dim
        self.weight = torch.cat([m.weight for m in layers], dim=0)
        self.weight_scale = torch.cat([m.weight_scale for m in layers], dim=dim)
        self.sizes = [m.out_features for m in layers]
        start = 0
        for m in layers:
            m.weight = self.weight[start : start + m.out_features]
            m.weight_scale = self.weight_scale.narrow(dim, start, m.out_features)
            start += m.out_features
        biases = [m.bias for m in layers]
        self.bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.weight.device != x.device or any(m.bias is not None for m in self.layers) and self.bias is None:
            return [m(x) for m in self.layers]  # moved since fusing, or mixed biases: one by one
        out = self.scheme.linear(x, self.weight, self.weight_scale)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return [m.adapt(part, x) for m, part in zip(self.layers, out.split(self.sizes, dim=-1))]


def fuse_projections(model: nn.Module) -> nn.Module:
    """Give each module that names projections of one input (`fusable`: attention's q/k/v, SwiGLU's gate/up)
    its FusedProjections (`fused`) where they share one scheme; after the weights are in place (a later
    load_state_dict(assign=True) must fuse again)."""
    for module in model.modules():
        names = getattr(module, "fusable", ())
        layers = [getattr(module, n, None) for n in names]
        if layers and all(isinstance(m, QuantizedLinear) for m in layers) and len({m.scheme for m in layers}) == 1:
            module.fused = FusedProjections(layers)
    return model


QUANTIZED_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def quantize_model(model: nn.Module, scheme: Scheme | str) -> nn.Module:
    """Quantize `model`'s layer projections and output head in place (see the module docstring); returns it.
    The model's config records the scheme, so a saved copy loads quantized."""
    scheme = scheme_named(scheme) if isinstance(scheme, str) else scheme
    config = getattr(model, "config", None)
    if config is not None and config.quantization not in (None, scheme.name):
        raise QuantizationError(f"model is already quantized as {config.quantization}")
    _swap(model, scheme)
    embedding = getattr(model, "tok_embeddings", None)
    if ties_table(config, scheme) and isinstance(embedding, nn.Embedding):
        model.tok_embeddings = QuantizedEmbedding.from_embedding(embedding, scheme.table)
        model.output = model.tok_embeddings.head()
    elif isinstance(getattr(model, "output", None), nn.Linear):
        model.output = QuantizedLinear.from_linear(model.output, scheme.head)
    if config is not None:
        config.quantization = scheme.name
    return fuse_projections(model)


def ties_table(config, scheme: Scheme | str | None) -> bool:
    """Whether the head is the embedding table itself: a tied model, unquantized or quantized by a scheme
    with a shared table (a head of its own otherwise)."""
    if config is None or not config.tie_embeddings:
        return False
    return scheme is None or (scheme_named(scheme) if isinstance(scheme, str) else scheme).table is not None


def _swap(module: nn.Module, scheme: Scheme) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and not scheme.fits(child.out_features, child.in_features):
            continue
        if name in QUANTIZED_LINEARS and isinstance(child, AdaptedLinear):
            setattr(module, name, QuantizedAdaptedLinear.from_adapted(child, scheme))
        elif name in QUANTIZED_LINEARS and isinstance(child, nn.Linear):
            setattr(module, name, QuantizedLinear.from_linear(child, scheme))
        elif name != "experts":
            _swap(child, scheme)
