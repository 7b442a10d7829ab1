"""Weight-only quantized linear layers: int4 and int8 weights stay packed in memory and in the matmul.

A decode step reads every weight once per token, so its speed is memory bandwidth divided by weight bytes:
fp32 reads 4 bytes a weight, int8 about 1.06 and int4 about 0.63 (with their per-group scales). Both kinds
quantize rows in groups of 32 values, as llama.cpp's Q8_0 / Q4_0 / Q4_1 blocks do, so those GGUF blocks
load without a dequantize/requantize round trip:

    int4:  w = (q - 8) * scale + zero     q in 0..15     Q4_0: zero = 0;  Q4_1 (w = q*d + m): zero = m + 8*d
    int8:  w = q * scale                  q in -127..127 Q8_0: scale = d

Kernels, chosen by measurement (benchmarks/generate.py, docs/architecture.md):
- int4 runs PyTorch's own CPU kernel ``_weight_int4pack_mm_for_cpu`` with bf16 activations (its fp32 path is
  25x slower), so int4 scales and zeros are bf16: a layer's values are the codes' exactly, their scales and
  zeros off by one bf16 rounding (a GGUF file's fp16 scales are not kept; saving writes the float weights).
- int8 decodes (a few rows) with a dequantize-in-register reduction that ``torch.compile`` fuses into one
  pass over the int8 weights; bigger inputs (prefill) dequantize the layer once and use the fp32/bf16 GEMM.
  PyTorch's ``_weight_int8pack_mm`` needs one scale per row (no Q8_0 groups) and is compute-bound on AVX2.

``PackedLinear`` replaces ``nn.Linear`` inside the same ``Transformer`` (``pack_model``); LoRA wraps it like
any linear layer (QLoRA's frozen 4-bit base). Packed layers run on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from lmforge.config import QUANT_CHOICES
from lmforge.errors import LmforgeError, UnsupportedError

GROUP = 32  # values per quantization group (one scale, and for int4 one zero, each)
Kind = Literal["int8", "int4"]
DECODE_ROWS = 8  # inputs with at most this many rows take the fused matvec path of int8 layers
INT8_ROWS = 2048  # output rows an int8 layer dequantizes at a time outside the fused path
INT4_ROWS = 16  # the int4 kernel's layout needs a number of output rows (N) divisible by this


def int4_fits(out_features: int) -> bool:
    """Whether a layer with ``out_features`` rows can be packed as int4 (else it is packed as int8)."""
    return out_features % INT4_ROWS == 0


@dataclass
class QuantizedWeight:
    """One (N, K) weight as integer codes in groups of 32 along K, before packing for a kernel.

    codes: (N, K) uint8 0..15 (int4) or int8 -127..127 (int8); scales: (N, K/32); zeros: (N, K/32), int4 only.
    Scales and zeros keep the source's precision (fp16 from a GGUF file, fp32 when quantized here).
    """

    kind: Kind
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def map_rows(self, fn) -> QuantizedWeight:  # type: ignore[no-untyped-def]
        """The same weight with ``fn`` applied to the rows of every part (a permutation, a slice)."""
        zeros = fn(self.zeros) if self.zeros is not None else None
        return QuantizedWeight(self.kind, fn(self.codes), fn(self.scales), zeros)

    def split(self, sizes: list[int]) -> tuple[QuantizedWeight, ...]:
        """Row blocks of the given sizes (GPT-2's fused q/k/v)."""
        parts = [
            t.split(sizes) if t is not None else [None] * len(sizes)
            for t in (self.codes, self.scales, self.zeros)
        ]
        return tuple(QuantizedWeight(self.kind, c, s, z) for c, s, z in zip(*parts, strict=True))

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32."""
        N, K = self.codes.shape
        q = self.codes.float().view(N, K // GROUP, GROUP)
        if self.kind == "int8":
            w = q * self.scales.float()[..., None]
        else:
            assert self.zeros is not None
            w = (q - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.view(N, K)


def quantize_weight(weight: torch.Tensor, kind: Kind) -> QuantizedWeight:
    """Round a float (N, K) weight to ``kind``: int8 symmetric per group (Q8_0), int4 min/max per group (Q4_1)."""
    N, K = weight.shape
    if K % GROUP:
        raise UnsupportedError(
            f"cannot quantize a weight of shape {tuple(weight.shape)}: rows must be a multiple of {GROUP}",
            hint="load this model with quant='none'",
        )
    w = weight.detach().float().view(N, K // GROUP, GROUP)
    if kind == "int8":
        scales = w.abs().amax(-1) / 127
        codes = torch.round(w / scales.clamp(min=1e-12)[..., None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight("int8", codes.view(N, K), scales)
    low, high = w.amin(-1), w.amax(-1)
    scales = (high - low) / 15
    codes = torch.round((w - low[..., None]) / scales.clamp(min=1e-12)[..., None]).clamp(0, 15)
    return QuantizedWeight("int4", codes.to(torch.uint8).view(N, K), scales, low + 8 * scales)


def _int8_matvec(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ dequantized(codes (N, K), scales (N, K/32)).T, written so inductor fuses it into one pass.

    One reduction per row of x over the same dequantized weights: inductor fuses the M reductions into one
    loop that dequantizes each weight once for all rows. (One (M, N) reduction dequantized the weights again
    for every row: 8 rows took 8 times one row; now about 3 times, with the same sums, bit for bit.)
    """
    M, K = x.shape
    N = codes.shape[0]
    w = codes.view(N, K // GROUP, GROUP).float() * scales.float()[..., None]  # (N, G, 32), never materialised
    xs = x.float().view(M, K // GROUP, GROUP)
    return torch.stack([(w * xs[m]).sum((-1, -2)) for m in range(M)])  # (M, N)


_compiled_int8_matvec: Callable[..., torch.Tensor] | None = None


@torch.library.custom_op("lmforge::int8_matvec", mutates_args=())
def int8_matvec(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``_int8_matvec``, compiled on its own: an opaque op inside a compiled decode step.

    Inside the step's graph, inductor would fuse the producer of x (a norm, SiLU(gate) * up) into the matvec's
    loop and recompute it for every output row (the head then took 5.4 ms instead of 2.2). Behind this op
    boundary x arrives computed once.
    """
    global _compiled_int8_matvec
    if _compiled_int8_matvec is None:
        _compiled_int8_matvec = torch.compile(_int8_matvec)
    return _compiled_int8_matvec(x, codes, scales)


@int8_matvec.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0], dtype=torch.float32)


class _Int4Matmul(torch.autograd.Function):
    """The int4 kernel has no derivative; for LoRA on a packed base, x's gradient is grad @ W (dequantized)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer.int4_matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad @ ctx.layer.dequantize().to(grad.dtype), None


class PackedLinear(nn.Module):
    """``nn.Linear`` with an int4 or int8 weight that stays packed; same call, same output shape and dtype."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.kind = weight.kind
        self.out_features, self.in_features = weight.shape
        if self.in_features % GROUP:
            raise UnsupportedError(
                f"a packed layer needs rows that are a multiple of {GROUP}, got {self.in_features}",
                hint="load this model with quant='none'",
            )
        if weight.kind == "int4" and not int4_fits(self.out_features):
            raise UnsupportedError(
                f"an int4 layer needs a number of outputs divisible by {INT4_ROWS}, got {self.out_features}",
                hint="pack this layer as int8, or load the model with quant='none'",
            )
        if weight.kind == "int4":
            assert weight.zeros is not None
            codes = weight.codes.to(device="cpu", dtype=torch.int32).contiguous()
            # The kernel's own layout (tiles of the N dimension, two values a byte): (N, K/2) uint8.
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2))
            scales_zeros = torch.stack([weight.scales.T, weight.zeros.T], dim=-1)  # (K/32, N, 2)
            self.register_buffer("scales_zeros", scales_zeros.to(torch.bfloat16).contiguous())
        else:
            self.register_buffer("codes", weight.codes.to(torch.int8).contiguous())
            self.register_buffer("scales", weight.scales.to(torch.float32).contiguous())
        # A buffer, not a parameter: a packed layer is frozen (LoRA trains beside it), so the bias is too.
        self.register_buffer("bias", bias.detach() if bias is not None else None)

    @property
    def shape(self) -> torch.Size:
        """(out_features, in_features), as the weight it replaces."""
        return torch.Size((self.out_features, self.in_features))

    @property
    def packed_parameters(self) -> int:
        """Weights held as integers (and the bias, a buffer here): counted like a float layer's parameters."""
        return self.in_features * self.out_features + (self.bias.numel() if self.bias is not None else 0)

    @property
    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.kind == "int4":
            y = _Int4Matmul.apply(x2, self) if x2.requires_grad else self.int4_matmul(x2)
        elif x2.shape[0] <= DECODE_ROWS and torch.compiler.is_compiling():
            y = int8_matvec(x2, self.codes, self.scales).to(x.dtype)
        else:
            y = self.int8_matmul(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def int8_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> (M, N): dequantize ``INT8_ROWS`` output rows at a time and multiply in x's dtype.

        The slices bound the float copy (a 49k-token head would be 113 MB at once) and stay in cache.
        """
        y = x.new_empty(x.shape[0], self.out_features)
        for start in range(0, self.out_features, INT8_ROWS):
            rows = slice(start, start + INT8_ROWS)
            codes, scales = self.codes[rows], self.scales[rows]
            w = codes.view(codes.shape[0], -1, GROUP).to(x.dtype) * scales.to(x.dtype)[..., None]
            y[:, rows] = x @ w.view(codes.shape[0], self.in_features).T
        return y

    def int4_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> (M, N) in x's dtype; the kernel computes in bf16."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), self.packed, GROUP, self.scales_zeros
        )
        return y.to(x.dtype)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # model.to(dtype) converts every floating buffer; packed scales keep the type their kernel reads.
        kept = {name: b.dtype for name, b in self._buffers.items() if b is not None and name != "bias"}
        super()._apply(fn, recurse)
        for name, dtype in kept.items():
            buffer = self._buffers[name]
            if buffer is not None and buffer.dtype != dtype:
                self._buffers[name] = buffer.to(dtype)
        return self

    def unpacked(self) -> QuantizedWeight:
        """The integer codes and scales back (for export and tests)."""
        if self.kind == "int8":
            return QuantizedWeight("int8", self.codes, self.scales)
        K = self.in_features
        # The kernel with scale 1 and zero 0 returns (q - 8) for an identity input: small integers, exact in bf16.
        unit = torch.zeros(K // GROUP, self.out_features, 2, dtype=torch.bfloat16)
        unit[..., 0] = 1
        eye = torch.eye(K, dtype=torch.bfloat16)
        codes = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, GROUP, unit).T + 8  # (N, K)
        scales, zeros = self.scales_zeros.float().unbind(-1)
        return QuantizedWeight("int4", codes.to(torch.uint8), scales.T.contiguous(), zeros.T.contiguous())

    def dequantize(self) -> torch.Tensor:
        """The weight as a float32 (N, K) matrix: what the packed matmul computes with."""
        return self.unpacked().dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


class PackedEmbedding(nn.Module):
    """An embedding table stored as int8 groups: the lookup dequantizes only the rows it reads.

    Shares its codes with the output head when the model ties them (SmolLM2, Qwen2.5-0.5B).
    """

    def __init__(self, head: PackedLinear) -> None:
        super().__init__()
        if head.kind != "int8":
            raise UnsupportedError("a packed embedding table is int8", hint="pack the table as int8")
        self._head = (head,)  # a tuple: the head stays one module of the model, not registered twice
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        # Empty; model.to(dtype) converts it, so lookups return the model's activation type like nn.Embedding.
        self.register_buffer("dtype_probe", torch.empty(0), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        head = self._head[0]
        rows = head.codes[idx].float().unflatten(-1, (-1, GROUP))  # (..., G, 32)
        out = (rows * head.scales[idx].float()[..., None]).flatten(-2)  # (..., C)
        return out.to(self.dtype_probe.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The table as float32 (V, C), for code that reads an embedding's weight (export, tying)."""
        return self._head[0].dequantize()


# ------------------------------------------------------------------- whole models
def pack_model(model: nn.Module, weights: Mapping[str, QuantizedWeight | PackedLinear]) -> nn.Module:
    """Replace each ``nn.Linear`` named in ``weights`` (``blocks.0.attn.q_proj``) by a ``PackedLinear``.

    A layer keeps the bias of the linear layer it replaces.

    ``wte`` in ``weights`` packs the embedding table (int8) and, in a model that ties them, the head with it.
    """
    for name, weight in weights.items():
        if name == "wte":
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        if not isinstance(old, nn.Linear):
            raise UnsupportedError(
                f"{name} is not a linear layer and cannot be packed", hint="use quant='none'"
            )
        layer = weight if isinstance(weight, PackedLinear) else PackedLinear(weight)
        if old.bias is not None and old.bias.device.type != "meta":
            layer.bias = old.bias.detach()  # a buffer: packed layers are frozen (LoRA trains beside them)
        setattr(parent, attr, layer)
    if "wte" in weights:
        table = weights["wte"] if isinstance(weights["wte"], PackedLinear) else PackedLinear(weights["wte"])
        model.wte = PackedEmbedding(table).to(model.wte.weight.dtype)  # lookups in the activations' type
        if getattr(model.config, "tie_embeddings", False):
            model.lm_head = table
    return model


def linear_names(model: nn.Module) -> list[str]:
    """The layers ``quant='int8'|'int4'`` packs: every block's linear layers and the output head."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    return [*names, "lm_head"] if isinstance(getattr(model, "lm_head", None), nn.Linear) else names


def packing_plan(model: nn.Module, kind: Kind) -> dict[str, Kind]:
    """The kind ``quantize_model`` gives each layer it packs (also read by sizing, on a meta-device shell)."""
    return {
        name: "int8"
        if name == "lm_head" or not int4_fits(model.get_submodule(name).weight.shape[0])
        else kind
        for name in linear_names(model)
    }


def quantize_model(model: nn.Module, kind: Kind) -> nn.Module:
    """Pack a float model's linear layers as ``kind`` (the head and a tied embedding table as int8).

    int4 keeps the head at int8, as llama.cpp's Q4 files keep their output tensor at 6 to 8 bits: it decides
    every token, and its error shows first. A layer whose outputs the int4 kernel cannot tile is int8 too.
    """
    weights = {
        name: quantize_weight(model.get_submodule(name).weight, layer_kind)
        for name, layer_kind in packing_plan(model, kind).items()
    }
    if getattr(model.config, "tie_embeddings", False) and "lm_head" in weights:
        weights["wte"] = weights.pop("lm_head")
    return pack_model(model, weights)


def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with every packed layer dequantized back to a float ``weight``: what files store."""
    state = {}
    packed = packed_layers(model)
    for name, tensor in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in packed and not name.endswith(".bias"):
            continue
        state[name] = tensor
    for name, layer in packed.items():
        state[f"{name}.weight"] = layer.dequantize()
    if isinstance(getattr(model, "wte", None), PackedEmbedding):
        state["wte.weight"] = model.wte.weight
    return state


def packed_layers(model: nn.Module) -> dict[str, PackedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}


def packing_summary(model: nn.Module) -> str:
    """One line: how many layers are packed how, and their bytes (for ``info`` and the model card)."""
    layers = packed_layers(model)
    if not layers:
        return "not packed (float weights)"
    counts: dict[str, int] = {}
    for layer in layers.values():
        counts[layer.kind] = counts.get(layer.kind, 0) + 1
    size = sum(layer.weight_bytes for layer in {id(m): m for m in layers.values()}.values())
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    return f"{kinds} linear layers, {size / 2**20:.1f} MiB packed"


def check_quant(quant: str, device: torch.device) -> str:
    if quant not in QUANT_CHOICES:
        raise LmforgeError(f"unknown quant {quant!r}", hint=f"use one of: {', '.join(QUANT_CHOICES)}")
    if quant in ("int8", "int4") and device.type != "cpu":
        raise UnsupportedError(
            f"packed {quant} weights run on the CPU, not on {device.type}",
            hint="on a GPU load with quant='none' and dtype='bfloat16'",
        )
    return quant
