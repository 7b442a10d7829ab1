"""Turn GGUF tensor data back into float32 numpy arrays.

GGUF files (llama.cpp's format) mostly store weights in *block quantization* formats: a row is cut into
blocks of 32 or 256 values, and each block is stored as a few small integers plus one or two fp16 scale
factors. The byte layout of every block is fixed by ``ggml-common.h`` / ``ggml-quants.c`` in llama.cpp
(the ``block_q4_0``, ``block_q4_K``... structs and their ``dequantize_row_*`` functions); this module
reads those same layouts.

Every format is decoded with whole-tensor numpy operations: the raw bytes are viewed as a
``(n_blocks, bytes_per_block)`` matrix, the fields of all blocks are sliced out as columns at once and
the bit-packed integers are unpacked with broadcast shifts. There is no Python loop over blocks or rows,
so even the 28M-value embedding matrix of a small model decodes in a fraction of a second.

All multi-byte fields in GGUF are little-endian; the dtypes below say so explicitly (``<f2``, ``<u4``)
so that the result does not depend on the machine's byte order.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lmforge.errors import ModelFormatError, UnsupportedError

__all__ = ["PACKED_TYPES", "SUPPORTED_TYPES", "block_codes", "dequantize", "tensor_nbytes"]

_T = GGMLQuantizationType

# Super-block size of the "K-quants" (Q2_K ... Q6_K): 256 values, split into 8 or 16 sub-blocks that each
# carry their own (quantized) scale.
_QK_K = 256


# --- small helpers shared by several formats ---------------------------------------------------------


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at byte ``offset`` of every block, as a float32 column ``(n_blocks, 1)``."""
    # Slicing two bytes out of each row gives a strided view; copying makes it contiguous so that it can
    # be reinterpreted as one fp16 per row.
    return np.ascontiguousarray(blocks[:, offset : offset + 2]).view("<f2").astype(np.float32)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Split each byte into its ``8 // bits`` fields of ``bits`` bits, lowest bits first.

    The fields go on a new axis just before the last one: ``(..., n)`` becomes ``(..., 8 // bits, n)``.
    This is exactly how ggml lays values out: the low nibbles (or 2-bit "crumbs", or bit planes) of a run
    of bytes hold one run of consecutive values, the next bits the run after it.
    """
    shifts = np.arange(0, 8, bits, dtype=np.uint8)[:, None]
    fields = packed[..., None, :] >> shifts
    fields &= np.uint8((1 << bits) - 1)
    return fields


def _centre(q: np.ndarray, zero: int) -> np.ndarray:
    """Reinterpret freshly unpacked unsigned values ``q`` (< 128) as signed ones, minus ``zero``, in place."""
    signed = q.view(np.int8)
    signed -= np.int8(zero)
    return signed


def _affine(q: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """``q * scale + offset`` in float32, broadcasting per-block columns, with one output allocation.

    The weights are hundreds of MB as float32, so avoiding a temporary per operation roughly halves the
    decoding time (it is bound by memory traffic, not arithmetic).
    """
    out = np.multiply(q, scale, dtype=np.float32)
    if offset is not None:
        out += offset
    return out


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode the 12-byte field of Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins.

    llama.cpp's ``get_scale_min_k4``: bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3;
    scales/mins 4-7 keep their low 4 bits in the nibbles of bytes 8-11 and their top 2 bits in the spare
    top bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


# --- the block formats -------------------------------------------------------------------------------
# Each decoder takes a uint8 matrix (n_blocks, bytes_per_block) and returns float32 (n_blocks, block_size).
# Where a format is "d * q + m" we evaluate it in the same order and precision (float32) as llama.cpp's
# reference dequantize_row_* so that results match it bit for bit.


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    # block_q8_0: fp16 d, then 32 int8 values.
    return _affine(blocks[:, 2:].view(np.int8), _f16(blocks, 0))


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    # block_q4_0: fp16 d, 16 bytes; low nibbles are values 0-15, high nibbles values 16-31, offset by 8.
    q = _centre(_unpack(blocks[:, 2:], 4).reshape(len(blocks), 32), 8)
    return _affine(q, _f16(blocks, 0))


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    # block_q4_1: fp16 d, fp16 m (the block minimum), 16 bytes of unsigned nibbles as in Q4_0.
    q = _unpack(blocks[:, 4:], 4).reshape(len(blocks), 32)
    return _affine(q, _f16(blocks, 0), _f16(blocks, 2))


def _q5_values(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    # Q5_0/Q5_1 store the low 4 bits as in Q4_0 and the 5th bit of value j in bit j of a little-endian
    # uint32.
    word = np.ascontiguousarray(qh).view("<u4")
    high = ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    q = _unpack(qs, 4).reshape(len(qs), 32)
    q |= high << np.uint8(4)
    return q


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    # block_q5_0: fp16 d, 4 bytes of high bits, 16 bytes of low nibbles; values offset by 16.
    q = _centre(_q5_values(blocks[:, 2:6], blocks[:, 6:]), 16)
    return _affine(q, _f16(blocks, 0))


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    # block_q5_1: fp16 d, fp16 m, 4 bytes of high bits, 16 bytes of low nibbles; unsigned.
    q = _q5_values(blocks[:, 4:8], blocks[:, 8:])
    return _affine(q, _f16(blocks, 0), _f16(blocks, 2))


def _sub_blocks(q: np.ndarray, size: int) -> np.ndarray:
    """View ``(n_blocks, 256)`` as ``(n_blocks, 256 // size, size)`` so per-sub-block scales broadcast."""
    return q.reshape(len(q), -1, size)


def _q2_k(blocks: np.ndarray) -> np.ndarray:
    # block_q2_K: 16 bytes of (4-bit scale | 4-bit min << 4) for 16 sub-blocks of 16, 64 bytes of 2-bit
    # values, fp16 d, fp16 dmin. Each 128-value half uses 32 bytes; the four 2-bit fields of those bytes
    # hold four runs of 32 consecutive values.
    n = len(blocks)
    packed_scales = blocks[:, 0:16]
    q = _unpack(blocks[:, 16:80].reshape(n, 2, 32), 2).reshape(n, _QK_K)
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    scale = d * (packed_scales & 0x0F)
    offset = dmin * (packed_scales >> 4)
    return _affine(_sub_blocks(q, 16), scale[:, :, None], -offset[:, :, None]).reshape(n, _QK_K)


def _q3_k(blocks: np.ndarray) -> np.ndarray:
    # block_q3_K: 32 bytes of high bits (bit plane i holds values 32i..32i+31), 64 bytes of low 2 bits
    # (laid out as in Q2_K), 12 bytes of sixteen 6-bit scales, fp16 d. A *clear* high bit means -4.
    n = len(blocks)
    minus_four = _unpack(blocks[:, 0:32], 1).reshape(n, _QK_K)
    minus_four ^= np.uint8(1)
    minus_four <<= np.uint8(2)
    q = _unpack(blocks[:, 32:96].reshape(n, 2, 32), 2).reshape(n, _QK_K).view(np.int8)
    q -= minus_four.view(np.int8)

    # Scales: low 4 bits are the nibbles of bytes 0-7 (low nibbles = scales 0-7, high = 8-15); the top
    # 2 bits of scale i are bits 2*(i // 4) of byte 8 + i % 4. Stored with an offset of 32.
    packed = blocks[:, 96:108]
    scales = _unpack(packed[:, 0:8], 4).reshape(n, 16)
    scales |= _unpack(packed[:, 8:12], 2).reshape(n, 16) << np.uint8(4)
    scales = _centre(scales, 32)

    d = _f16(blocks, 108)
    return _affine(_sub_blocks(q, 16), (d * scales)[:, :, None]).reshape(n, _QK_K)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    # block_q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins for 8 sub-blocks of 32, 128 bytes of
    # nibbles; each 64-value chunk uses 32 bytes, low nibbles first.
    n = len(blocks)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    q = _unpack(blocks[:, 16:144].reshape(n, 4, 32), 4).reshape(n, _QK_K)
    return _affine(_sub_blocks(q, 32), (d * scales)[:, :, None], -(dmin * mins)[:, :, None]).reshape(n, _QK_K)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    # block_q5_K: as Q4_K plus 32 bytes of 5th bits placed before the nibbles; bit plane i holds the high
    # bits of sub-block i.
    n = len(blocks)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    q = _unpack(blocks[:, 48:176].reshape(n, 4, 32), 4).reshape(n, _QK_K)
    q |= _unpack(blocks[:, 16:48], 1).reshape(n, _QK_K) << np.uint8(4)
    return _affine(_sub_blocks(q, 32), (d * scales)[:, :, None], -(dmin * mins)[:, :, None]).reshape(n, _QK_K)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    # block_q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales (one per
    # sub-block of 16), fp16 d. Per 128-value half: 64 nibble bytes give values 0-63 (low nibbles) and
    # 64-127 (high nibbles); 32 bytes of 2-bit fields give four runs of 32. Values are offset by 32.
    n = len(blocks)
    q = _unpack(blocks[:, 0:128].reshape(n, 2, 64), 4).reshape(n, _QK_K)
    q |= _unpack(blocks[:, 128:192].reshape(n, 2, 32), 2).reshape(n, _QK_K) << np.uint8(4)
    q = _centre(q, 32)
    scales = blocks[:, 192:208].view(np.int8)
    d = _f16(blocks, 208)
    return _affine(_sub_blocks(q, 16), (d * scales)[:, :, None]).reshape(n, _QK_K)


_BLOCK_DECODERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    _T.Q8_0: _q8_0,
    _T.Q4_0: _q4_0,
    _T.Q4_1: _q4_1,
    _T.Q5_0: _q5_0,
    _T.Q5_1: _q5_1,
    _T.Q2_K: _q2_k,
    _T.Q3_K: _q3_k,
    _T.Q4_K: _q4_k,
    _T.Q5_K: _q5_k,
    _T.Q6_K: _q6_k,
}

_FLOAT_TYPES = (_T.F32, _T.F16, _T.BF16)

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = _FLOAT_TYPES + tuple(_BLOCK_DECODERS)
"""The GGUF tensor types :func:`dequantize` can read."""


# --- public API --------------------------------------------------------------------------------------


def _as_type(qtype: int | GGMLQuantizationType) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType(int(qtype))
    except ValueError:
        raise UnsupportedError(
            f"unknown GGUF tensor type id {int(qtype)}",
            hint="the file was written by a newer llama.cpp than the installed `gguf` package knows; "
            "upgrade it (pip install -U gguf) or re-convert the model",
        ) from None


def _supported_names() -> str:
    return ", ".join(t.name for t in SUPPORTED_TYPES)


def tensor_nbytes(qtype: int | GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """How many bytes a tensor of ``qtype`` with logical numpy ``shape`` occupies in a GGUF file.

    Works for every type the ``gguf`` package knows, not only the ones we can dequantize, so that a
    reader can skip over tensors it does not decode.
    """
    qtype = _as_type(qtype)
    if qtype not in GGML_QUANT_SIZES:
        raise UnsupportedError(
            f"GGUF tensor type {qtype.name} has no known block size",
            hint=f"use a model quantized to one of: {_supported_names()}",
        )
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    # Blocks never straddle rows in ggml, so the row length itself must be a whole number of blocks.
    row = shape[-1] if shape else 1
    if row % block_size:
        raise ModelFormatError(
            f"{qtype.name} tensor of shape {tuple(shape)} has rows of {row} values, "
            f"not a multiple of the {qtype.name} block size {block_size}",
            hint="the file is corrupt; re-download or re-convert it",
        )
    return math.prod(shape) // block_size * type_size


def dequantize(data: np.ndarray, qtype: int | GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Decode one GGUF tensor to a new float32 array of ``shape``.

    ``data`` is the tensor's raw data as ``gguf.GGUFReader(...).tensors[i].data`` gives it: a uint8
    array of bytes for block-quantized types, or a typed array (float32, float16, or uint16/uint8 for
    BF16) for float types; only its bytes are used. ``shape`` is the logical numpy shape, i.e. the
    GGUF ``ne`` dimensions reversed (rows last-axis-contiguous).

    Raises :class:`~lmforge.errors.UnsupportedError` for a type not in :data:`SUPPORTED_TYPES` and
    :class:`~lmforge.errors.ModelFormatError` when the byte count does not fit ``shape``.
    """
    qtype = _as_type(qtype)
    if qtype not in SUPPORTED_TYPES:
        raise UnsupportedError(
            f"GGUF tensor type {qtype.name} is not supported (supported: {_supported_names()})",
            hint="re-quantize the model to a supported type with llama.cpp's llama-quantize "
            "(e.g. Q8_0 or Q4_K_M), or load the original safetensors checkpoint",
        )
    shape = tuple(int(s) for s in shape)
    expected = tensor_nbytes(qtype, shape)

    # Only the bytes matter: the reader hands out typed arrays for float tensors and byte matrices for
    # quantized ones, and memory-maps the file, so normalise to one flat, contiguous byte vector.
    raw = np.ascontiguousarray(np.asarray(data)).reshape(-1).view(np.uint8)
    if raw.size != expected:
        raise ModelFormatError(
            f"{qtype.name} tensor of shape {shape} should have {expected} bytes of data, got {raw.size}",
            hint="the file is truncated or corrupt; re-download it",
        )

    if qtype == _T.F32:
        out = raw.view("<f4").astype(np.float32)
    elif qtype == _T.F16:
        out = raw.view("<f2").astype(np.float32)
    elif qtype == _T.BF16:
        # bfloat16 is the top half of a float32, so widening is just a 16-bit shift.
        out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        _, type_size = GGML_QUANT_SIZES[qtype]
        out = _BLOCK_DECODERS[qtype](raw.reshape(-1, type_size))
    return out.astype(np.float32, copy=False).reshape(shape)


# --- integer codes for packed weights ----------------------------------------------------------------

PACKED_TYPES = {_T.Q4_0: "int4", _T.Q4_1: "int4", _T.Q8_0: "int8"}
"""Block types whose values a packed layer holds exactly, and the kind of layer that holds them."""


def block_codes(
    data: np.ndarray, qtype: int | GGMLQuantizationType, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The integer codes and fp16 scales of a Q4_0 / Q4_1 / Q8_0 tensor, without decoding to floats.

    Returns ``(codes (N, K), scales (N, K/32), zeros (N, K/32) or None)`` in ``lmforge.quant``'s convention:
    int4 is ``(q - 8) * scale + zero`` with q in 0..15 (Q4_0: zero 0; Q4_1: zero = m + 8 d, kept in float32
    so that it is exact), int8 is ``q * scale``.
    """
    qtype = _as_type(qtype)
    if qtype not in PACKED_TYPES:
        raise UnsupportedError(f"{qtype.name} has no packed layout", hint="dequantize it instead")
    raw = np.ascontiguousarray(np.asarray(data)).reshape(-1).view(np.uint8)
    if raw.size != tensor_nbytes(qtype, shape):
        raise ModelFormatError(
            f"{qtype.name} tensor of shape {tuple(shape)} should have {tensor_nbytes(qtype, shape)} bytes",
            hint="the file is truncated or corrupt; re-download it",
        )
    rows, row_len = math.prod(shape[:-1]), shape[-1]
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    groups = (rows, row_len // 32)
    d = np.ascontiguousarray(blocks[:, 0:2]).view("<f2").reshape(groups)
    if qtype == _T.Q8_0:
        return blocks[:, 2:].view(np.int8).reshape(rows, row_len), d, None
    start = 2 if qtype == _T.Q4_0 else 4
    codes = _unpack(blocks[:, start:], 4).reshape(rows, row_len)
    if qtype == _T.Q4_0:
        return codes, d, np.zeros(groups, dtype=np.float32)
    m = np.ascontiguousarray(blocks[:, 2:4]).view("<f2").reshape(groups).astype(np.float32)
    return codes, d, m + 8 * d.astype(np.float32)
