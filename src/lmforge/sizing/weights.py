"""How a model's weights are held once loaded, and what loading holds on top, by the loader's own rules.

``LLM.load(quant=...)`` keeps linear layers packed (``lmforge.quant``): int4 at half a byte a weight + 1/8 byte
of bf16 scales and zeros, int8 as two such planes (1.25 bytes a weight), a tied embedding table and head as one
int8 table. Which layers are packed how is read from the same functions the loader runs:
``formats.gguf.packed_kind`` per tensor of a GGUF file (``quant="auto"``: Q4_0/Q4_1 stay int4, Q8_0 int8) and
``quant.packing_plan`` for a folder packed on load; everything else is held in the dtype.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from gguf import GGMLQuantizationType

from lmforge.errors import LmforgeError, UnsupportedError
from lmforge.formats.gguf import nearest_kind, packed_kind
from lmforge.formats.gguf_quants import PACKED_TYPES, SUPPORTED_TYPES
from lmforge.info import ModelHeader
from lmforge.model import Transformer
from lmforge.quant import (
    GROUP,
    KERNEL_ROWS,
    PACK_ROWS,
    PACKED_BYTES_PER_GROUP,
    QUANT_CHOICES,
    Kind,
    packing_plan,
)
from lmforge.sizing.units import Component, format_size

FP32 = 4


# GGUF file types named as the ``quant`` of old (sizing "a file of this type"): each now means the packed kind
# such a file loads as with quant="auto".
def legacy_file_type(name: str) -> GGMLQuantizationType | None:
    """The GGUF type ``name`` spells (q8_0, q4_k, f16...), or None when it is not one lmforge reads."""
    try:
        qtype = GGMLQuantizationType[name.upper()]
    except KeyError:
        return None
    return qtype if qtype in SUPPORTED_TYPES else None


def load_quant(quant: str | None, *, dtype: str, training: bool) -> str:
    """``LLM.load``'s ``quant`` as the loader resolves it for a CPU load: an explicit dtype turns ``auto`` into
    ``none``. Training holds float32 weights. Old GGUF file-type names (q8_0, q4_0...) are accepted with a
    ``DeprecationWarning`` and mean the kind a file of that type is packed as."""
    quant = "auto" if quant is None else quant.lower()
    qtype = legacy_file_type(quant) if quant not in QUANT_CHOICES else None
    if qtype is not None:
        kind = nearest_kind(qtype) or "none"
        warnings.warn(
            f"quant={quant!r} (a GGUF file type) is deprecated: quant is how the model is loaded "
            f"(auto | none | int8 | int4), and a {qtype.name} file loads as {kind}; use quant={kind!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        quant = kind
    if quant not in QUANT_CHOICES:
        raise LmforgeError(
            f"unknown quant {quant!r}",
            hint="use auto (a GGUF's Q4/Q8 layers stay packed), none (float weights), int8 or int4",
        )
    if training:
        if quant in ("int8", "int4"):
            raise UnsupportedError(
                f"training estimates are for float32 weights, not {quant}",
                hint="fine-tuning loads float32 weights: drop --quant",
            )
        return "none"
    if quant == "auto" and dtype != "auto":
        return "none"  # an explicit dtype asks for float weights of that type
    return quant


def packed_bytes(kind: Kind, out_features: int, in_features: int) -> int:
    """Bytes of one packed (N, K) layer's buffers (``PackedLinear.weight_bytes`` without a bias): per group of 32
    values and 4-bit plane (int4 one, int8 two), 16 bytes of codes and a bf16 scale and zero; rows padded to
    the kernel's tile."""
    rows = -(-out_features // KERNEL_ROWS) * KERNEL_ROWS
    return rows * (in_features // GROUP) * PACKED_BYTES_PER_GROUP[kind]


# Bytes that converting one tensor holds for a moment while a model is packed on load (the largest tensor sets
# it): per weight of the tensor, its codes (1) and the packed chunks before they are joined (the kind's packed
# size); per weight of one PACK_ROWS-row chunk, its int32 planes and their temporaries (int4 4 + 4, int8
# 3 * 4 + 2 * 4); requantizing a float tensor adds the rounding's float32 temporaries per weight (4; measured:
# SmolLM2's 49k x 384 head quantized from a float32 folder held ~5.5 bytes a weight at once).
_CONVERT_CHUNK: dict[str, int] = {"int8": 20, "int4": 8}
_CONVERT_REQUANTIZED = 4


def conversion_bytes(kind: Kind, rows: int, columns: int, exact: bool) -> int:
    """Bytes packing one (rows, columns) tensor holds at once, beyond the packed layer it leaves."""
    whole = rows * columns * (1 + (0 if exact else _CONVERT_REQUANTIZED)) + packed_bytes(kind, rows, columns)
    return whole + min(rows, PACK_ROWS) * columns * _CONVERT_CHUNK[kind]


@dataclass
class HeldWeights:
    """The weights as the loader holds them: packed layers by kind, the rest as floats of the dtype."""

    bytes: int
    float_parameters: int
    packed: dict[str, tuple[int, int]]  # kind -> (layers, bytes)
    largest_conversion: int  # bytes one tensor's conversion holds at once while loading packed
    source: str  # what the file holds

    def packing(self) -> str:
        """``210 int4 + 1 int8 layers packed``, or "" when nothing is."""
        if not self.packed:
            return ""
        layers = sum(n for n, _ in self.packed.values())
        kinds = " + ".join(f"{n} {kind}" for kind, (n, _) in sorted(self.packed.items()))
        return f"{kinds} {'layer' if layers == 1 else 'layers'} packed"

    def note(self, dtype_name: str) -> str:
        floats = f"{self.float_parameters:,} parameters as {dtype_name}"
        if not self.packed:
            return f"{floats}; {self.source}"
        kinds = " + ".join(f"{kind} {format_size(size)}" for kind, (_, size) in sorted(self.packed.items()))
        return f"{self.packing()} ({kinds}), {floats}; {self.source}"


def held_weights(header: ModelHeader, net: nn.Module, *, quant: str, width: int) -> HeldWeights:
    """How ``LLM.load(quant=quant)`` holds the model's weights, from the file's tensor types (a GGUF file) or
    the shell's layers (a folder), by the loader's own rules."""
    config = header.config
    packed: dict[str, tuple[int, int]] = {}
    total = floats = largest = 0

    def add_packed(kind: Kind, rows: int, columns: int, exact: bool) -> None:
        nonlocal total, largest
        size = packed_bytes(kind, rows, columns)
        n, so_far = packed.get(kind, (0, 0))
        packed[kind] = (n + 1, so_far + size)
        total += size
        largest = max(largest, conversion_bytes(kind, rows, columns, exact))

    if header.kind == "gguf":
        types = ", ".join(f"{name} x{n}" for name, n in header.weight_types.most_common())
        source = f"file: {types}, {format_size(header.file_bytes)}"
        for tensor in header.tensors:
            numel = math.prod(tensor.shape)
            kind = packed_kind(tensor, config, quant)
            if kind is None:
                total += numel * width
                floats += numel
                continue
            # Q4_0 is exact as int8 as well (the codes q - 8 with the same scales)
            exact = PACKED_TYPES.get(tensor.qtype) == kind or tensor.qtype == GGMLQuantizationType.Q4_0
            add_packed(kind, tensor.shape[0], tensor.shape[1], exact)
        if not packed:
            source += ", dequantized at load"
        elif quant == "auto":
            source += ", Q4_0/Q4_1 kept as int4 and Q8_0 as int8"
        return HeldWeights(total, floats, packed, largest, source)
    plan: dict[int, Kind] = {}
    if quant in ("int8", "int4") and isinstance(net, Transformer):
        plan = {id(net.get_submodule(name).weight): kind for name, kind in packing_plan(net, quant).items()}
    for name, tensor in net.named_parameters():  # a tied head is listed once
        if ".lora_" in name:
            continue
        if id(tensor) in plan:
            add_packed(plan[id(tensor)], tensor.shape[0], tensor.shape[1], exact=False)
        else:
            total += tensor.numel() * width
            floats += tensor.numel()
    source = "packed at load from the folder's float weights" if plan else "read from the folder"
    return HeldWeights(total, floats, packed, largest, source)


_TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def load_transient(
    header: ModelHeader, held: HeldWeights, *, dtype: torch.dtype, parameters: int
) -> Component | None:
    """What loading holds on top of the weights.

    A GGUF file is converted one tensor at a time, each tensor's pages dropped once read: float tensors are
    dequantized to a float32 state dict, which another dtype is cast from (both held until the load returns),
    and packed layers hold one tensor's codes (and int32 copy, for int4) at a time. A folder packed on load
    holds its float weights (the mapped file) until every layer is packed. Safetensors in the target dtype are
    used in place from the memory map (their pages are the weights, counted once); in another dtype they are
    read next to the weights they become.
    """
    parts: list[tuple[int, str]] = []
    if header.kind == "gguf":
        if dtype != torch.float32 and held.float_parameters:
            fp32 = held.float_parameters * FP32
            parts.append((fp32, f"{format_size(fp32)} of float32 state before the cast"))
        if held.largest_conversion:
            parts.append((held.largest_conversion, "the largest tensor's codes while it is packed"))
        if not parts:
            return None
        return Component(
            "loading: GGUF, one tensor at a time",
            sum(size for size, _ in parts),
            " + ".join(note for _, note in parts) + ", freed after loading",
        )
    same_dtype = {_TORCH_DTYPES.get(t) for t in header.weight_types} == {dtype}
    if held.packed:
        size = (
            header.file_bytes + (0 if same_dtype else parameters * dtype.itemsize) + held.largest_conversion
        )
        return Component(
            "loading: float weights while packing",
            size,
            "the folder's weights stay mapped until every layer is packed, freed after loading",
        )
    if same_dtype:
        return None
    return Component(
        "loading: file mapped", header.file_bytes, "read while converting dtype, freed after loading"
    )
