"""Write GGUF files (llama.cpp's format) from a config, weights and a tokenizer, with the ``gguf`` package.

The reader (``gguf.py``, ``gguf_tokenizer.py``) is the spec this writer inverts: it reuses their tensor-name maps
and pre-tokenizer table, and every file is read back by them before it is put in place. A model the format
cannot express (a character-level tokenizer, Llama 3 RoPE scaling, a classification head) fails with a clear
error instead of leaving a file that loads but answers differently.

Layout, as llama.cpp's ``convert_hf_to_gguf.py`` writes it:

* names: ``token_embd``, ``position_embd`` (GPT-2), ``blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output,
  ffn_norm, ffn_gate, ffn_up, ffn_down}``, ``output_norm``, ``output`` (left out when tied to the embedding);
  GPT-2 fuses q/k/v into ``blk.N.attn_qkv``. Matrices are (out, in), as in PyTorch.
* For the ``llama`` architecture the rows of q/k are permuted per head to suit llama.cpp's interleaved RoPE
  kernel (Qwen2 and GPT-2 are stored as they are).
* 1-D tensors (norms, biases) and GPT-2's position table stay F32; every other matrix takes the file type, or F16
  where its rows do not fill whole quantization blocks.
* Packed layers (``lmforge.quant``, given as ``QuantizedWeight``) are written from their integer codes, without a
  dequantize/requantize round trip, where the file type holds their values (``packed_blocks``): int8 as Q8_0,
  int4 as Q4_1 (and as Q4_0 when every zero is 0). In a Q4_0/Q4_1 file an int8 head or tied table stays Q8_0,
  as in llama.cpp's Q4 files and lmforge's int4 packing. Any other pairing is dequantized and quantized.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import LlamaFileType, TokenType

from lmforge.config import Config
from lmforge.errors import LmforgeError, UnsupportedError
from lmforge.formats.atomic import atomic_write_file
from lmforge.formats.gguf import _LAYER_TENSORS, _TOP_TENSORS, GGUFFile
from lmforge.formats.gguf_tokenizer import _GPT2, _PRE_TOKENIZERS
from lmforge.quant import GROUP, QuantizedWeight
from lmforge.tokenizer import Tokenizer

Weights = torch.Tensor | QuantizedWeight

# Our model_type -> llama.cpp architecture. llama.cpp runs Mistral checkpoints as "llama".
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}

# file type name -> (tensor type for matrices, general.file_type)
FILE_TYPES: dict[str, tuple[QType, LlamaFileType]] = {
    "f32": (QType.F32, LlamaFileType.ALL_F32),
    "f16": (QType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (QType.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (QType.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (QType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (QType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q6_k": (QType.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "q5_k_m": (QType.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q4_k_m": (QType.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q4_k_s": (QType.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
}

# The Config fields a GGUF file carries; each must read back unchanged.
_ARCHITECTURE_FIELDS = (
    "vocab_size",
    "block_size",
    "n_layer",
    "n_head",
    "n_kv_head",
    "n_embd",
    "head_dim",
    "intermediate_size",
    "position",
    "rope_theta",
    "rope_scaling",
    "norm",
    "norm_eps",
    "gated_mlp",
    "activation",
    "bias",
    "qkv_bias",
    "tie_embeddings",
    "sliding_window",
)

# Texts the exported tokenizer must split exactly as the model's own does.
_PROBES = (
    "The quick brown fox jumps over the lazy dog. It's 2024; 3.14159 * 42 = 131.95!",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "我们今天去北京吃烤鸭 🦆, then fly home ✈️.",
    "def hello(name):\n    return f'hi {name}'\n\n\n  \t trailing   ",
    "<|im_start|>user\nHello<|im_end|>\n<|endoftext|>",
)


def check_file_type(name: str) -> str:
    """The canonical file-type name, or a one-line error for one this writer (or the gguf package) lacks."""
    key = name.lower()
    if key not in FILE_TYPES:
        raise LmforgeError(
            f"unknown GGUF type {name!r}",
            hint=f"use one of: {', '.join(FILE_TYPES)}",
        )
    qtype = FILE_TYPES[key][0]
    if not _can_quantize(qtype):
        raise UnsupportedError(
            f"the installed gguf package ({version('gguf')}) cannot quantize to {qtype.name}",
            hint=f"export --quant q8_0 (or --dtype f16), then run llama.cpp's "
            f"`llama-quantize model.gguf out.gguf {key.upper()}`",
        )
    return key


def _can_quantize(qtype: QType) -> bool:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def write_gguf(
    path: str | Path,
    config: Config,
    state: Mapping[str, Weights],
    tokenizer: Tokenizer,
    file_type: str = "f32",
) -> Path:
    """Write one GGUF file atomically (temporary sibling, read back and checked, then renamed into place).

    ``state`` holds float tensors, and packed layers as ``QuantizedWeight`` (written from their codes where the
    file type allows, see ``packed_blocks``)."""
    path = Path(path)
    file_type = check_file_type(file_type)
    arch = _architecture(config)
    fields = tokenizer_fields(tokenizer, config.vocab_size)
    qtype, ftype = FILE_TYPES[file_type]

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        _add_model_metadata(writer, config, ftype)
        _add_tokenizer_metadata(writer, fields, tokenizer)
        for name, tensor in gguf_tensors(config, state):
            data, data_type = _encode(name, tensor, qtype)
            writer.add_tensor(name, data, raw_dtype=data_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _check_round_trip(tmp, config, tokenizer)

    return atomic_write_file(path, write)


def _architecture(config: Config) -> str:
    if config.is_encoder:
        raise UnsupportedError(
            f"{config.name} is a sentence encoder; lmforge writes GGUF for language models only",
            hint="export it with --format hf (sentence-transformers and transformers load that folder)",
        )
    if config.is_seq2seq:
        raise UnsupportedError(
            f"{config.name} is an encoder–decoder ({config.model_type}); this writer is for decoder-only "
            "models (export_model writes a T5 with gguf_t5)",
            hint="export it with --format hf (transformers' AutoModelForSeq2SeqLM loads that folder)",
        )
    if config.labels:
        raise UnsupportedError(
            f"{config.name} is a classifier (a 'score' head over {len(config.labels)} labels); GGUF holds "
            "language models only",
            hint="export it with --format hf",
        )
    if config.rope_scaling and config.rope_scaling.get("rope_type") != "linear":
        raise UnsupportedError(
            f"RoPE scaling {config.rope_scaling.get('rope_type')!r} is not written to GGUF by lmforge",
            hint="export it with --format hf",
        )
    return ARCHITECTURES[config.model_type]


def _add_model_metadata(writer: gguf.GGUFWriter, config: Config, ftype: LlamaFileType) -> None:
    writer.add_name(config.name)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    if config.model_type == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    if config.rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling["factor"])
    if config.sliding_window:
        writer.add_sliding_window(config.sliding_window)


# ------------------------------------------------------------------------------------------------ tensors
def gguf_tensors(config: Config, state: Mapping[str, Weights]) -> Iterator[tuple[str, Weights]]:
    """(llama.cpp name, tensor in llama.cpp's layout) for every weight of the model (a packed layer's codes and
    scales are laid out as its weight would be)."""
    top = {ours: theirs for theirs, ours in _TOP_TENSORS.items()}  # "wte" -> "token_embd"
    layer = {ours: theirs for theirs, ours in _LAYER_TENSORS.items()}  # "attn.q_proj" -> "attn_q"
    permute = ARCHITECTURES[config.model_type] == "llama"
    for name, tensor in state.items():
        module, _, kind = name.rpartition(".")
        if module == "lm_head" and config.tie_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        if module in top:
            yield f"{top[module]}.{kind}", tensor
            continue
        match = re.match(r"^blocks\.(\d+)\.(.+)$", module)
        if match is None:
            raise KeyError(f"no GGUF name for parameter {name!r}")
        i, part = match.groups()
        if config.model_type == "gpt2" and part in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
            if part == "attn.q_proj":  # GPT-2 keeps q, k and v in one matrix: emit it once
                fused = [state[f"blocks.{i}.attn.{p}_proj.{kind}"] for p in "qkv"]
                yield f"blk.{i}.attn_qkv.{kind}", _cat_rows(fused)
            continue
        if permute and part in ("attn.q_proj", "attn.k_proj"):
            heads = config.n_head if part == "attn.q_proj" else config.n_kv_head
            if isinstance(tensor, QuantizedWeight):  # codes, scales and zeros share the row order
                tensor = tensor.map_rows(lambda rows, heads=heads: permute_qk(rows, heads))
            else:
                tensor = permute_qk(tensor, heads)
        yield f"blk.{i}.{layer[part]}.{kind}", tensor


def _cat_rows(parts: Sequence[Weights]) -> Weights:
    """Row blocks stacked (GPT-2's q, k, v): packed ones stay packed when all three are of one kind."""
    if all(isinstance(p, QuantizedWeight) for p in parts):
        kinds = {p.kind for p in parts}  # type: ignore[union-attr]
        if len(kinds) == 1:
            packed: list[QuantizedWeight] = list(parts)  # type: ignore[arg-type]
            zeros = [p.zeros for p in packed]
            return QuantizedWeight(
                packed[0].kind,
                torch.cat([p.codes for p in packed]),
                torch.cat([p.scales for p in packed]),
                torch.cat(zeros) if all(z is not None for z in zeros) else None,  # type: ignore[arg-type]
            )
    return torch.cat([p.dequantize() if isinstance(p, QuantizedWeight) else p for p in parts])


def permute_qk(weights: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: per head, rows (0..D/2, D/2..D) -> (0, D/2, 1, D/2+1, ...).

    The inverse of ``gguf.unpermute_qk``: rotate-half RoPE pairs dimension i with i + D/2, llama.cpp's kernel
    pairs neighbours, so the rows are interleaved to keep the same pairs.
    """
    rows = weights.shape[0]
    return (
        weights.reshape(n_heads, 2, rows // n_heads // 2, *weights.shape[1:])
        .transpose(1, 2)
        .reshape(weights.shape)
    )


# The head and a tied table keep 8 bits in a 4-bit file (llama.cpp's Q4 files do, and lmforge's int4 packing).
_KEEP_8_BITS = {"output.weight", "token_embd.weight"}


def _encode(name: str, tensor: Weights, qtype: QType) -> tuple[np.ndarray, QType]:
    """The tensor's bytes in the type llama.cpp's converter would give it; a packed layer's straight from its
    codes where the type holds them."""
    if isinstance(tensor, QuantizedWeight):
        target = qtype
        if tensor.kind == "int8" and qtype in (QType.Q4_0, QType.Q4_1) and name in _KEEP_8_BITS:
            target = QType.Q8_0
        blocks = packed_blocks(tensor, target)
        if blocks is not None:
            return blocks, target
        tensor = tensor.dequantize()  # another type: dequantize, then quantize as any float weight
    array = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
    # llama.cpp reads norms, biases and the position table as F32 only.
    if array.ndim == 1 or name.endswith("_norm.weight") or name.startswith("position_embd."):
        return array, QType.F32
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:  # rows that do not fill whole blocks: llama.cpp falls back to F16 as well
        return gguf.quants.quantize(array, QType.F16), QType.F16


def packed_blocks(weight: QuantizedWeight, qtype: QType) -> np.ndarray | None:
    """The GGUF blocks of ``qtype`` written from a packed layer's integer codes, or None where ``qtype`` cannot
    hold its values as they are (then the layer is dequantized and quantized like a float one).

    int8 ``q * scale`` is Q8_0 with d = scale. int4 ``(q - 8) * scale + zero`` is Q4_1 (``q * d + m``) with
    d = scale and m = zero - 8 * scale, and Q4_0 (``(q - 8) * d``) when every zero is 0. The codes are copied;
    d and m are the format's fp16: exact for int8 scales read from a GGUF file (kept in fp32), while int4 layers
    keep bf16 scales and zeros (their kernel's type), which fp16 holds exactly in its normal range, so only m
    rounds, once. Returns ``(N, K / 32 * block bytes)`` uint8, as ``gguf.quants.quantize`` does.
    """
    N, K = weight.shape
    groups = N * K // GROUP
    codes = weight.codes.detach().cpu()
    scales = weight.scales.detach().cpu().float()
    d = scales.numpy().reshape(groups, 1).astype(np.float16).view(np.uint8)
    if weight.kind == "int8" and qtype == QType.Q8_0:
        qs = codes.to(torch.int8).numpy().reshape(groups, GROUP).view(np.uint8)
        return np.concatenate([d, qs], axis=1).reshape(N, -1)
    if weight.kind != "int4" or qtype not in (QType.Q4_0, QType.Q4_1):
        return None
    assert weight.zeros is not None
    zeros = weight.zeros.detach().cpu().float()
    if qtype == QType.Q4_0 and bool(zeros.any()):
        return None  # not symmetric: Q4_0 has no zero to hold it
    q = codes.to(torch.uint8).numpy().reshape(groups, 2, GROUP // 2)
    qs = q[:, 0] | (
        q[:, 1] << np.uint8(4)
    )  # value j in the low nibble of byte j, value j + 16 in the high one
    if qtype == QType.Q4_0:
        return np.concatenate([d, qs], axis=1).reshape(N, -1)
    m = (zeros - 8 * scales).numpy().reshape(groups, 1).astype(np.float16).view(np.uint8)
    return np.concatenate([d, m, qs], axis=1).reshape(N, -1)


# ---------------------------------------------------------------------------------------------- tokenizer
def tokenizer_fields(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` values for a byte-level BPE tokenizer (a one-line error for anything else)."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec["model"]
    # Qwen2's tokenizer.json asks for NFC first; llama.cpp skips that step, as its own converter accepts.
    normalizer = (spec.get("normalizer") or {}).get("type")
    byte_level = (
        model["type"] == "BPE"
        and normalizer in (None, "NFC")
        and not model.get("byte_fallback")
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and (spec.get("decoder") or {}).get("type") == "ByteLevel"
    )
    if not byte_level:
        kind = "a character-level" if model["type"] == "BPE" and not model.get("merges") else "this"
        raise UnsupportedError(
            f"GGUF cannot carry {kind} tokenizer: lmforge writes byte-level BPE vocabularies for llama.cpp (what "
            "`lmforge tokenizer train --kind bpe` makes)",
            hint="export with --format hf (transformers loads it), or pretrain with a byte-level BPE tokenizer",
        )
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise LmforgeError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's vocabulary is {vocab_size}",
            hint="the tokenizer does not belong to this model",
        )
    # Rows of the embedding beyond the tokenizer (vocabularies padded to a round size) get placeholder tokens.
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, TokenType.NORMAL
    for i, added in tokenizer.backend.get_added_tokens_decoder().items():
        types[i] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED
    with_specials, without = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    return {
        "pre": _pre_tokenizer_name(spec),
        "tokens": tokens,
        "types": types,
        "merges": [m if isinstance(m, str) else " ".join(m) for m in model["merges"]],
        "add_bos": tokenizer.bos_id is not None and with_specials[0] == tokenizer.bos_id != without[0],
        "add_eos": tokenizer.eos_id is not None and with_specials[-1] == tokenizer.eos_id != without[-1],
    }


def _pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the tokenizer's splitting rules."""
    step = spec.get("pre_tokenizer") or {}
    steps = step.get("pretokenizers", []) if step.get("type") == "Sequence" else [step]
    regexes: list[str] = []
    for step in steps:
        kind = step.get("type")
        if (
            kind == "Split"
            and step["behavior"] == "Isolated"
            and not step["invert"]
            and "Regex" in step["pattern"]
        ):
            regexes.append(step["pattern"]["Regex"])
        elif kind == "Digits" and step["individual_digits"]:
            regexes.append(r"\p{N}")
        elif kind == "ByteLevel" and not step["add_prefix_space"] and step is steps[-1]:
            if step["use_regex"]:
                regexes.append(_GPT2)
        else:
            regexes = []
            break
    ignore_merges = bool(spec["model"].get("ignore_merges"))
    for name, pre in _PRE_TOKENIZERS.items():
        if list(pre.regexes) == regexes and pre.ignore_merges == ignore_merges:
            return name
    raise UnsupportedError(
        "the tokenizer splits text with rules llama.cpp has no name for (tokenizer.ggml.pre)",
        hint="export with --format hf, or use a tokenizer trained by lmforge (it splits like Qwen2)",
    )


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, fields: dict[str, Any], tokenizer: Tokenizer) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for token_id, add in (
        (tokenizer.bos_id, writer.add_bos_token_id),
        (tokenizer.eos_id, writer.add_eos_token_id),
        (tokenizer.pad_id, writer.add_pad_token_id),
        (tokenizer.token_to_id(tokenizer.unk_token), writer.add_unk_token_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(fields["add_bos"])
    writer.add_add_eos_token(fields["add_eos"])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# ------------------------------------------------------------------------------------------------- checks
def _check_round_trip(path: Path, config: Config, tokenizer: Tokenizer) -> None:
    """Read the file back with our GGUF reader: same architecture, and the same token ids for the probes."""
    written = GGUFFile(path)
    back = written.config()
    for field in _ARCHITECTURE_FIELDS:
        ours, theirs = getattr(config, field), getattr(back, field)
        same = math.isclose(ours, theirs, rel_tol=1e-6) if isinstance(ours, float) else ours == theirs
        if not same:
            raise UnsupportedError(
                f"GGUF ({ARCHITECTURES[config.model_type]}) cannot express this model's {field}={ours!r} "
                f"(it would read back as {theirs!r})",
                hint="export it with --format hf",
            )
    reread = written.tokenizer()
    for text in _PROBES:
        if reread.encode(text) != tokenizer.encode(text):
            raise UnsupportedError(
                f"the GGUF tokenizer would split {text[:30]!r}... differently from the model's tokenizer",
                hint="export with --format hf, or use a tokenizer trained by lmforge",
            )
