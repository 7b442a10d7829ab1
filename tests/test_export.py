"""Export round trips, judged by code nobody here wrote: transformers (its folder and GGUF loaders, AutoTokenizer),
gguf-py's ``GGUFReader`` and PEFT. English and Chinese text throughout.

The GGUF models are pretrained here for a few steps on a byte-level BPE tokenizer trained here, so the weights
and the vocabulary are lmforge's own, as a user's would be.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge import LLM, LmforgeError, Transformer
from lmforge.cli import main
from lmforge.data import prepare_corpus
from lmforge.export import export_model
from lmforge.formats.gguf import GGUFFile
from lmforge.lora import LoRAConfig, inject_lora, lora_layers
from lmforge.quant import QuantizedWeight, packed_layers
from lmforge.recipes.pretrain import pretrain
from lmforge.tokenizer import train_tokenizer
from lmforge.train.metrics import MetricsLogger

from .conftest import TEST_DATA, tiny_llm

TEXTS = [
    "The quick brown fox jumps over the lazy dog, 1234567890 times.",
    "To be, or not to be, that is the question:\n  Whether 'tis nobler in the mind",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "我们今天去北京吃烤鸭 🦆, then fly home ✈️.",
]
PROMPT = "ROMEO:\n明月几时有"
# Q8_0 keeps 8 bits per weight: the logits (spread 0.3-0.5 here) move by at most 0.013 on these models.
Q8_TOLERANCE = 0.05
Q4_TOLERANCE = 0.25  # 4 bits, 16 steps per block: 0.12 measured here, where the logits spread 0.17


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, Transformer):
            return model(ids)[0]
        return model(input_ids=ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def hf_greedy(model, ids: list[int], n: int = 32) -> list[int]:
    model.generation_config.eos_token_id = None  # run all n steps, as ours does with stop_on_eos=False
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def our_greedy(llm: LLM, prompt: str, n: int = 32) -> list[int]:
    return llm.complete([prompt], max_new_tokens=n, stop_on_eos=False)[0].token_ids


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """English and Chinese text tokenized with a 480-token byte-level BPE trained on it."""
    root = tmp_path_factory.mktemp("corpus")
    files = []
    for name in ("tinyshakespeare.txt", "songci.txt"):
        files.append(root / name)
        files[-1].write_text(
            (TEST_DATA / "text" / name).read_text(encoding="utf-8")[:25_000], encoding="utf-8"
        )
    tokenizer = train_tokenizer(files, vocab_size=480, show_progress=False)
    prepare_corpus(files, tokenizer, root / "shards", show_progress=False)
    return root / "shards"


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def pretrained(request, shards, tmp_path_factory) -> LLM:
    """A few pretraining steps through the recipe users call; 512 embedding rows for 480 tokens (padding)."""
    # transformers' GGUF loader builds GPT-2 with its default 1024 positions, whatever the file says.
    sizes = {"vocab_size": 512, "block_size": 1024 if request.param == "tiny-gpt2" else 128}
    train = {"out_dir": str(tmp_path_factory.mktemp("run")), "max_steps": 8, "micro_batch_size": 8}
    train |= {
        "block_size": 32,
        "lr": 3e-3,
        "warmup_steps": 2,
        "eval_every": 0,
        "progress": False,
        "device": "cpu",
    }
    # The loss-curve PNG costs seconds of matplotlib and is not what this file tests.
    with mock.patch.object(MetricsLogger, "plot"):
        result = pretrain(shards, arch=request.param, model_config=sizes, train=train)
    return LLM.load(result.model_dir, dtype="float32", device="cpu")


# ------------------------------------------------------------------------------------------------ HF folder
def test_smollm2_hf_export_matches_transformers(smollm2, tmp_path):
    out = export_model(smollm2, tmp_path / "smollm2-hf", format="hf")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == smollm2.tokenizer.encode(text), text
    ids = torch.tensor([smollm2.tokenizer.encode(TEXTS[0] + TEXTS[2])])
    assert max_diff(logits(smollm2.model, ids), logits(model, ids)) <= 1e-4


def test_hf_export_of_pretrained_model_and_dtype(pretrained, tmp_path):
    out = pretrained.export(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.model_type == pretrained.config.model_type
    tokenizer = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == pretrained.tokenizer.encode(text), text
    ids = torch.tensor([pretrained.tokenizer.encode(TEXTS[1] + TEXTS[3])])
    assert max_diff(logits(pretrained.model, ids), logits(model, ids)) <= 1e-4

    half = pretrained.export(tmp_path / "hf-bf16", dtype="bf16")
    model = AutoModelForCausalLM.from_pretrained(half, dtype="auto")
    assert model.dtype == torch.bfloat16  # config.json says so, and the weights are stored as bf16
    assert max_diff(logits(pretrained.model, ids), logits(model, ids)) <= 0.1


# ------------------------------------------------------------------------------------------------ GGUF
EXPECTED_LAYER_TENSORS = {
    "llama": "attn_norm attn_q attn_k attn_v attn_output ffn_norm ffn_gate ffn_up ffn_down",
    "qwen2": "attn_norm attn_q attn_k attn_v attn_q.b attn_k.b attn_v.b attn_output ffn_norm ffn_gate "
    "ffn_up ffn_down",
    "gpt2": "attn_norm attn_norm.b attn_qkv attn_qkv.b attn_output attn_output.b ffn_norm ffn_norm.b ffn_up "
    "ffn_up.b ffn_down ffn_down.b",
}
EXPECTED_TOP_TENSORS = {
    "llama": "token_embd output_norm output",  # tiny-llama's head is not tied: it has its own output
    "qwen2": "token_embd output_norm",
    "gpt2": "token_embd position_embd output_norm output_norm.b",
}


def expected_tensor_names(arch: str, n_layer: int) -> set[str]:
    def full(name: str) -> str:
        return name[:-2] + ".bias" if name.endswith(".b") else name + ".weight"

    names = {full(n) for n in EXPECTED_TOP_TENSORS[arch].split()}
    for i in range(n_layer):
        names |= {f"blk.{i}.{full(n)}" for n in EXPECTED_LAYER_TENSORS[arch].split()}
    return names


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def test_gguf_round_trip(pretrained, tmp_path):
    config = pretrained.config
    arch = config.model_type
    f32 = pretrained.export(tmp_path / "model.F32.gguf", format="gguf")
    # the Q8_0 file through the command line
    q8 = tmp_path / "model.Q8_0.gguf"
    assert main(["export", pretrained.source, "--format", "gguf", "--quant", "q8_0", "--out", str(q8)]) == 0

    # gguf-py's own reader: names, types, shapes (ggml order: columns first) and metadata
    for path, matrix_type in ((f32, GGMLQuantizationType.F32), (q8, GGMLQuantizationType.Q8_0)):
        reader = GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        assert set(tensors) == expected_tensor_names(arch, config.n_layer)
        for name, t in tensors.items():
            one_d = name.endswith((".bias", "_norm.weight")) or name.startswith("position_embd")
            assert t.tensor_type == (GGMLQuantizationType.F32 if one_d else matrix_type), name
        assert list(tensors["token_embd.weight"].shape) == [config.n_embd, config.vocab_size]
        assert list(tensors["blk.0.ffn_down.weight"].shape) == [config.intermediate_size, config.n_embd]
        if arch == "gpt2":
            assert list(tensors["blk.0.attn_qkv.weight"].shape) == [config.n_embd, 3 * config.n_embd]
        else:
            assert list(tensors["blk.0.attn_k.weight"].shape) == [
                config.n_embd,
                config.n_kv_head * config.head_dim,
            ]
            assert field(reader, f"{arch}.attention.head_count_kv") == config.n_kv_head
            assert field(reader, f"{arch}.rope.freq_base") == config.rope_theta
        assert field(reader, "general.architecture") == arch
        assert field(reader, "general.file_type") == (0 if matrix_type == GGMLQuantizationType.F32 else 7)
        assert field(reader, f"{arch}.context_length") == config.block_size
        assert field(reader, f"{arch}.block_count") == config.n_layer
        assert field(reader, f"{arch}.embedding_length") == config.n_embd
        assert field(reader, f"{arch}.feed_forward_length") == config.intermediate_size
        assert field(reader, f"{arch}.attention.head_count") == config.n_head
        assert field(reader, "tokenizer.ggml.model") == "gpt2"
        assert field(reader, "tokenizer.ggml.pre") == "qwen2"  # lmforge's BPE splits text like Qwen2
        tokens = field(reader, "tokenizer.ggml.tokens")
        assert len(tokens) == config.vocab_size and tokens[-1] == f"[PAD{config.vocab_size - 1}]"
        assert tokens[field(reader, "tokenizer.ggml.eos_token_id")] == "<|endoftext|>"

    # transformers' GGUF loader and ours, F32: the same logits and the same 32 greedy tokens
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f32.name, dtype=torch.float32).eval()
    reloaded = LLM.load(f32, dtype="float32")
    ids = torch.tensor([pretrained.tokenizer.encode(TEXTS[0] + TEXTS[2])])
    reference = logits(pretrained.model, ids)
    assert max_diff(reference, logits(theirs, ids)) <= 1e-4
    assert max_diff(reference, logits(reloaded.model, ids)) <= 1e-5
    greedy = our_greedy(pretrained, PROMPT)
    assert hf_greedy(theirs, pretrained.tokenizer.encode(PROMPT)) == greedy
    assert our_greedy(reloaded, PROMPT) == greedy
    assert reloaded.generate_text(PROMPT, max_length=32) == pretrained.generate_text(PROMPT, max_length=32)

    # Q8_0: transformers dequantizes exactly as we do; both stay close to the fp32 model
    theirs_q8 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=q8.name, dtype=torch.float32).eval()
    ours_q8 = LLM.load(q8, dtype="float32")
    assert max_diff(logits(ours_q8.model, ids), logits(theirs_q8, ids)) <= 1e-4
    assert 0 < max_diff(logits(ours_q8.model, ids), reference) <= Q8_TOLERANCE

    # the tokenizer inside the file: ours and transformers' both give the model's own ids
    our_tokenizer = GGUFFile(f32).tokenizer()
    their_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=f32.name)
    for text in TEXTS:
        expected = pretrained.tokenizer.encode(text)
        assert our_tokenizer.encode(text) == expected, text
        assert their_tokenizer(text)["input_ids"] == expected, text


def test_gguf_keeps_smollm2s_tokenizer_and_chat_template(smollm2, tmp_path):
    # SmolLM2's vocabulary on a tiny body: the tokenizer, not 135M weights, is what this checks.
    llm = tiny_llm("tiny-llama", smollm2.tokenizer, vocab_size=smollm2.config.vocab_size)
    out = llm.export(tmp_path / "smol-vocab.Q4_0.gguf", format="gguf", quant="q4_0")
    written = GGUFFile(out)  # gguf-py's reader takes seconds over a 49k vocabulary; ours milliseconds
    assert written.metadata["tokenizer.ggml.pre"] == "smollm"  # digits split one by one
    assert written.metadata["tokenizer.chat_template"] == smollm2.tokenizer.chat_template
    assert written.metadata["general.file_type"] == 2  # MOSTLY_Q4_0
    back = LLM.load(out, dtype="float32")
    for text in TEXTS:
        assert back.tokenizer.encode(text) == smollm2.tokenizer.encode(text), text
    chat = [{"role": "user", "content": "用一句话介绍北京"}]
    assert back.tokenizer.apply_chat_template(chat) == smollm2.tokenizer.apply_chat_template(chat)
    ids = torch.tensor([smollm2.tokenizer.encode(TEXTS[2])])
    assert max_diff(logits(back.model, ids), logits(llm.model, ids)) <= Q4_TOLERANCE


# ---------------------------------------------------------------------------------------------- packed layers
def gguf_blocks(path: Path) -> dict[str, tuple[GGMLQuantizationType, np.ndarray]]:
    """gguf-py's reading of a file: each tensor's type and raw bytes."""
    return {
        t.name: (t.tensor_type, np.array(t.data).reshape(-1).view(np.uint8)) for t in GGUFReader(path).tensors
    }


def assert_q8_0_blocks_kept(before: np.ndarray, after: np.ndarray, name: str) -> None:
    """Q8_0 blocks (an fp16 d, 32 int8 codes): the same bytes, d included (a packed layer keeps each fp16 scale
    exactly, beside its bf16 rounding)."""
    assert np.array_equal(after, before), name


def test_packed_int4_exports_to_q4_1_from_its_codes(smollm2_gguf, tmp_path):
    """The bundled Q4_1 file loaded packed (210 int4 layers, the tied Q8_0 table as int8) goes back to Q4_1 from
    its integer codes: no layer is dequantized, and every block is the file's own bytes, scales included."""
    llm = LLM.load(smollm2_gguf, device="cpu", compile=False)
    with mock.patch.object(QuantizedWeight, "dequantize", side_effect=AssertionError("dequantized")):
        out = export_model(llm, tmp_path / "smol.Q4_1.gguf", format="gguf", quant="q4_1")
    original, written = gguf_blocks(smollm2_gguf), gguf_blocks(out)
    assert original.keys() == written.keys()
    for name, (qtype, data) in original.items():
        assert written[name][0] == qtype, name  # the int8 table stays Q8_0 in a 4-bit file, as it was
        if qtype == GGMLQuantizationType.Q8_0:
            assert_q8_0_blocks_kept(data, written[name][1], name)
            continue
        if qtype != GGMLQuantizationType.Q4_1:
            assert np.array_equal(written[name][1], data), name  # F32 norms: exact
            continue
        assert np.array_equal(written[name][1], data), name  # d, m (fp16) and 16 bytes of codes a block
    # and the file holds what the packed model computes with (our reader undoes llama.cpp's q/k row order; the
    # first and last blocks are checked, and the tied table)
    back = GGUFFile(out)
    weights = back.state_dict(back.config(), quant="none")
    last = llm.config.n_layer - 1
    for name, layer in packed_layers(llm.model).items():
        if name.startswith(("blocks.0.", f"blocks.{last}.", "lm_head")):
            ours = layer.dequantize()
            key = "wte.weight" if name == "lm_head" else f"{name}.weight"
            assert torch.equal(weights[key], ours), name


def test_packed_int8_exports_q8_0_blocks_exactly(pretrained, tmp_path):
    """A Q8_0 file loaded packed (every linear layer int8; GPT-2's fused q/k/v split and fused again) exports to
    Q8_0 with the same blocks, tensor for tensor."""
    q8 = pretrained.export(tmp_path / "model.Q8_0.gguf", format="gguf", quant="q8_0")
    packed = LLM.load(q8, device="cpu", compile=False)
    assert packed_layers(packed.model)
    with mock.patch.object(QuantizedWeight, "dequantize", side_effect=AssertionError("dequantized")):
        again = packed.export(tmp_path / "again.Q8_0.gguf", format="gguf", quant="q8_0")
    first, second = gguf_blocks(q8), gguf_blocks(again)
    assert first.keys() == second.keys()
    for name, (qtype, data) in first.items():
        assert second[name][0] == qtype, name
        if qtype == GGMLQuantizationType.Q8_0:
            assert_q8_0_blocks_kept(data, second[name][1], name)
        else:
            assert np.array_equal(second[name][1], data), name
    # another type: the int8 layers are dequantized and quantized, an int8 head stays Q8_0 in a 4-bit file
    q4 = gguf_blocks(packed.export(tmp_path / "model.Q4_1.gguf", format="gguf", quant="q4_1"))
    matrix = "blk.0.attn_qkv.weight" if pretrained.config.model_type == "gpt2" else "blk.0.attn_q.weight"
    assert q4[matrix][0] == GGMLQuantizationType.Q4_1
    head = "output.weight" if "output.weight" in q4 else "token_embd.weight"  # the tied table is the head
    assert q4[head][0] == GGMLQuantizationType.Q8_0
    assert_q8_0_blocks_kept(first[head][1], q4[head][1], head)


# ------------------------------------------------------------------------------------------------ LoRA
def test_lora_exports_merged_or_as_peft_adapter(tiny_tokenizer, tmp_path):
    llm = tiny_llm("tiny-qwen2", tiny_tokenizer)
    base = llm.export(tmp_path / "base")
    inject_lora(llm.model, LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for layer in lora_layers(llm.model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    saved = llm.save(tmp_path / "tuned")  # base weights + adapter, as a LoRA fine-tune leaves them
    ids = torch.randint(0, 512, (2, 20))
    ours = logits(llm.model, ids)

    adapter = export_model(saved, tmp_path / "adapter", merge_lora=False)
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    assert max_diff(ours, logits(peft_model.eval(), ids)) <= 1e-4

    merged = llm.export(tmp_path / "merged")
    assert not (merged / "adapter_config.json").exists()
    assert (
        max_diff(ours, logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), ids)) <= 1e-4
    )
    assert lora_layers(llm.model)  # merging worked on a copy: the caller's model keeps its adapters
    gguf_file = llm.export(tmp_path / "merged.gguf", format="gguf")
    assert max_diff(ours, logits(LLM.load(gguf_file, dtype="float32").model, ids)) <= 1e-4


# ------------------------------------------------------------------------------------------------ bad input
def one_line_error(capsys, *args: str) -> str:
    assert main(["export", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_export_input_is_one_line(tiny_tokenizer, tmp_path, capsys):
    folder = str(tiny_llm("tiny-gpt2", tiny_tokenizer).save(tmp_path / "gpt2"))
    out = str(tmp_path / "x.gguf")
    assert "unknown export format 'onnx'" in one_line_error(capsys, folder, "--format", "onnx", "--out", out)
    assert "unknown GGUF type 'q3_x'" in one_line_error(
        capsys, folder, "--format", "gguf", "--quant", "q3_x", "--out", out
    )
    assert "llama-quantize" in one_line_error(
        capsys, folder, "--format", "gguf", "--quant", "q4_k_m", "--out", out
    )
    assert "needs --format gguf" in one_line_error(capsys, folder, "--quant", "q8_0", "--out", out)
    assert "not both" in one_line_error(
        capsys, folder, "--format", "gguf", "--dtype", "f16", "--quant", "q8_0", "--out", out
    )
    assert "unknown dtype" in one_line_error(capsys, folder, "--dtype", "int3", "--out", out)
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    assert "is a file" in one_line_error(capsys, folder, "--out", str(existing))
    assert existing.read_text() == "keep me"
    assert "not a model folder" in one_line_error(capsys, folder, "--out", str(tmp_path))
    assert "no LoRA adapters" in one_line_error(capsys, folder, "--no-merge", "--out", str(tmp_path / "a"))

    # a character-level tokenizer has no GGUF form: llama.cpp tokenizes bytes
    chars = train_tokenizer(iter(TEXTS), kind="char", show_progress=False)
    llm = tiny_llm("tiny-gpt2", chars)
    char_folder = str(llm.save(tmp_path / "char"))
    message = one_line_error(capsys, char_folder, "--format", "gguf", "--out", out)
    assert "character-level tokenizer" in message and "--format hf" in message
    assert not Path(out).exists() and not list(tmp_path.glob(".x.gguf*"))  # nothing half-written
    with pytest.raises(LmforgeError, match="classifier"):
        tiny_llm("tiny-llama", tiny_tokenizer, labels=["ham", "spam"]).export(out, format="gguf")
