"""Sizing packed models: weights at their packed size (the loader's own layers are the oracle), the KV cache
sized to the request, the load quant grammar shared with every inference command, and the estimate against
the real peak of a packed model (``measure_peak``: a fresh process's VmHWM)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lmforge import LLM, Config, LmforgeError, Transformer
from lmforge.cli import main
from lmforge.formats.gguf import GGUFFile
from lmforge.generate import CACHE_BUCKET
from lmforge.info import read_header
from lmforge.quant import PackedEmbedding, PackedLinear, packed_layers, quantize_weight
from lmforge.sizing import estimate, format_size, measure_peak, select
from lmforge.sizing.memory import model_shell
from lmforge.sizing.weights import held_weights, packed_bytes

from .conftest import TEST_DATA, one_intra_op_thread, tiny_llm

TOLERANCE = 0.20
# A ~29M-parameter Llama with SmolLM2's 49k vocabulary (test_select's): its head and tied table, packed as
# int8, and its blocks, as int4, are large enough next to the runtime for the estimate to be tested.
SMALL = dict(n_layer=6, n_embd=384, n_head=6, n_kv_head=3, intermediate_size=1024, block_size=256)


@pytest.fixture(scope="module", autouse=True)
def one_thread_for_the_module():
    with one_intra_op_thread():
        yield


def held_bytes(model: torch.nn.Module) -> int:
    """What a loaded model really holds: each packed layer's buffers and each float parameter, once."""
    packed = {id(m): m for m in packed_layers(model).values()}
    floats = {id(p): p for name, p in model.named_parameters()}
    return sum(m.weight_bytes for m in packed.values()) + sum(
        p.numel() * p.element_size() for p in floats.values()
    )


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(64, 32), (576, 576), (1536, 576), (48, 1536), (24, 64)])
def test_packed_bytes_are_the_layers_buffers(kind: str, shape: tuple[int, int]) -> None:
    layer = PackedLinear(quantize_weight(torch.randn(shape), kind))  # type: ignore[arg-type]
    assert packed_bytes(kind, *shape) == layer.weight_bytes  # type: ignore[arg-type]
    rows = -(-shape[0] // 16) * 16  # the kernel's tile: 24 rows are held as 32
    per_weight = layer.weight_bytes / (rows * shape[1])
    # per 4-bit plane: 1/2 byte + 1/8 of scale, zero (bf16) + 1/8 of the exact scale, min (fp16)
    assert per_weight == (0.75 if kind == "int4" else 1.5)


@pytest.mark.parametrize("quant", ["auto", "int8", "int4", "none"])
def test_weights_of_the_bundled_gguf_are_what_loading_holds(smollm2_gguf: Path, quant: str) -> None:
    header = read_header(smollm2_gguf)
    shell = model_shell(header.config, "infer", task="generate")
    held = held_weights(header, shell, quant=quant, width=4)
    llm = LLM.load(smollm2_gguf, device="cpu", quant=quant, compile=False)
    assert held.bytes == held_bytes(llm.model)
    if quant == "auto":  # 210 Q4_1 layers as int4, the tied Q8_0 table and head as one int8 layer
        assert held.packing() == "210 int4 + 1 int8 layers packed"
        assert isinstance(llm.model.wte, PackedEmbedding) and held.bytes < 120 * 2**20  # the file: 92 MiB
    if quant == "none":
        assert held.bytes == 134_515_008 * 4 and not held.packed


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_weights_of_a_folder_packed_on_load(tmp_path: Path, tiny_tokenizer, preset: str, quant: str) -> None:
    folder = tiny_llm(preset, tiny_tokenizer).save(tmp_path / preset)
    header = read_header(folder)
    held = held_weights(header, model_shell(header.config, "infer", task="generate"), quant=quant, width=4)
    llm = LLM.load(folder, device="cpu", quant=quant, compile=False)
    assert held.packed and held.bytes == held_bytes(llm.model)


def test_the_kv_cache_is_sized_to_the_request(smollm2_gguf: Path) -> None:
    config = GGUFFile(smollm2_gguf).config()
    per_token = config.n_layer * config.n_kv_head * config.head_dim * 2 * 4
    for context, cached in [(32, CACHE_BUCKET), (300, 2 * CACHE_BUCKET), (2048, 2048)]:
        sized = estimate(smollm2_gguf, context=context, batch=2, compile=True, measure=False)
        kv = next(c for c in sized.components if c.name == "KV cache")
        assert kv.bytes == 2 * cached * per_token, (context, kv.note)
    assert config.block_size == 8192  # never the model's whole context


def test_packed_estimates_are_smaller_and_compile_is_counted(smollm2_gguf: Path) -> None:
    sized = {
        (quant, compile): estimate(smollm2_gguf, context=64, quant=quant, compile=compile, measure=False)
        for quant in ("auto", "none", "int8")
        for compile in (False, True)
    }
    weights = {
        q: next(c.bytes for c in sized[q, False].components if c.name == "weights")
        for q in ("auto", "none", "int8")
    }
    assert (
        weights["auto"] < weights["int8"] < weights["none"] / 2.5
    )  # int8: 1.5 bytes a weight, with its scales' two copies
    assert "210 int4 + 1 int8 layers packed" in sized["auto", False].table()
    for quant in ("auto", "none", "int8"):
        compiled = sized[quant, True]
        assert any(c.name == "compiled decode step" for c in compiled.components)
        assert compiled.peak_bytes > sized[quant, False].peak_bytes
    # an explicit dtype asks for float weights, as LLM.load does
    assert estimate(smollm2_gguf, context=64, dtype="bfloat16", measure=False).quant == "none"


def test_the_old_file_type_spelling_still_works_with_a_warning(smollm2_gguf: Path) -> None:
    with pytest.warns(DeprecationWarning, match="a Q8_0 file loads as int8; use quant='int8'"):
        old = estimate(smollm2_gguf, context=64, quant="q8_0", measure=False)
    with pytest.warns(DeprecationWarning, match="loads as int4"):
        old4 = estimate(smollm2_gguf, context=64, quant="Q4_K", measure=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = estimate(smollm2_gguf, context=64, quant="int8", measure=False)
        new4 = estimate(smollm2_gguf, context=64, quant="int4", measure=False)
    assert (old.peak_bytes, old4.peak_bytes) == (new.peak_bytes, new4.peak_bytes)
    with pytest.raises(LmforgeError, match="unknown quant 'int3'"):
        estimate(smollm2_gguf, quant="int3", measure=False)
    with pytest.raises(LmforgeError, match="training estimates are for float32 weights"):
        estimate(smollm2_gguf, mode="lora", quant="int4", measure=False)


def test_cli_estimate_speaks_the_load_grammar(smollm2_gguf: Path, capsys) -> None:
    assert main(["estimate", str(smollm2_gguf), "--quant", "int4", "--no-compile", "--no-measure"]) == 0
    out = capsys.readouterr()
    assert "210 int4 + 1 int8 layers packed" in out.out and "compiled decode step" not in out.out
    assert not out.err
    assert main(["estimate", str(smollm2_gguf), "--quant", "Q8_0", "--no-measure", "--context", "64"]) == 0
    out = capsys.readouterr()
    assert (
        out.err.startswith("warning: quant='q8_0' (a GGUF file type) is deprecated")
        and out.err.count("\n") == 1
    )
    assert "211 int8 layers packed" in out.out
    assert main(["estimate", str(smollm2_gguf), "--quant", "int3", "--no-measure"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown quant 'int3'")


def test_select_sizes_packed_candidates_as_packed() -> None:
    data = TEST_DATA / "sms_spam" / "test.jsonl"
    sized = {
        quant: select("classify", data, candidates=["default"], max_ram="1MiB", sample=2, quant=quant)
        for quant in ("auto", "none")
    }
    packed, floats = (sized[q].candidates[0] for q in ("auto", "none"))
    assert packed.status.startswith("does not fit") and floats.status.startswith(
        "does not fit"
    )  # never loaded
    # SmolLM2's layers packed (~117 MiB with their scales' two copies) instead of float32 (513 MiB)
    assert 380 * 2**20 < floats.memory - packed.memory < 410 * 2**20


# ------------------------------------------------------------ against the real peak
@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    tokenizer = GGUFFile(smollm2_gguf).tokenizer()
    torch.manual_seed(0)
    config = Config(vocab_size=49152, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, **SMALL)
    return LLM(Transformer(config), tokenizer).save(tmp_path_factory.mktemp("sizing") / "small")


@pytest.mark.parametrize(("quant", "compile"), [("int4", True), ("int8", False)])
def test_packed_estimate_within_20_percent_of_the_measured_peak(
    small_model: Path, quant: str, compile: bool
) -> None:
    measured = measure_peak(small_model, quant=quant, compile=compile, prompt_tokens=24, new_tokens=8)
    predicted = estimate(small_model, quant=quant, compile=compile, context=32, measure=False)
    error = predicted.peak_bytes / measured["peak"] - 1
    print(
        f"\n{quant}: predicted {format_size(predicted.peak_bytes)}, measured {format_size(measured['peak'])} ({error:+.1%})"
    )
    assert abs(error) <= TOLERANCE, predicted.table()
    assert predicted.packing and predicted.peak_phase == "loading"  # the float weights held while packing
