"""Packed int4/int8 weights (lmforge.quant): kernels against the dequantized weight, GGUF block codes against
llama.cpp's own ``gguf.quants``, the bundled SmolLM2 packed vs float, quantize-on-load, saving, LoRA (QLoRA).

Tolerances: packed layers run one kernel, which computes with bf16 activations and returns bf16
(``PackedLinear.kernel_matmul``, both kinds: int8 is two 4-bit planes), so it is compared with that rounding
applied to the reference, and with the float32 result within bf16's rounding bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType
from safetensors.torch import load_file
from torch._dynamo.testing import CompileCounterWithBackend

from lmforge import LLM, cpu_kernel, quant, runtime
from lmforge.errors import LmforgeError, UnsupportedError
from lmforge.formats.gguf_quants import block_codes
from lmforge.generate import left_pad, prefill
from lmforge.lora import LoRAConfig, LoRALinear, inject_lora, lora_layers, merge_lora
from lmforge.model import StaticKVCache
from lmforge.quant import (
    GROUP,
    HEAD_EXACT_TOP,
    PACK_ROWS,
    PackedEmbedding,
    PackedLinear,
    QuantizedWeight,
    check_quant,
    dequantize_planes,
    exact_scales_mins,
    kernel_layout,
    packed_layers,
    packing_summary,
    quantize_weight,
    set_batch_weights,
    unpack_codes,
)

from .conftest import SAMPLE_TEXT, data_lines, one_intra_op_thread, tiny_llm

BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits: one rounding is off by at most this much, relatively
CHINESE = [line for line in data_lines("text/luxun.txt", limit=10) if len(line) > 40][:2]  # Lu Xun's prose


@pytest.fixture(autouse=True)
def _one_thread():
    with one_intra_op_thread():
        yield


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the logits at every position."""
    return F.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1)


def logits(llm: LLM, text: str | list[str]) -> torch.Tensor:
    texts = [text] if isinstance(text, str) else text
    ids = [llm.tokenizer.encode(t) for t in texts]
    n = min(len(i) for i in ids)
    with torch.no_grad():
        return llm.model(torch.tensor([i[:n] for i in ids]))[0]


def bf16_scaled_weight(layer: PackedLinear) -> torch.Tensor:
    """The weight PyTorch's kernel multiplies by: the codes with the bf16 scales and zeros."""
    N = layer.out_features
    codes = unpack_codes(layer.packed, layer.planes * layer.in_features, 0, N, layer.layout)
    return dequantize_planes(codes, layer.scales_zeros[:, :N], layer.planes)


# (q - 8) * scale + zero and q * scale + min of the same fp16 scale and min differ by float32 rounding only.
FLOAT_EPS = 2.0**-22


def random_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Rows of different scales and offsets, like a trained layer's, not all centred on zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    return w + 0.3 * torch.randn(n, k // GROUP, 1, generator=g).repeat_interleave(GROUP, 1).view(n, k)


# ----------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("rows", [1, 8, 100])  # the kernel: below GEMM_ROWS
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_pytorch_kernel_computes_in_bf16(kind, rows, bias):
    n, k = 96, 160
    weight = random_weight(n, k)
    b = torch.randn(n) if bias else None
    layer = PackedLinear(quantize_weight(weight, kind), b)
    layer.float32_kernel = False  # PyTorch's kernel for every row count (lmforge's: the next test)
    w = bf16_scaled_weight(layer)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    exact = F.linear(x, w, b)
    # What the kernel is documented to compute: bf16 activations in, the product rounded to bf16 out.
    # (Relative error of the whole output, as a norm: single elements may round to the neighbouring bf16.)
    rounded = F.linear(x.bfloat16().float(), w).bfloat16().float() + (b if bias else 0)
    assert ((y - rounded).norm() / rounded.norm()).item() <= 1e-3
    # and against float32 arithmetic: within two bf16 roundings (input and output) of each term
    bound = BF16_EPS * (F.linear(x, w).abs() + x.abs() @ w.abs().T) + 1e-6
    assert ((y - exact).abs() <= bound).all()
    # a batch of sequences (B, T, K) gives the same rows
    with torch.no_grad():
        y3 = layer(x.view(1, rows, k).expand(2, rows, k))
        assert y3.shape == (2, rows, n) and torch.equal(y3, layer(x.repeat(2, 1)).view(2, rows, n))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("rows", [1, 7])
def test_float32_kernel_computes_with_the_values_packed(kind, bias, rows):
    """Rows through lmforge's kernel (``lmforge.cpu_kernel``; one, or several 4 at a time where it reads 64-row
    blocks): float32 products of the codes with the scales and zeros as packed, not bf16 ones: float32
    arithmetic's error, against float64, eager and compiled."""
    n, k = 192, 160  # whole blocks of rows under every layout
    b = torch.randn(n) if bias else None
    layer = PackedLinear(quantize_weight(random_weight(n, k, seed=5), kind), b)
    assert layer.float32_kernel  # x86 with AVX2 and g++: every machine CI runs on; it must build there
    layer.bf16_dot = False  # float32 for every row count (bf16 dot products: the next test)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(6))
    assert layer.computes_in_float32(x) == (rows == 1 or kernel_layout() == ("split", 64))
    exact = x.double() @ layer.dequantize().double().T + (b.double() if bias else 0)
    bound = 1e-6 if layer.computes_in_float32(x) else 1e-2  # several rows on AVX2: PyTorch's kernel
    # compiled for several rows (a server's batch step; one row's is test_compiled_packed_layer_runs_the_packed_
    # kernel): each compile is one more variant of PackedLinear.forward, of dynamo's 8 a function
    compiled = torch.compile(layer, fullgraph=True, dynamic=False) if rows > 1 else layer
    with torch.no_grad():
        for y in (layer(x), compiled(x)):
            assert y.dtype == torch.float32
            assert ((y.double() - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item() <= bound
        # PyTorch's kernel is ~1e-3 away: bf16 inputs, scales and outputs
        layer.float32_kernel = False
        assert ((layer(x).double() - exact).norm() / exact.norm()).item() > 1e-4


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("rows", [2, 5, 8, 13])  # 13: int8's 8 rows at a time and 5 more, int4's 4s and 1
def test_a_batch_step_multiplies_in_bf16_dot_products_where_set_and_the_cpu_has_them(kind, rows):
    """A step of several sequences, one position each (x (B, 1, K)), in a layer set to ``bf16_batches``: where
    the kernel reads 64-row blocks and the CPU has AVX512-BF16, lmforge's kernel rounds x to bf16 and sums its
    exact products with the values packed in float32 (float32 arithmetic's error against float64 products of
    bf16(x), eager and compiled). A prompt's positions, one sequence's step and a layer not set stay float32; so
    does everything on a CPU without them."""
    n, k = 192, 160
    b = torch.randn(n)
    layer = PackedLinear(quantize_weight(random_weight(n, k, seed=7), kind), b)
    bf16 = kernel_layout() == ("split", 64) and torch.cpu._is_avx512_bf16_supported()
    assert layer.bf16_dot == bf16 and not layer.bf16_batches  # off unless a server sets it
    step = torch.randn(rows, 1, k, generator=torch.Generator().manual_seed(rows))
    w = layer.dequantize().double()
    exact = step.double() @ w.T + b.double()
    rounded = step.bfloat16().double() @ w.T + b.double()  # what bf16 dot products compute

    def error(y: torch.Tensor, reference: torch.Tensor) -> float:
        return ((y.double() - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()

    with torch.no_grad():
        assert error(layer(step), exact) <= 1e-6  # not set
        layer.bf16_batches = True
        assert layer.multiplies_in_bf16(step) == bf16
        prompt, one = step.view(1, rows, k), step[:1]
        assert not layer.multiplies_in_bf16(prompt) and not layer.multiplies_in_bf16(one)
        assert error(layer(prompt), exact.view(1, rows, n)) <= 1e-6
        assert error(layer(one), exact[:1]) <= 1e-6
        # compiled for a server's batch: kernel_matmul, whose variants dynamo counts apart from forward's
        compiled = torch.compile(layer.kernel_matmul, fullgraph=True, dynamic=False)
        x2 = step.view(rows, k)
        for y in (layer(step), compiled(x2, True).view(rows, 1, n) + b) if rows == 8 else (layer(step),):
            if bf16:
                assert error(y, rounded) <= 2e-6 and error(y, exact) > 1e-4  # bf16's rounding of x shows
            else:
                assert error(y, exact) <= 1e-6


def test_kernel_library_loads_only_from_a_folder_of_this_user(tmp_path, monkeypatch):
    """The kernel is native code lmforge runs: a cache folder everyone can write to (a planted library) is refused,
    and packed layers keep PyTorch's kernel (``cpu_kernel.available`` says why, on one line)."""
    shared = tmp_path / "inductor"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setattr(runtime, "configure_compile_cache", lambda: shared)
    with pytest.raises(RuntimeError, match="everyone can write"):
        cpu_kernel._library()
    shared.chmod(0o755)
    (shared / "lmforge-kernels").chmod(0o777)
    with pytest.raises(RuntimeError, match="everyone can write"):
        cpu_kernel._library()


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_dequantized_weight_is_within_half_a_step_of_the_float_weight(kind):
    weight = random_weight(64, 128, seed=1)
    q = quantize_weight(weight, kind)
    step = q.scales.repeat_interleave(GROUP, 1)  # one quantization step per value
    assert ((q.dequantize() - weight).abs() <= step / 2 + 1e-6).all()
    # quantize_weight's scales and mins are fp16 values, which the layer holds exactly (its fp16 pairs)
    assert torch.equal(q.scales, q.scales.half().float())
    layer = PackedLinear(q)
    error = (layer.dequantize() - q.dequantize()).abs()
    size = 128 * q.scales if kind == "int8" else 8 * q.scales + q.zeros.abs()  # how large a value gets
    assert (error <= FLOAT_EPS * size.repeat_interleave(GROUP, 1) + 1e-7).all()
    # what PyTorch's kernel reads: each rounded once to bf16 (BF16_EPS, relatively)
    error = (bf16_scaled_weight(layer) - q.dequantize()).abs()
    assert (error <= BF16_EPS * size.repeat_interleave(GROUP, 1) + 1e-7).all()


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_compiled_packed_layer_runs_the_packed_kernel(kind):
    layer = PackedLinear(quantize_weight(random_weight(40, 96, seed=2), kind), torch.randn(40))  # 40: padded
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=False)
    for rows in (1, 8):  # decode-sized inputs
        x = torch.randn(rows, 96)
        with torch.no_grad():
            assert relative_error(compiled(x), layer(x)) <= 1e-3
    ops = [str(node.target) for graph in counter.graphs for node in graph.graph.nodes]
    # the packed kernel, never a dequantized GEMM
    assert "aten._weight_int4pack_mm_for_cpu" in ops and not any("linear" in op for op in ops)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_kernel_dequantizes_rows_as_their_codes_and_pairs_say(kind):
    """``lmforge::dequantize_rows`` (a long prompt's GEMM weights, dense copies, ``dequantize``): bit for bit what
    unpacking the codes with torch ops and scaling them by the fp16 pairs gives, in float32; in bf16 that rounded
    once, for any slice of whole blocks."""
    layer = PackedLinear(
        quantize_weight(random_weight(192, 160, seed=8), kind)
    )  # 192: whole blocks everywhere
    assert layer.float32_kernel
    n, k, block = layer.out_features, layer.in_features, layer.layout[1]
    codes = unpack_codes(layer.packed, layer.planes * k, 0, n, layer.layout)
    reference = dequantize_planes(
        codes, layer.scales_zeros[:, :n], layer.planes, exact=layer.exact_of(slice(n))
    )
    assert torch.equal(layer.dequantize(), reference)
    rows = layer.dequantized_rows(block, 3 * block, torch.bfloat16)
    assert rows.dtype == torch.bfloat16 and torch.equal(rows, reference[block : 3 * block].bfloat16())


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_long_inputs_run_a_gemm_over_slices_of_rows(kind, monkeypatch):
    """From GEMM_ROWS input rows on, a layer dequantizes a slice of rows at a time for a GEMM: in float32 the
    product of the same dequantized weight, exactly, whichever slice a row falls in (the padded last block too);
    in bf16 (CPUs with bf16 units) within the kernel's bounds."""
    n, k = 300, 160  # 300 rows: padded to 304, the last block partial in every layout
    layer = PackedLinear(quantize_weight(random_weight(n, k, seed=6), kind), torch.randn(n))
    w = layer.dequantize()
    x = torch.randn(quant.GEMM_ROWS[kind], k, generator=torch.Generator().manual_seed(7))
    exact = F.linear(x, w, layer.bias)
    monkeypatch.setattr(quant.runtime, "bf16_matmul_units", lambda: False)
    for weights in (quant.GEMM_DEQUANT_WEIGHTS, 64 * k, 1):  # one slice; slices of 64 rows; one block a slice
        monkeypatch.setattr(quant, "GEMM_DEQUANT_WEIGHTS", weights)
        with torch.no_grad():
            y = layer(x)
        assert y.shape == (quant.GEMM_ROWS[kind], n) and torch.allclose(y, exact, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(quant.runtime, "bf16_matmul_units", lambda: True)
    with torch.no_grad():
        y = layer(x)
    bound = (
        2 * BF16_EPS * (F.linear(x, w).abs() + x.abs() @ w.abs().T) + 1e-6
    )  # as the kernel's, and w in bf16
    assert y.dtype == torch.float32 and ((y - exact).abs() <= bound).all()
    with torch.no_grad():  # one row fewer: the kernel, bf16 activations in and out
        assert relative_error(layer(x[1:]), exact[1:]) <= 1e-2
        assert not torch.allclose(layer(x[1:]), exact[1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_a_dense_copy_multiplies_batches_of_several_rows(kind):
    """``keep_dense_copy``: from DENSE_ROWS[kind] rows on, the bf16 copy of the same dequantized weight (a GEMM, as
    the kernel computes: bf16 in, within two bf16 roundings of float32); fewer rows still run the kernel, bit
    for bit as before; the copy is never saved and not counted as the packed weight's bytes."""
    n, k = 300, 160  # padded to 304 rows: the copy holds the real 300
    layer = PackedLinear(quantize_weight(random_weight(n, k, seed=8), kind), torch.randn(n))
    w, packed_bytes, state = layer.dequantize(), layer.weight_bytes, set(layer.state_dict())
    x = torch.randn(quant.DENSE_ROWS[kind], k, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before_few, before_many = layer(x[:-1]), layer(x)
        assert layer.keep_dense_copy() == 2 * n * k
        assert torch.equal(layer.dense, w.bfloat16())
        after_few, after_many = layer(x[:-1]), layer(x)
    exact = F.linear(x, w, layer.bias)
    bound = 2 * BF16_EPS * (F.linear(x, w).abs() + x.abs() @ w.abs().T) + 1e-6
    assert ((after_many - exact).abs() <= bound).all()
    assert torch.equal(after_many, (F.linear(x.bfloat16(), w.bfloat16()).float() + layer.bias))
    assert not torch.equal(after_many, before_many)  # the copy, not the kernel, multiplied these rows
    assert torch.equal(after_few, before_few)
    assert layer.weight_bytes == packed_bytes and set(layer.state_dict()) == state


def test_set_batch_weights_follows_the_setting_and_the_cpu(monkeypatch, tiny_tokenizer):
    def packed_tiny() -> nn.Module:
        return quant.quantize_model(tiny_llm("tiny-llama", tiny_tokenizer).model, "int4")

    def batches_in_bf16(model: nn.Module) -> set[bool]:
        layers = [*quant.packed_layers(model).values(), *(j.layer for j in quant.joined_layers(model))]
        return {layer.bf16_batches for layer in layers}

    model = packed_tiny()
    layers = {id(m): m for m in quant.packed_layers(model).values()}.values()
    weights = sum(m.out_features * m.in_features for m in layers)
    assert quant.set_batch_weights(model, "packed") == 0 and quant.dense_copy_bytes(model) == 0
    assert batches_in_bf16(model) == {False}
    assert quant.set_batch_weights(model, "packed-bf16") == 0 and batches_in_bf16(model) == {True}
    assert quant.bf16_batches(model) == any(m.bf16_dot for m in layers)  # where the CPU has them
    monkeypatch.setattr(quant.runtime, "bf16_matmul_units", lambda: False)
    assert quant.set_batch_weights(model, "auto") == 0  # bf16 emulated: slower than the kernel
    monkeypatch.setattr(quant.runtime, "bf16_matmul_units", lambda: True)
    fewest = min(quant.DENSE_ROWS.values())
    assert (
        quant.set_batch_weights(model, "auto", max_batch=fewest - 1) == 0
    )  # never that many rows (default 8)
    assert quant.set_batch_weights(model, "auto") == 0 and batches_in_bf16(model) == {True}
    assert (
        quant.set_batch_weights(model, "auto", max_batch=fewest)
        == 2 * weights
        == quant.dense_copy_bytes(model)
    )
    # set again: the copies go, and so do bf16 batches (exact: each stream's tokens are its solo run's)
    assert quant.set_batch_weights(model, "packed") == 0 == quant.dense_copy_bytes(model)
    assert batches_in_bf16(model) == {False} and not quant.bf16_batches(model)
    assert quant.set_batch_weights(packed_tiny(), "bf16") == 2 * weights
    with pytest.raises(LmforgeError, match="unknown batch weights"):
        quant.set_batch_weights(model, "fp8")


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_exact_top_rescores_a_heads_best_logits_in_float32(kind):
    """The head's top logits come out in float32 arithmetic, so a near-tie the bf16 output would blur stays
    ordered as the dequantized weights order it; the other logits stay the kernel's."""
    n, k = 300, 160
    layer = PackedLinear(quantize_weight(random_weight(n, k, seed=3), kind))
    w = layer.dequantize()
    x = (
        torch.randn(5, k, generator=torch.Generator().manual_seed(4)) * 4
    )  # logits of tens: bf16 steps of 1/8+
    with torch.no_grad():
        plain = layer(x)
        layer.exact_top = 8
        rescored = layer(x)
    exact = F.linear(x, w)
    top = exact.topk(4, dim=-1).indices
    assert torch.allclose(rescored.gather(-1, top), exact.gather(-1, top), rtol=1e-6, atol=1e-5)
    assert not torch.allclose(plain.gather(-1, top), exact.gather(-1, top), rtol=1e-6, atol=1e-5)
    assert torch.equal(rescored.argmax(-1), exact.argmax(-1))
    # only the k best of each row change
    assert ((rescored != plain).sum(-1) <= 8).all()
    # rows through a bf16 copy (a server's batch) are rescored too, also where lmforge's kernel would take them
    head = PackedLinear(
        quantize_weight(random_weight(320, k, seed=3), kind)
    )  # whole blocks: its kernel reads it
    head.exact_top = 8
    head.keep_dense_copy()
    rows = torch.randn(quant.DENSE_ROWS[kind], k, generator=torch.Generator().manual_seed(8)) * 4
    exact = F.linear(rows, head.dequantize())
    top = exact.topk(4, dim=-1).indices
    with torch.no_grad():
        assert torch.allclose(head(rows).gather(-1, top), exact.gather(-1, top), rtol=1e-6, atol=1e-5)
    # a vocabulary smaller than k is rescored whole
    small = PackedLinear(quantize_weight(random_weight(16, k, seed=5), kind))
    small.exact_top = 32
    with torch.no_grad():
        assert torch.allclose(small(x), F.linear(x, small.dequantize()), rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------ GGUF block codes
@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1, QType.Q8_0], ids=lambda t: t.name)
def test_block_codes_decode_like_llama_cpp(qtype):
    rows, k = 32, 256
    data = random_weight(rows, k, seed=3).numpy()
    data[0, :GROUP] = 0.0  # an all-zero block (scale 0)
    data[1, :GROUP] = np.linspace(0.5, 2.0, GROUP)  # an all-positive block (Q4_1's minimum is not 0)
    raw = gguf.quants.quantize(data, qtype)
    reference = gguf.quants.dequantize(raw, qtype).reshape(rows, k)

    codes, scales, zeros = block_codes(raw, qtype, (rows, k))
    kind = "int8" if qtype == QType.Q8_0 else "int4"
    assert codes.shape == (rows, k) and scales.shape == (rows, k // GROUP)
    assert scales.dtype == np.float16  # the file's own scales, not rounded again
    if kind == "int4":
        assert codes.dtype == np.uint8 and codes.max() <= 15
    else:
        assert codes.dtype == np.int8 and zeros is None
    weight = QuantizedWeight(
        kind,
        torch.from_numpy(codes),
        torch.from_numpy(scales),
        None if zeros is None else torch.from_numpy(zeros),
    )
    ours = weight.dequantize().numpy()
    assert np.abs(ours - reference).max() <= 1e-6 * np.abs(reference).max()
    if qtype != QType.Q4_1:  # (q - 8) * d and q * d are the reference's own float32 products
        assert np.array_equal(ours, reference)
    # a packed layer built from the file's codes holds exactly those codes
    assert torch.equal(PackedLinear(weight).unpacked().codes.to(torch.int16), weight.codes.to(torch.int16))


# ----------------------------------------------------------------------------------- packing round trip
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("n", [40, PACK_ROWS + 48])  # rows padded to 48; packed in two chunks
def test_unpacked_recovers_the_exact_codes(kind, n):
    k = 96
    g = torch.Generator().manual_seed(4)
    scales = (torch.rand(n, k // GROUP, generator=g) + 0.01).half()  # fp16, as in a GGUF file
    if kind == "int4":
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        mins = torch.randn(n, k // GROUP, generator=g).half()  # Q4_1's m
        zeros = mins.float() + 8 * scales.float()
    else:
        codes = torch.randint(-128, 128, (n, k), generator=g).to(torch.int8)
        zeros = None
    layer = PackedLinear(QuantizedWeight(kind, codes, scales, zeros))
    back = layer.unpacked()
    assert back.kind == kind and back.codes.dtype == codes.dtype and torch.equal(back.codes, codes)
    assert torch.equal(back.scales, scales.float())
    exact_scales, exact_mins = (
        t.T for t in exact_scales_mins(layer.exact_of(slice(n)))
    )  # the float32 kernel's
    s = scales.float()
    if kind == "int4":
        assert torch.equal(exact_scales, s) and torch.equal(exact_mins, mins.float())
    else:  # two planes, q = 16 hi + lo: the high one's (16 s, -128 s), the low one's (s, 0)
        assert torch.equal(exact_scales, torch.cat([16 * s, s], 1))
        assert torch.equal(exact_mins, torch.cat([-128 * s, torch.zeros_like(s)], 1))


def test_packed_rows_need_whole_groups():
    with pytest.raises(UnsupportedError, match="multiple of 32"):
        quantize_weight(torch.randn(32, 40), "int8")


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_kernel_layout_is_read_right_on_other_cpus(capability, tmp_path):
    """The kernel packs codes differently per CPU vector width; each layout unpacks to the codes it packed, and
    lmforge's float32 kernel runs (its AVX2 build) where the layout is one it reads."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import torch\n"
        "from lmforge.quant import PackedLinear, PackedEmbedding, quantize_weight, kernel_layout, unpack_codes\n"
        "from lmforge.quant import dequantize_planes\n"
        "for kind in ('int4', 'int8'):\n"
        "    w = torch.randn(208, 64)\n"  # three whole 64-row blocks (six of 32) and a partial one
        "    q = quantize_weight(w, kind)\n"
        "    layer = PackedLinear(q)\n"
        "    assert torch.equal(layer.unpacked().codes, q.codes), kind\n"
        "    rows = torch.tensor([0, 31, 32, 63, 64, 191, 192, 207])\n"
        "    assert torch.equal(PackedEmbedding(layer)(rows), layer.dequantize()[rows]), kind\n"
        # lmforge's float32 kernel where the layout is one it reads (AVX2's 32-row blocks), on whole blocks
        "    layer = PackedLinear(quantize_weight(w[:192], kind))\n"
        "    x = torch.randn(1, 64)\n"
        "    exact = x.double() @ layer.dequantize().double().T\n"
        "    error = ((layer(x).double() - exact).norm() / exact.norm()).item()\n"
        "    assert error <= (1e-6 if layer.float32_kernel else 1e-2), (kind, error)\n"
        # and its dequantize_rows (scalar on 32-row blocks): what unpacking with torch ops gives
        "    if layer.float32_kernel:\n"
        "        codes = unpack_codes(layer.packed, layer.planes * 64, 0, 192, layer.layout)\n"
        "        ref = dequantize_planes(codes, layer.scales_zeros[:, :192], layer.planes, exact=layer.exact_of(slice(192)))\n"
        "        assert torch.equal(layer.dequantize(), ref), kind\n"
        "        assert torch.equal(layer.dequantized_rows(32, 96, torch.bfloat16), ref[32:96].bfloat16()), kind\n"
        "print(kernel_layout(), layer.float32_kernel)\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    expected = {"avx2": (("split", 32), True), "default": (("pairs", 32), False)}[capability]
    assert done.stdout.strip() == " ".join(map(str, expected))


# --------------------------------------------------------------------------------- the bundled SmolLM2
@pytest.fixture(scope="module")
def smollm2_packed(smollm2_gguf):
    return LLM.load(smollm2_gguf, device="cpu")  # quant="auto": the file's Q4_1 / Q8_0 layers stay packed


def test_smollm2_packed_matches_float(smollm2_packed, smollm2):
    # conftest's smollm2 loads with dtype="float32": quant "auto" then means "none"
    packed, floats = smollm2_packed, smollm2
    assert packing_summary(packed.model).startswith("210 int4, 1 int8 linear layers")
    assert packed.model.lm_head.exact_top == HEAD_EXACT_TOP
    # One sequence's step runs the head through lmforge's float32 kernel: every logit exact, not only the 8
    # best that PyTorch's bf16 kernel gets rescored (it is ~1e-3 off elsewhere).
    head = packed.model.lm_head
    state = torch.randn(1, head.in_features, generator=torch.Generator().manual_seed(7))
    exact = state.double() @ head.dequantize().double().T
    with torch.no_grad():
        assert ((head(state).double() - exact).norm() / exact.norm()).item() <= 1e-6
    assert packing_summary(floats.model) == "not packed (float weights)"
    # the tied table and head are one set of int8 codes
    assert isinstance(packed.model.wte, PackedEmbedding) and packed.model.wte._head[0] is packed.model.lm_head
    assert packed.model.num_parameters() == floats.model.num_parameters()
    for text in ("The capital of France is", "床前明月光，疑是地上霜。举头望明月，"):
        a, b = logits(packed, text), logits(floats, text)
        assert a[0, -1].argmax() == b[0, -1].argmax()
        assert cosine(a, b).min() > 0.99


def test_smollm2_packed_layers_hold_the_files_values(smollm2_packed, smollm2):
    """Codes, scales and mins load exactly (the fp16 scales as a bf16 and its fix); PyTorch's kernel reads the
    scales rounded to bf16."""
    floats = smollm2.model.state_dict()
    layers = packed_layers(smollm2_packed.model)
    table = floats["wte.weight"]  # Q8_0
    assert torch.equal(layers["lm_head"].dequantize(), table)
    assert ((bf16_scaled_weight(layers["lm_head"]) - table).abs() <= BF16_EPS * table.abs()).all()
    w = floats["blocks.3.mlp.down_proj.weight"]  # Q4_1
    assert torch.equal(layers["blocks.3.mlp.down_proj"].dequantize(), w)
    err = (bf16_scaled_weight(layers["blocks.3.mlp.down_proj"]) - w).abs().max() / w.abs().max()
    assert 0 < err <= 1e-2


# ------------------------------------------------------------------------------ quantize on load, saving
PRESETS = ["tiny-gpt2", "tiny-llama"]


@pytest.fixture(scope="module")
def float_folders(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("float")
    return {preset: tiny_llm(preset, tiny_tokenizer).save(root / preset) for preset in PRESETS}


# Closeness of a random tiny model's logits to float (its weights are uniform noise: harder than a trained
# model's, where the bundled SmolLM2 shows int4 at cosine 0.997).
CLOSE = {"int8": (0.02, 0.9995), "int4": (0.15, 0.99)}  # (max relative error, min cosine)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("preset", PRESETS)
def test_quantize_on_load_is_close_to_float(preset, kind, float_folders):
    folder = float_folders[preset]
    floats = LLM.load(folder, device="cpu", dtype="float32")
    packed = LLM.load(folder, device="cpu", quant=kind)
    n_linear = 2 * (6 if preset == "tiny-gpt2" else 7)  # the blocks' layers; the head is int8 in both kinds
    expected = f"{n_linear} int4, 1 int8" if kind == "int4" else f"{n_linear + 1} int8"
    assert packing_summary(packed.model).startswith(f"{expected} linear layers")
    assert packed.model.num_parameters() == floats.model.num_parameters()
    a, b = logits(packed, SAMPLE_TEXT[:2]), logits(floats, SAMPLE_TEXT[:2])
    max_error, min_cosine = CLOSE[kind]
    assert relative_error(a, b) <= max_error
    assert cosine(a, b).min() >= min_cosine
    assert packed.generate_text("The quick", max_new_tokens=4)  # the decode loop runs on packed layers


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("preset", PRESETS)
def test_saving_a_packed_model_writes_its_float_weights(preset, kind, float_folders, tmp_path):
    packed = LLM.load(float_folders[preset], device="cpu", quant=kind)
    out = packed.save(tmp_path / "saved")
    written = load_file(out / "model.safetensors")
    original = load_file(float_folders[preset] / "model.safetensors")
    assert written.keys() == original.keys()  # no codes, scales or packed buffers: the float layout
    assert all(t.dtype == torch.float32 for t in written.values())
    for name, layer in packed_layers(packed.model).items():
        if f"{name}.weight" in written:  # a tied head is written once, as the table
            assert torch.equal(written[f"{name}.weight"], layer.dequantize())
    reloaded = LLM.load(out, device="cpu", dtype="float32")
    assert packing_summary(reloaded.model) == "not packed (float weights)"
    a, b = logits(reloaded, SAMPLE_TEXT[:2]), logits(packed, SAMPLE_TEXT[:2])
    # the same weights; the packed model differs only by its kernel's bf16 arithmetic
    assert relative_error(a, b) <= 0.01
    assert cosine(a, b).min() > 0.9999


def test_export_of_a_packed_model_writes_float_weights(float_folders, tmp_path):
    packed = LLM.load(float_folders["tiny-gpt2"], device="cpu", quant="int8")
    hf = LLM.load(packed.export(tmp_path / "hf"), device="cpu", dtype="float32")
    q8 = LLM.load(packed.export(tmp_path / "m.gguf", format="gguf", quant="q8_0"), device="cpu")
    assert packing_summary(q8.model).startswith("13 int8")  # the GGUF's Q8_0 layers load packed again
    ref = logits(packed, SAMPLE_TEXT[0])
    assert relative_error(logits(hf, SAMPLE_TEXT[0]), ref) <= 0.01  # float32 vs the packed kernel's bf16
    assert relative_error(logits(q8, SAMPLE_TEXT[0]), ref) <= 0.05


@pytest.mark.parametrize(
    ("preset", "quant"), [("tiny-gpt2", "q4_0"), ("tiny-llama", "q8_0"), ("tiny-llama", "q4_0")]
)
def test_gguf_blocks_load_packed_with_the_files_values(preset, quant, tiny_tokenizer, tmp_path):
    """GPT-2's fused qkv splits, and llama.cpp's q/k row order is undone on codes as on floats."""
    llm = tiny_llm(preset, tiny_tokenizer, tie_embeddings=True)  # GGUF's llama has no untied flag
    path = llm.export(tmp_path / "m.gguf", format="gguf", quant=quant)
    packed = LLM.load(path, device="cpu")
    floats = LLM.load(path, device="cpu", dtype="float32", quant="none")
    kind = "int4" if quant == "q4_0" else "int8"
    assert kind in packing_summary(packed.model)
    state = floats.model.state_dict()
    for name, layer in packed_layers(packed.model).items():
        w = state[f"{name}.weight"] if name != "lm_head" else state["wte.weight"]
        # the file's codes; its fp16 scales rounded to bf16 for the kernel
        assert ((layer.dequantize() - w).abs() <= BF16_EPS * w.abs() + 1e-7).all(), name
    a, b = logits(packed, SAMPLE_TEXT[:2]), logits(floats, SAMPLE_TEXT[:2])
    assert (a[:, -1].argmax(-1) == b[:, -1].argmax(-1)).all()
    assert cosine(a, b).min() > 0.999


def test_layers_with_rows_the_kernel_cannot_tile_are_padded(tiny_tokenizer, tmp_path):
    # head_dim 24 with one kv head: k_proj and v_proj have 24 outputs, not a multiple of the kernel's 16
    llm = tiny_llm("tiny-llama", tiny_tokenizer, n_embd=96, n_head=4, n_kv_head=1)
    packed = LLM.load(llm.save(tmp_path / "m"), device="cpu", quant="int4")
    k_proj = packed_layers(packed.model)["blocks.0.attn.k_proj"]
    assert k_proj.kind == "int4" and k_proj.packed.shape[0] == 32 and k_proj.dequantize().shape == (24, 96)
    assert cosine(logits(packed, SAMPLE_TEXT[0]), logits(llm, SAMPLE_TEXT[0])).min() > 0.95
    assert packed.generate_text("The quick", max_new_tokens=3)  # decode-sized inputs: the kernel, sliced


def test_packed_model_in_bfloat16(float_folders):
    """Activations follow the requested dtype, the packed embedding table's lookups included."""
    llm = LLM.load(float_folders["tiny-gpt2"], device="cpu", dtype="bfloat16", quant="int8")
    assert llm.model.dtype == torch.bfloat16
    assert llm.model.wte(torch.tensor([1, 2])).dtype == torch.bfloat16
    assert logits(llm, SAMPLE_TEXT[0]).dtype == torch.bfloat16
    inject_lora(llm.model, LoRAConfig(rank=4))  # float32 adapters beside bf16 activations
    assert logits(llm, SAMPLE_TEXT[0]).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------- options
def test_quant_option_is_checked(tmp_path):
    with pytest.raises(LmforgeError, match="unknown quant 'bogus'") as raised:
        LLM.load(tmp_path, quant="bogus")
    assert "int4" in raised.value.hint and "none" in raised.value.hint
    with pytest.raises(UnsupportedError, match="CPU") as raised:
        check_quant("int4", torch.device("cuda"))
    assert "quant='none'" in raised.value.hint
    with pytest.raises(UnsupportedError):
        check_quant("int8", torch.device("cuda"))
    assert check_quant("none", torch.device("cuda")) == "none"
    assert check_quant("auto", torch.device("cpu")) == "auto"


# ---------------------------------------------------------------------------------------- LoRA / QLoRA
def test_int4_layer_passes_gradients_to_its_input():
    layer = PackedLinear(quantize_weight(random_weight(64, 96, seed=5), "int4"))
    x = torch.randn(5, 96, requires_grad=True)
    grad = torch.randn(5, 64)
    layer(x).backward(grad)
    assert torch.allclose(x.grad, grad @ layer.dequantize(), atol=1e-5)


def test_lora_wraps_packed_layers(float_folders):
    packed = LLM.load(float_folders["tiny-llama"], device="cpu", quant="int4")
    names = inject_lora(packed.model, LoRAConfig(rank=4, targets=["q_proj", "down_proj"]))
    assert names == [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.q_proj", "mlp.down_proj")]
    layer = lora_layers(packed.model)["blocks.0.attn.q_proj"]
    assert isinstance(layer.base, PackedLinear)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_A.weight.device.type == "cpu"
    trainable = {n for n, p in packed.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert not any(b.requires_grad for b in packed.model.buffers())


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_qlora_step_lowers_loss_and_merges_to_float(kind, float_folders, tiny_tokenizer):
    packed = LLM.load(float_folders["tiny-llama"], device="cpu", quant=kind)
    torch.manual_seed(0)
    config = LoRAConfig(
        rank=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    )
    inject_lora(packed.model, config)
    batch = torch.tensor([tiny_tokenizer.encode(t)[:64] for t in CHINESE])  # (2, 64): bytes of unseen text

    def loss() -> torch.Tensor:
        return packed.model(batch[:, :-1], targets=batch[:, 1:])[1]

    params = [p for p in packed.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    packed.model.train()
    before = loss()
    before.backward()
    # B starts at zero, so the first gradients are B's; every layer's B gets one through the packed layers
    assert all(layer.lora_B.weight.grad.abs().sum() > 0 for layer in lora_layers(packed.model).values())
    optimizer.step()
    optimizer.zero_grad()
    packed.model.eval()
    with torch.no_grad():
        after = loss()
    assert after < before - 0.02
    # the next gradients reach A too (B is non-zero now), through the packed layers' backward
    packed.model.train()
    loss().backward()
    assert all(layer.lora_A.weight.grad.abs().sum() > 0 for layer in lora_layers(packed.model).values())
    packed.model.eval()

    with torch.no_grad():
        unmerged_logits = packed.model(batch)[0]
        checks = {}  # per wrapped layer: an input, the wrapped layer's output, and the float32 sum it stands for
        for name, layer in lora_layers(packed.model).items():
            x = torch.randn(3, layer.base.in_features)
            exact = F.linear(x, layer.base.dequantize()) + layer.lora_B(layer.lora_A(x)) * layer.scaling
            checks[name] = (x, layer(x), exact)
        merge_lora(packed.model)
        assert not lora_layers(packed.model)
        for name, (x, before_merge, exact) in checks.items():
            merged = packed.model.get_submodule(name)
            assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
            assert relative_error(merged(x), exact) <= 1e-5  # the fold is exact
            assert (
                relative_error(merged(x), before_merge) <= 1e-2
            )  # 3 rows: the packed layer ran its bf16 kernel
        merged_logits = packed.model(batch)[0]
    assert relative_error(merged_logits, unmerged_logits) <= 0.01  # the packed base's bf16 kernel
    assert cosine(merged_logits, unmerged_logits).min() > 0.9999
    # the layers LoRA did not target stay packed
    assert isinstance(packed.model.get_submodule("blocks.0.mlp.gate_proj"), PackedLinear)


def test_adapter_saved_with_a_float_model_loads_onto_a_packed_one(float_folders, tmp_path):
    llm = LLM.load(float_folders["tiny-llama"], device="cpu", dtype="float32")
    inject_lora(llm.model, LoRAConfig(rank=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for layer in lora_layers(llm.model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    folder = llm.save(tmp_path / "with-adapter")
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    packed = LLM.load(folder, device="cpu", quant="int8")
    layers = lora_layers(packed.model)
    assert len(layers) == 4 and all(isinstance(layer.base, PackedLinear) for layer in layers.values())
    assert isinstance(next(iter(layers.values())), LoRALinear)
    a, b = logits(packed, SAMPLE_TEXT[0]), logits(llm, SAMPLE_TEXT[0])
    assert cosine(a, b).min() > 0.9995


# ------------------------------------------------------------------------------- joined projections
def joinable_model(tokenizer, kind: str) -> nn.Module:
    """A packed tiny Llama whose q/k/v and gate/up rows are whole blocks of every layout (64), with Qwen's
    q/k/v biases (not zero)."""
    llm = tiny_llm("tiny-llama", tokenizer, n_embd=128, n_kv_head=2, intermediate_size=256, qkv_bias=True)
    for block in llm.model.blocks:
        for layer in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
            nn.init.normal_(layer.bias, generator=torch.Generator().manual_seed(layer.out_features))
    return quant.quantize_model(llm.model, kind)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_joined_projections_compute_what_their_parts_compute(kind, tiny_tokenizer):
    """A block's q/k/v and gate/up run as one kernel call (``JoinedLinear``) over the parts' own codes (views,
    held once), bit for bit what the parts compute one by one; a LoRA wrapper on a part ends the join there."""
    model = joinable_model(tiny_tokenizer, kind)
    groups = quant.joined_layers(model)
    assert len(groups) == 2 * model.config.n_layer
    for group in groups:
        start = group.layer.packed.data_ptr()
        for part in group.parts:  # codes and scales are views into the joined layer's, one after the other
            assert part.packed.untyped_storage().data_ptr() == group.layer.packed.untyped_storage().data_ptr()
            for name in ("scale_bits", "exact_bits"):
                assert (
                    getattr(part, name).untyped_storage().data_ptr()
                    == getattr(group.layer, name).untyped_storage().data_ptr()
                )
            assert part.packed.data_ptr() == start
            start += part.packed.numel()
    ids = torch.tensor([tiny_tokenizer.encode(SAMPLE_TEXT[0])[:10], tiny_tokenizer.encode(CHINESE[0])[:10]])
    with torch.no_grad():
        joined, _ = model(ids)
        one_row, _ = model(ids[:, :1])  # a decode-sized input: the kernel
        for block in model.blocks:  # the parts one by one
            block.attn.joined_qkv = block.mlp.joined_gate_up = None
        alone, _ = model(ids)
        one_row_alone, _ = model(ids[:, :1])
    assert torch.equal(joined, alone) and torch.equal(one_row, one_row_alone)
    assert set(model.state_dict()) == {n for n in model.state_dict() if "joined" not in n}

    model = joinable_model(tiny_tokenizer, kind)
    inject_lora(model, LoRAConfig(rank=4, targets=["q_proj"]))
    attn = model.blocks[0].attn
    assert not attn.joined_qkv.serves(attn.q_proj, attn.k_proj, attn.v_proj)
    with torch.no_grad():
        wrapped, _ = model(
            ids
        )  # LoRA's B starts at zero: the same output, through the parts (strided scales)
    assert torch.equal(wrapped, joined)


def test_dense_copies_of_joined_parts_are_views(monkeypatch, tiny_tokenizer):
    model = joinable_model(tiny_tokenizer, "int4")
    layers = {id(m): m for m in quant.packed_layers(model).values()}.values()
    weights = sum(m.out_features * m.in_features for m in layers)
    assert quant.set_batch_weights(model, "bf16") == 2 * weights  # each weight's copy counted once
    group = quant.joined_layers(model)[0]
    assert group.parts[1].dense.data_ptr() == group.layer.dense[group.sizes[0] :].data_ptr()
    for part in group.parts:
        assert torch.equal(part.dense, part.dequantize().bfloat16())


def test_smollm2_batch_step_in_bf16_stays_within_rounding_of_the_float32_step(smollm2_packed):
    """A server's batch step (``set_batch_weights``): 4 sequences, en and zh, one decode step each. ``auto`` runs it
    in bf16 dot products where the CPU has them: logits within bf16's rounding of the inputs of the float32
    step's (``packed``), and the same greedy tokens wherever the float32 step's top-2 gap is not a near-tie. The
    prompts' positions stay float32 under both; their last logits (the head's rows, one position each) are a
    batch too, whose best logits the head computes again in float32 (``exact_top``)."""
    llm = smollm2_packed
    model = llm.model
    prompts = ["The capital of France is", "中国的首都是", "def fibonacci(n):", "人工智能是"]
    ids, mask = left_pad([llm.tokenizer.encode(p) for p in prompts], pad_id=0)
    steps = {}
    try:
        for setting in ("packed", "auto"):
            set_batch_weights(model, setting)
            cache = StaticKVCache(model.config, len(prompts), 64, model.device, model.dtype)
            with torch.no_grad():
                first = prefill(model, ids, mask, cache)
                cache.start_decoding(mask)
                steps[setting] = (first, model.decode_step(first.argmax(-1)[:, None], cache))
    finally:
        set_batch_weights(model, "packed")
    (first32, step32), (first, step) = steps["packed"], steps["auto"]
    best, best32 = first.max(-1), first32.max(-1)
    assert torch.equal(best.indices, best32.indices) and torch.allclose(best.values, best32.values, atol=1e-4)
    bf16 = cpu_kernel.bf16_dot_products() and kernel_layout() == ("split", 64)
    error = ((step - step32).norm(dim=-1) / step32.norm(dim=-1)).max().item()
    # measured: 0.6-1.7 % (norm of each row's logits), up to 0.19 a logit: bf16's rounding of x through 30 blocks
    assert (error > 0) == bf16 and error <= 3e-2
    top2 = step32.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.5
    assert torch.equal(step.argmax(-1)[clear], step32.argmax(-1)[clear]) and clear.sum() >= 2
