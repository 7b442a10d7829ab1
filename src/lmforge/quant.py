"""Weight-only quantized linear layers: int4 and int8 weights stay packed in memory and in the matmul.

A decode step reads every weight once per token, so its speed is memory bandwidth divided by weight bytes:
fp32 reads 4 bytes a weight, int8 1.25 and int4 0.63 (with their per-group scales and zeros). Both kinds
quantize rows in groups of 32 values, as llama.cpp's Q8_0 / Q4_0 / Q4_1 blocks do, so those GGUF blocks
load without a dequantize/requantize round trip:

    int4:  w = (q - 8) * scale + zero     q in 0..15      Q4_0: zero = 0;  Q4_1 (w = q*d + m): zero = m + 8*d
    int8:  w = q * scale                  q in -128..127  Q8_0: scale = d

One kernel runs both kinds, chosen by measurement (benchmarks/generate.py, docs/architecture.md): PyTorch's own
CPU ``_weight_int4pack_mm_for_cpu`` with bf16 activations (its fp32 path is 25x slower, its fp16 path 60x). An
int8 code is two 4-bit planes, q = 16 * hi + lo with hi in -8..7 and lo in 0..15, so an int8 layer is an int4
layer twice as wide whose input is x twice:

    x @ w.T = [x, x] @ [w_hi, w_lo].T    w_hi = ((hi + 8) - 8) * 16s + 0     w_lo = (lo - 8) * s + 8s

That reads one byte a weight through the same vectorised kernel, on every CPU PyTorch builds it for; it beat
an inductor-compiled int8 dequantize-in-register matvec (which also needed one compile per layer shape) and
``_weight_int8pack_mm`` (one scale per row: no Q8_0 groups; compute-bound on AVX2). That kernel reads scales
and zeros as bf16, so each group also keeps its exact (scale, min) as fp16: a layer holds the codes and a GGUF
file's fp16 scales exactly (``dequantize``; scales quantized here are rounded to fp16 first, as llama.cpp's
are). A decode step (and a few rows on AVX-512) runs lmforge's own float32 kernel over the codes and the fp16
pairs where it is built (``lmforge.cpu_kernel``; a server's batch steps in bf16 dot products where the CPU has
them: ``set_batch_weights``); more rows run PyTorch's, which tiles them. The kernels are
built for a few rows (decoding); from ``GEMM_ROWS`` rows on (a long prompt's prefill chunk) a layer is
dequantized, a slice of rows at a time, for a GEMM (bf16 where the CPU has bf16 units, float32 elsewhere).
Codes come back out of the kernel's layout (``unpack_codes``) for that, export, an embedding table's lookups
and a QLoRA backward.

``PackedLinear`` replaces ``nn.Linear`` inside the same ``Transformer`` (``pack_model``); LoRA wraps it like
any linear layer (QLoRA's frozen 4-bit base). Packed layers run on the CPU.

Why one module of ~840 lines: everything here reads or writes one thing, the kernel's packed layout (codes
in blocks of rows, scales and zeros beside them). The layer, its joined form, the embedding table that shares
the head's codes and the whole-model packing each depend on how ``unpack_codes`` and ``kernel_layout`` read it;
split apart, each piece would import the layout's details from the others.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import psutil
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import cpu_kernel, runtime
from lmforge.config import BATCH_WEIGHTS, QUANT_CHOICES
from lmforge.errors import LmforgeError, UnsupportedError

GROUP = 32  # values per quantization group (one scale, and for int4 one zero, each)
Kind = Literal["int8", "int4"]
PLANES: dict[str, int] = {"int4": 1, "int8": 2}  # 4-bit planes a code is stored as
PACK_ROWS = (
    512  # rows packed at a time (a whole number of the layout's blocks): ~20 bytes a weight of temporaries
)
KERNEL_ROWS = 16  # the kernel tiles output rows by 16: a layer's rows are padded up to a multiple of this
# The output head's best candidates per row are scored again in float32 (``PackedLinear.exact_top``).
HEAD_EXACT_TOP = 8
# From this many input rows on (a prefill chunk), a layer is dequantized for a GEMM instead (``gemm``): the kernel
# is built for a few rows. Crossovers measured on SmolLM2's prefill (docs/architecture.md); int8's while the kernel
# ran its two planes (twice the work: its GEMM paid off sooner), before AVX-512 builds joined them.
GEMM_ROWS: dict[str, int] = {"int4": 384, "int8": 128}
GEMM_DEQUANT_WEIGHTS = (
    1 << 21
)  # weights dequantized at a time on that path: 8 MiB of float32 (not a 113 MB head)
# A layer with a dense bf16 copy (``keep_dense_copy``: a server decoding many streams) multiplies this many rows
# and more with it. The kernel tiles rows by 4 and unpacks the weights again per tile: SmolLM2's 30 joined blocks
# took 5.3 / 8.2 / 16.2 / 28.4 ms through the kernel for 1 / 4 / 8 / 12 rows and ~19-24 ms with the copy at 8-16
# rows (2 threads, AMX Xeon), so int4 switches after 8 rows. int8 switched from 5 while the kernel ran its two
# planes (25.6 ms at 8 rows against the copy's 22.8); joined on AVX-512, its 8-row head takes 4.3 ms against 5.9,
# and a server's 8 streams ran as fast without any copy (AMD EPYC): after 8 rows too (docs/architecture.md).
DENSE_ROWS: dict[str, int] = {"int4": 9, "int8": 9}
# Up to this many input rows, a layer whose 64-row blocks lmforge's float32 kernel reads (AVX-512) goes there:
# faster than PyTorch's kernel from 1 to 128 rows on SmolLM2's gate/up (8 rows 165 against 232 us, 64 rows
# 1.2 against 1.7 ms; 256 rows 9.8 against 7.3), and exact (docs/architecture.md).
FLOAT32_ROWS = 64
# per group of 32 values and plane: 16 bytes of codes (two a byte), a bf16 scale and zero (PyTorch's kernel), and
# the fp16 scale and min (lmforge's)
PACKED_BYTES_PER_GROUP = {kind: planes * (GROUP // 2 + 2 * 2 + 2 * 2) for kind, planes in PLANES.items()}


@dataclass
class QuantizedWeight:
    """One (N, K) weight as integer codes in groups of 32 along K, before packing for a kernel.

    codes: (N, K) uint8 0..15 (int4) or int8 -128..127 (int8); scales: (N, K/32); zeros: (N, K/32), int4 only.
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

    def planes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weight as 4-bit planes side by side, what the kernel multiplies: codes (N, P*K) 0..15 (int32),
        scales and zeros (N, P*K/32) float32, with P = 1 (int4) or 2 (int8: hi, then lo; see the module)."""
        if self.kind == "int4":
            assert self.zeros is not None
            return self.codes.to(torch.int32), self.scales.float(), self.zeros.float()
        q = self.codes.to(torch.int32)
        hi = torch.div(q, 16, rounding_mode="floor")  # -8..7
        scales = self.scales.float()
        return (
            torch.cat([hi + 8, q - 16 * hi], dim=1),
            torch.cat([16 * scales, scales], dim=1),
            torch.cat([torch.zeros_like(scales), 8 * scales], dim=1),
        )


def quantize_weight(weight: torch.Tensor, kind: Kind) -> QuantizedWeight:
    """Round a float (N, K) weight to ``kind``: int8 symmetric per group (Q8_0), int4 min/max per group (Q4_1).

    Scales and mins are fp16 values, as a GGUF file's are, so a packed layer holds them exactly."""
    N, K = weight.shape
    if K % GROUP:
        raise UnsupportedError(
            f"cannot quantize a weight of shape {tuple(weight.shape)}: rows must be a multiple of {GROUP}",
            hint="load this model with quant='none'",
        )
    w = weight.detach().float().view(N, K // GROUP, GROUP)
    if kind == "int8":
        scales = _fp16(w.abs().amax(-1) / 127)
        codes = torch.round(w / scales.clamp(min=1e-12)[..., None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight("int8", codes.view(N, K), scales)
    low, high = w.amin(-1), w.amax(-1)
    scales, low = _fp16((high - low) / 15), _fp16(low)
    codes = torch.round((w - low[..., None]) / scales.clamp(min=1e-12)[..., None]).clamp(0, 15)
    return QuantizedWeight("int4", codes.to(torch.uint8).view(N, K), scales, low + 8 * scales)


def _fp16(values: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to fp16's, or one clear error where fp16 cannot hold them."""
    rounded = values.half()
    if not torch.isfinite(rounded).all():
        raise UnsupportedError(
            "a weight group's scale is beyond fp16's range (65504): it cannot be packed",
            hint="load this model with quant='none'",
        )
    return rounded.float()


# ------------------------------------------------------------ the kernel's packed layout
Layout = tuple[str, int]  # (how a byte pairs rows, rows per block)
_LAYOUTS: tuple[Layout, ...] = (("split", 64), ("split", 32), ("pairs", 32))


@functools.cache
def kernel_layout() -> Layout:
    """How ``_convert_weight_to_int4pack_for_cpu`` arranges codes on this CPU, found by packing a probe.

    The packed (N, K/2) bytes are blocks of 64 rows (AVX-512) or 32 (AVX2 and plain C++), stored column by
    column; in a block's column, byte j holds rows j and j + block/2 ("split", the vector builds) or rows 2j
    and 2j + 1 ("pairs", plain C++ and every partial last block). It follows the CPU's vector width, so it is
    probed, and a layout PyTorch might add fails here instead of garbling weights.
    """
    rows, width = 80, 64  # whole blocks and a partial one under every layout
    codes = torch.randint(0, 16, (rows, width), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    for layout in _LAYOUTS:
        if torch.equal(unpack_codes(packed, width, 0, rows, layout).to(torch.int32), codes):
            return layout
    raise UnsupportedError(
        "this PyTorch build packs int4 weights in a layout lmforge does not know",
        hint="load the model with quant='none'",
    )


def unpack_codes(packed: torch.Tensor, width: int, start: int, stop: int, layout: Layout) -> torch.Tensor:
    """Codes (stop - start, width) uint8 of rows start..stop of a packed (rows, width) int4 weight.

    ``start`` is a multiple of the layout's block (or 0); whole blocks unpack as strided views, no gather.
    """
    style, block = layout
    rows = packed.shape[0]
    flat = packed.view(-1)
    whole = rows - rows % block  # rows in whole blocks
    end = min(rows, -(-stop // block) * block)  # through the block that holds row stop - 1
    parts = []
    if min(end, whole) > start:
        blocks = flat[start * width // 2 : min(end, whole) * width // 2].view(-1, width, block // 2)
        low, high = blocks & 15, blocks >> 4  # (blocks, K, block/2)
        if style == "split":
            both = torch.cat([low, high], dim=2)  # rows j, then rows j + block/2
        else:
            both = torch.stack([low, high], dim=3).flatten(2)  # rows 2j and 2j + 1
        parts.append(both.transpose(1, 2).reshape(-1, width))
    if end > whole:  # the partial last block: neighbouring rows share a byte
        tail = flat[whole * width // 2 :].view(width, -1)  # (K, rows/2)
        parts.append(torch.stack([tail & 15, tail >> 4], dim=2).flatten(1).T)
    codes = torch.cat(parts) if len(parts) > 1 else parts[0]
    return codes[: stop - start]


def gather_codes(packed: torch.Tensor, width: int, rows: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Codes (len(rows), width) uint8 of the given rows (any order, repeats): an embedding table's lookups."""
    style, block = layout
    whole = packed.shape[0] - packed.shape[0] % block
    r = rows.reshape(-1, 1)
    in_block = r < whole  # else in the partial last block
    first = torch.where(in_block, r - r % block, whole)  # the first row of r's block
    j = r - first
    per_column = torch.where(
        in_block, block // 2, (packed.shape[0] - whole) // 2
    )  # bytes a block column holds
    if style == "split":
        byte, high = (
            torch.where(in_block, j % (block // 2), j // 2),
            torch.where(in_block, j >= block // 2, j % 2 == 1),
        )
    else:
        byte, high = j // 2, j % 2 == 1
    columns = torch.arange(width, device=rows.device)
    values = packed.view(-1)[first * width // 2 + columns * per_column + byte]  # (R, K)
    return torch.where(high, values >> 4, values & 15)


def exact_pairs(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(..., 2) fp16 (scale, min) of float32 ``scales`` and ``zeros`` (w = q * scale + min, min = zero - 8 * scale):
    what lmforge's float32 kernel reads. Exact for a GGUF file's fp16 scales and for ``quantize_weight``'s."""
    mins = zeros.double() - 8 * scales.double()
    return torch.stack([_fp16(scales.double()), _fp16(mins)], dim=-1).half()


def exact_scales_mins(exact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (scale, min) per group from fp16 (..., 2) pairs (``exact_pairs``): the values packed,
    w = q * scale + min (what lmforge's float32 kernel computes with)."""
    pairs = exact.float()
    return pairs[..., 0], pairs[..., 1]


def dequantize_planes(
    codes: torch.Tensor,
    scales_zeros: torch.Tensor,
    planes: int,
    dtype: torch.dtype = torch.float32,
    exact: torch.Tensor | None = None,
) -> torch.Tensor:
    """(R, K) weights in ``dtype`` from codes (R, P*K) and the kernel's scales_zeros (P*K/32, R, 2): each
    plane's (q - 8) * scale + zero, the planes summed.

    Few passes over the weight (this is the prefill GEMM path's cost): two planes are joined into the int8 code
    in uint8 arithmetic (16 hi + lo, then the sign bit flipped: q = 16 (hi - 8) + lo), which one promoting
    multiply scales; one plane is ``addcmul(min, code, scale)``. With ``exact`` (P*K/32, R, 2) fp16 pairs
    (float32 only: a bf16 weight would round them) the scales and mins are the values packed
    (``exact_scales_mins``), else the bf16 ones PyTorch's kernel reads."""
    R = codes.shape[0]
    if exact is not None and dtype == torch.float32:
        scales, mins = exact_scales_mins(exact)  # (P*K/32, R)
    else:
        scales, zeros = scales_zeros.to(dtype).unbind(-1)
        mins = zeros - 8 * scales
    if planes == 2:
        K = codes.shape[1] // 2
        q = ((codes[:, :K] << 4) | codes[:, K:]).view(torch.int8) ^ -128  # the int8 codes, exactly
        return (q.view(R, -1, GROUP) * scales[K // GROUP :].T[..., None]).view(R, K)
    s, m = scales.T[..., None], mins.T[..., None]  # (R, K/32, 1)
    return torch.addcmul(m, codes.view(R, -1, GROUP), s).reshape(R, -1)


class _KernelMatmul(torch.autograd.Function):
    """The kernel has no derivative; for LoRA on a packed base, x's gradient is grad @ W (dequantized)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer.kernel_matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad @ ctx.layer.dequantize().to(grad.dtype), None


class PackedLinear(nn.Module):
    """``nn.Linear`` with an int4 or int8 weight that stays packed; same call, same output shape and dtype.

    Buffers: ``packed`` (N', P*K/2) uint8 in the kernel's layout, ``scale_bits`` (P*K/32, N', 2): the bf16
    scales and zeros PyTorch's kernel reads, stored as int16 bits so that ``model.to(dtype)`` leaves them alone
    (it converts floating buffers only; a round trip through float32 cost a copy of every layer's scales), and
    ``exact_bits`` (N'/16, P*K/32, 2, 16): each group's exact scale and min as fp16 (``exact``), also as int16
    bits, what lmforge's float32 kernel reads. P is the number of planes (1 for int4, 2 for int8), N' the rows
    padded to ``KERNEL_ROWS``.

    ``exact_top`` (0: off; the output head gets ``HEAD_EXACT_TOP``): PyTorch's kernel returns bf16, whose rounding is
    up to 1/256 of a value, about 0.06 for a logit of 15, and greedy decoding's top-2 gaps are often smaller.
    Rounding the head's output flipped near-ties. Each row's ``exact_top`` highest logits are computed again in
    float32 from their rows' codes (a gather of 8 rows, not a second pass over the head); greedy chat answers
    equal to the fp32 path's went from 5/10 to 8/10 on SmolLM2 Q8_0 and from 4/10 to 8/10 on Q4_1 (eager, one
    thread; docs/architecture.md has the compiled figures). Rows through lmforge's float32 kernel (a decode step
    of one sequence; a few rows on AVX-512) are exact already, and are not rescored; a bf16 copy's are.
    """

    exact_top: int = 0
    # a step of several sequences, one position each, in bf16 dot products where the CPU has them (``bf16_dot``;
    # set by ``set_batch_weights``: a server's batches)
    bf16_batches: bool = False
    dense: torch.Tensor | None  # the bf16 copy for ``DENSE_ROWS[kind]`` rows and more (``keep_dense_copy``)

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.kind = weight.kind
        self.planes = PLANES[weight.kind]
        self.out_features, self.in_features = weight.shape
        if self.in_features % GROUP:
            raise UnsupportedError(
                f"a packed layer needs rows that are a multiple of {GROUP}, got {self.in_features}",
                hint="load this model with quant='none'",
            )
        self.layout = kernel_layout()  # a plain tuple: a constant for torch.compile
        rows = -(-self.out_features // KERNEL_ROWS) * KERNEL_ROWS  # padded: zero rows, sliced off the output
        width = self.planes * self.in_features
        packed = torch.empty(rows, width // 2, dtype=torch.uint8)
        scales_zeros = torch.empty(width // GROUP, rows, 2, dtype=torch.bfloat16)
        exact = torch.zeros(width // GROUP, rows, 2, dtype=torch.float16)
        # PACK_ROWS rows at a time, into the buffers (the layout packs block by block): the int32 planes and
        # their temporaries are ~20 bytes a weight, 570 MB for all of a 49k-row head at once.
        for start in range(0, self.out_features, PACK_ROWS):
            part = weight.map_rows(lambda t, start=start: t[start : start + PACK_ROWS].cpu())
            codes, scales, zeros = part.planes()
            stop = min(start + PACK_ROWS, rows)
            pad = stop - start - codes.shape[0]
            codes, scales, zeros = (F.pad(t, (0, 0, 0, pad)) for t in (codes, scales, zeros))
            packed[start:stop] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
            scales_zeros[:, start:stop] = torch.stack([scales.T, zeros.T], dim=-1).bfloat16()
            exact[:, start:stop] = exact_pairs(scales.T, zeros.T)
        exact = (
            exact.view(width // GROUP, -1, KERNEL_ROWS, 2).permute(1, 0, 3, 2).contiguous()
        )  # by tile of rows
        self._set_buffers(packed, scales_zeros.view(torch.int16), exact.view(torch.int16), bias)

    @classmethod
    def from_packed(
        cls,
        kind: Kind,
        in_features: int,
        packed: torch.Tensor,
        scale_bits: torch.Tensor,
        exact_bits: torch.Tensor,
    ) -> PackedLinear:
        """A layer over codes already in the kernel's layout (no padded rows), their ``scale_bits`` and
        ``exact_bits``."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.kind, layer.planes, layer.layout = kind, PLANES[kind], kernel_layout()
        layer.in_features, layer.out_features = in_features, packed.shape[0]
        layer._set_buffers(packed, scale_bits, exact_bits, None)
        return layer

    def _set_buffers(
        self,
        packed: torch.Tensor,
        scale_bits: torch.Tensor,
        exact_bits: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> None:
        # lmforge's float32 kernel reads "split" blocks, whole ones (a constant for torch.compile)
        self.float32_kernel = (
            self.layout[0] == "split" and self.out_features % self.layout[1] == 0 and cpu_kernel.available()
        )
        # bf16 dot products for a server's batches (``bf16_batches``), where the CPU has them
        self.bf16_dot = self.float32_kernel and self.layout[1] == 64 and cpu_kernel.bf16_dot_products()
        self.register_buffer("packed", packed)
        self.register_buffer("scale_bits", scale_bits)
        self.register_buffer("exact_bits", exact_bits)
        # A buffer, not a parameter: a packed layer is frozen (LoRA trains beside it), so the bias is too.
        self.register_buffer("bias", bias.detach() if bias is not None else None)
        self.register_buffer("dense", None, persistent=False)  # a cache, never saved

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
        """Bytes of the packed weight (codes, scales, zeros, bias), not of a dense copy kept for batches."""
        return sum(
            b.numel() * b.element_size()
            for b in (self.packed, self.scale_bits, self.exact_bits, self.bias)
            if b is not None
        )

    @property
    def scales_zeros(self) -> torch.Tensor:
        """(P*K/32, N', 2) bf16: each group's scale and zero, as the kernel reads them."""
        return self.scale_bits.view(torch.bfloat16)

    @property
    def exact(self) -> torch.Tensor:
        """(N'/16, P*K/32, 2, 16) fp16: each group's scale and min (``exact_pairs``), a tile of ``KERNEL_ROWS``
        rows after another, in a tile 16 scales then 16 mins a group: lmforge's kernel sweeps a tile's group by
        group (laid out as ``scales_zeros``, a block's were kilobytes apart: each step took ~1 ms longer)."""
        return self.exact_bits.view(torch.float16)

    def exact_of(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """(P*K/32, R, 2) fp16: the (scale, min) pairs of some rows, laid out as ``scales_zeros`` is."""
        if isinstance(rows, slice):
            rows = torch.arange(self.exact.shape[0] * KERNEL_ROWS)[rows]
        return self.exact[rows // KERNEL_ROWS, :, :, rows % KERNEL_ROWS].transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.requires_grad:
            y = _KernelMatmul.apply(x2, self)
        else:
            exact = False  # computed in float32 from the values packed: no rescoring needed
            if self.dense is not None and x2.shape[0] >= DENSE_ROWS[self.kind]:
                y = F.linear(x2.to(self.dense.dtype), self.dense).to(x.dtype)
            elif x2.shape[0] >= GEMM_ROWS[self.kind]:
                y = self.gemm(x2)
            else:
                bf16 = self.multiplies_in_bf16(x)
                y, exact = self.kernel_matmul(x2, bf16), self.computes_in_float32(x2) and not bf16
            if self.exact_top and not exact:
                y = self._rescore_top(x2, y)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def kernel_matmul(self, x: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """x (M, K) -> (M, N) in x's dtype through a packed kernel: lmforge's (``lmforge.cpu_kernel``) where
        ``computes_in_float32`` (in bf16 dot products instead with ``bf16``, where ``bf16_dot``), else
        PyTorch's, which computes in bf16."""
        if self.computes_in_float32(x):
            y = cpu_kernel.packed_matvec(
                x.float().contiguous(),
                self.packed,
                self.exact_bits,
                self.layout[1],
                self.out_features,
                self.planes,
                bf16=bf16 and self.bf16_dot,
            )
            return y.to(x.dtype)
        xb = x.to(torch.bfloat16)
        if self.planes == 2:
            xb = torch.cat([xb, xb], dim=-1)
        # a joined part's scales are a strided view (``JoinedLinear``); the kernel reads them densely
        scales_zeros = self.scales_zeros.contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, GROUP, scales_zeros)
        return y[:, : self.out_features].to(x.dtype)

    def computes_in_float32(self, x: torch.Tensor) -> bool:
        """Whether ``kernel_matmul`` takes x (M, K) through lmforge's float32 kernel (its output is then exact:
        an ``exact_top`` head needs no rescoring): a layout it reads, and one row, or up to ``FLOAT32_ROWS`` rows
        where it has 64-row blocks (AVX-512: it converts each code once for 4 rows at a time)."""
        rows = x.shape[0]
        return self.float32_kernel and (rows == 1 or (self.layout[1] == 64 and rows <= FLOAT32_ROWS))

    def multiplies_in_bf16(self, x: torch.Tensor) -> bool:
        """Whether x, as ``forward`` gets it, goes through lmforge's kernel in bf16 dot products: a step of
        several sequences one position each, x (B, 1, K) with B > 1, in a layer set to (``bf16_batches``) on a
        CPU that has them (``bf16_dot``). A prompt's positions and a single sequence's step stay float32: every
        later token reads the prompt's keys and values, and SmolLM2's greedy answers equal to the fp32 path's
        rose from 8/10 to 10/10 once prompts ran in float32 rather than PyTorch's bf16 kernel
        (docs/architecture.md)."""
        return self.bf16_batches and self.bf16_dot and x.dim() == 3 and x.shape[1] == 1 and x.shape[0] > 1

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> (M, N) in x's dtype by GEMMs over the weight dequantized a slice of rows at a time: in
        bf16 where the CPU multiplies bf16 in hardware (as the kernel does), else in float32."""
        dtype = torch.bfloat16 if runtime.bf16_matmul_units() else torch.float32
        block = self.layout[1]  # slices start at a block's first row
        rows = max(block, GEMM_DEQUANT_WEIGHTS // self.in_features // block * block)
        xd = x.to(dtype)
        parts = []
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            parts.append(F.linear(xd, self.dequantized_rows(start, stop, dtype)))
        return (torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]).to(x.dtype)

    def dequantized_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows start..stop of the weight, (stop - start, K) in ``dtype``: float32, the values packed; bf16, those
        rounded once where lmforge's kernel reads the layout (it returns a transposed view), else from the bf16
        scales and zeros PyTorch's kernel reads. ``start`` is a block's first row."""
        if self.float32_kernel:  # whole blocks: the last slice ends at out_features, a block's end
            return cpu_kernel.dequantize_rows(
                self.packed, self.exact_bits, self.layout[1], self.planes, start, stop, dtype
            ).T  # computed as (K, rows): a GEMM takes the transposed view as it is
        codes = unpack_codes(self.packed, self.planes * self.in_features, start, stop, self.layout)
        exact = self.exact_of(slice(start, stop)) if dtype == torch.float32 else None  # bf16 would round them
        return dequantize_planes(codes, self.scales_zeros[:, start:stop], self.planes, dtype, exact)

    def keep_dense_copy(self) -> int:
        """Keep the weight dequantized to bf16 beside the codes, for ``DENSE_ROWS[kind]`` rows and more;
        returns its bytes (2 a weight). Dequantized a slice of rows at a time (few float32 temporaries)."""
        if self.dense is None:
            dense = torch.empty(self.out_features, self.in_features, dtype=torch.bfloat16)
            block = self.layout[1]
            rows = max(block, GEMM_DEQUANT_WEIGHTS // self.in_features // block * block)
            for start in range(0, self.out_features, rows):
                stop = min(start + rows, self.out_features)
                dense[start:stop] = self.dequantized_rows(start, stop)
            self.dense = dense
        return self.dense.numel() * self.dense.element_size()

    def _rescore_top(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (M, N) with each row's ``exact_top`` largest values recomputed in float32: x (M, K) @ their rows."""
        top = y.topk(min(self.exact_top, self.out_features), dim=-1).indices  # (M, k)
        rows = top.reshape(-1)
        codes = gather_codes(self.packed, self.planes * self.in_features, rows, self.layout)
        w = dequantize_planes(
            codes, self.scales_zeros[:, rows], self.planes, exact=self.exact_of(rows)
        )  # (M*k, K)
        exact = torch.bmm(w.view(*top.shape, -1), x.float()[:, :, None])[..., 0]  # (M, k)
        return y.scatter(-1, top, exact.to(y.dtype))

    def dequantize(self) -> torch.Tensor:
        """The weight as a float32 (N, K) matrix: the values packed (lmforge's float32 kernel computes with
        them; PyTorch's reads its scales and zeros rounded to bf16)."""
        return self.dequantized_rows(0, self.out_features).contiguous()

    def unpacked(self) -> QuantizedWeight:
        """The integer codes, scales and zeros back (for export and tests)."""
        K, N = self.in_features, self.out_features
        codes = unpack_codes(self.packed, self.planes * K, 0, N, self.layout)
        scales, mins = (t.T.contiguous() for t in exact_scales_mins(self.exact_of(slice(N))))
        zeros = mins + 8 * scales
        if self.kind == "int4":
            return QuantizedWeight("int4", codes, scales, zeros)
        q = 16 * (codes[:, :K].to(torch.int16) - 8) + codes[:, K:]
        return QuantizedWeight("int8", q.to(torch.int8), scales[:, K // GROUP :].contiguous())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


class PackedEmbedding(nn.Module):
    """An embedding table kept packed: the lookup unpacks and dequantizes only the rows it reads.

    Shares its buffers with the output head when the model ties them (SmolLM2, Qwen2.5-0.5B).
    """

    def __init__(self, head: PackedLinear) -> None:
        super().__init__()
        self._head = (head,)  # a tuple: the head stays one module of the model, not registered twice
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        # Empty; model.to(dtype) converts it, so lookups return the model's activation type like nn.Embedding.
        self.register_buffer("dtype_probe", torch.empty(0), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        head = self._head[0]
        rows = idx.reshape(-1)
        codes = gather_codes(head.packed, head.planes * head.in_features, rows, head.layout)
        out = dequantize_planes(
            codes, head.scales_zeros[:, rows], head.planes, exact=head.exact_of(rows)
        )  # (R, C)
        return out.view(*idx.shape, self.embedding_dim).to(self.dtype_probe.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The table as float32 (V, C), for code that reads an embedding's weight (export, tying)."""
        return self._head[0].dequantize()


class JoinedLinear:
    """Packed layers that read the same input (a block's q, k and v; a gated MLP's gate and up), joined along
    their rows so that one kernel call computes them all.

    A decode step makes ~7 kernel calls a block; each call has a fixed cost (dispatch, its threads' fork and
    join) next to the ~40 us of reading a layer, and a wider layer divides its rows among the threads better.
    On SmolLM2's shapes (2 threads) the 30 blocks' calls took 6.5 ms a token as 7 layers and 5.3 ms as 4.

    The parts stay in the model as they are (their names, export, LoRA): each part's codes, scales and zeros
    become views of its rows of the joined layer's (the layout packs whole blocks of rows, so the joined codes
    are the parts' codes one after the other), so memory stays the same. The module calls the joined layer
    only while it ``serves`` its current parts (a LoRA wrapper in place of one ends that). Not a submodule:
    the model's state and ``packed_layers`` see the parts alone.
    """

    def __init__(self, parts: tuple[PackedLinear, ...]) -> None:
        self.parts = parts
        self.sizes = [p.out_features for p in parts]
        ends = list(itertools.accumulate(self.sizes))
        # each part's rows of the joined layer
        self.rows = [slice(end - size, end) for size, end in zip(self.sizes, ends, strict=True)]
        first = parts[0]
        # no bias: each part adds its own after the split (it follows the model's dtype, as the part's does)
        self.layer = PackedLinear.from_packed(
            first.kind,
            first.in_features,
            torch.cat([p.packed for p in parts]),
            torch.cat([p.scale_bits for p in parts], dim=1),
            torch.cat([p.exact_bits for p in parts]),  # whole tiles of rows (``can_join``)
        )
        for part, rows in zip(parts, self.rows, strict=True):  # views: every weight is held once
            part.packed, part.scale_bits = self.layer.packed[rows], self.layer.scale_bits[:, rows]
            part.exact_bits = self.layer.exact_bits[rows.start // KERNEL_ROWS : rows.stop // KERNEL_ROWS]

    @staticmethod
    def can_join(parts: tuple[nn.Module, ...]) -> bool:
        """Packed alike, one input width, and rows in whole blocks of the layout (none padded)."""
        if not all(isinstance(p, PackedLinear) for p in parts):
            return False
        first = parts[0]
        return all(
            p.kind == first.kind
            and p.in_features == first.in_features
            and p.out_features % p.layout[1] == 0
            and p.out_features % KERNEL_ROWS == 0
            and not p.exact_top
            and p.dense is None
            for p in parts  # type: ignore[union-attr]
        )

    def serves(self, *modules: nn.Module) -> bool:
        return len(modules) == len(self.parts) and all(
            m is p for m, p in zip(modules, self.parts, strict=True)
        )

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.layer(x).split(self.sizes, dim=-1)
        return tuple(y if p.bias is None else y + p.bias for y, p in zip(outputs, self.parts, strict=True))

    def keep_dense_copy(self) -> None:
        """The joined layer's bf16 copy, its parts' copies views of it."""
        self.layer.keep_dense_copy()
        for part, rows in zip(self.parts, self.rows, strict=True):
            part.dense = self.layer.dense[rows]


def join_projections(model: nn.Module) -> None:
    """Join every block's q/k/v and gate/up packed layers that can be (``JoinedLinear``)."""
    for block in getattr(model, "blocks", []):
        groups = [(block.attn, "joined_qkv", ("q_proj", "k_proj", "v_proj"))]
        if getattr(block.mlp, "gate_proj", None) is not None:
            groups.append((block.mlp, "joined_gate_up", ("gate_proj", "up_proj")))
        for owner, attr, names in groups:
            parts = tuple(getattr(owner, n, None) for n in names)
            if JoinedLinear.can_join(parts):  # type: ignore[arg-type]
                setattr(owner, attr, JoinedLinear(parts))  # type: ignore[arg-type]


def joined_layers(model: nn.Module) -> list[JoinedLinear]:
    return [
        j
        for m in model.modules()
        for j in (getattr(m, "joined_qkv", None), getattr(m, "joined_gate_up", None))
        if isinstance(j, JoinedLinear)
    ]


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
    if isinstance(getattr(model, "lm_head", None), PackedLinear):
        model.lm_head.exact_top = HEAD_EXACT_TOP
    join_projections(model)
    return model


def linear_names(model: nn.Module) -> list[str]:
    """The layers ``quant='int8'|'int4'`` packs: every block's linear layers and the output head."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    return [*names, "lm_head"] if isinstance(getattr(model, "lm_head", None), nn.Linear) else names


def packing_plan(model: nn.Module, kind: Kind) -> dict[str, Kind]:
    """The kind ``quantize_model`` gives each layer it packs (also read by sizing, on a meta-device shell)."""
    return {name: "int8" if name == "lm_head" else kind for name in linear_names(model)}


def quantize_model(model: nn.Module, kind: Kind) -> nn.Module:
    """Pack a float model's linear layers as ``kind`` (the head and a tied embedding table as int8).

    int4 keeps the head at int8, as llama.cpp's Q4 files keep their output tensor at 6 to 8 bits: it decides
    every token, and its error shows first.
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


def set_batch_weights(model: nn.Module, batch_weights: str = "auto", max_batch: int = 8) -> int:
    """How the packed layers of ``model`` multiply a step of several sequences (a server's streams); returns the
    bytes of bf16 copies kept (0: none). Every layer is set, copies made or dropped, whatever it was before.

    ``packed``: lmforge's kernel in float32 (exact: each stream's tokens are its solo run's; memory stays at the
    packed size); ``packed-bf16``: the same codes in bf16 dot products where the CPU has AVX512-BF16
    (``PackedLinear.multiplies_in_bf16``; elsewhere as ``packed``); ``bf16``: those, and a bf16 copy of each
    weight for a kind's ``DENSE_ROWS`` rows and more (prompts' prefill chunks use the copies too); ``auto``:
    ``packed-bf16`` where the CPU has bf16 dot products, plus the copies when it multiplies bf16 in hardware
    (elsewhere a bf16 GEMM is emulated and slower than the kernel), batches can reach ``DENSE_ROWS`` and the
    copies take at most a quarter of the memory available now; ``packed`` elsewhere.
    """
    if batch_weights not in BATCH_WEIGHTS:
        raise LmforgeError(
            f"unknown batch weights {batch_weights!r}", hint=f"use one of: {', '.join(BATCH_WEIGHTS)}"
        )
    layers = list({id(m): m for m in packed_layers(model).values()}.values())
    copies = batch_weights == "bf16"
    if batch_weights == "auto":
        needed = sum(2 * layer.out_features * layer.in_features for layer in layers)
        copies = (
            max_batch >= min(DENSE_ROWS.values())
            and runtime.bf16_matmul_units()
            and needed <= psutil.virtual_memory().available // 4
        )
    bf16 = batch_weights != "packed"
    for layer in layers:
        layer.bf16_batches = bf16
        if not copies:
            layer.dense = None
    for group in joined_layers(model):
        group.layer.bf16_batches = bf16
        if copies:  # first: their parts' copies are views of theirs
            group.keep_dense_copy()
        else:
            group.layer.dense = None
    if copies:
        for layer in layers:
            layer.keep_dense_copy()
    return dense_copy_bytes(model)


def bf16_batches(model: nn.Module) -> bool:
    """Whether ``model``'s packed layers multiply a step of several sequences in bf16 dot products
    (``set_batch_weights`` asked for them and the CPU has them)."""
    return any(m.bf16_batches and m.bf16_dot for m in packed_layers(model).values())


def dense_copy_bytes(model: nn.Module) -> int:
    """Bytes of the bf16 copies ``set_batch_weights`` gave the model's packed layers (0: none)."""
    layers = {id(m): m for m in packed_layers(model).values()}.values()
    return sum(m.dense.numel() * m.dense.element_size() for m in layers if m.dense is not None)


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
