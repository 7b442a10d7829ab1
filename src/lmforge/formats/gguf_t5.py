"""Write a T5 encoder–decoder as a GGUF file that llama.cpp runs (its ``t5`` architecture).

Layout, as llama.cpp's ``convert_hf_to_gguf.py`` (``T5Model``) writes it and ``gguf``'s ``MODEL_ARCH.T5`` names
it: ``token_embd`` (shared by both stacks), ``enc.blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_o, ffn_norm,
ffn_gate, ffn_up, ffn_down}``, ``enc.output_norm``, ``dec.blk.N.{attn_*, cross_attn_norm, cross_attn_{q,k,v,o},
ffn_*}``, ``dec.output_norm`` and ``output``. The relative-position bias (one per stack) is ``*.blk.0.attn_rel_b``;
llama.cpp reuses block 0's in every block, as T5 does.

What llama.cpp fixes, and so what this writer checks before writing anything: attention unscaled, RMS norms,
no biases, ReLU (T5 v1.0) or gated GELU with tanh (v1.1: ``ffn_gate`` present), bucket distances up to 128.
llama.cpp never scales the hidden states before a tied head, so a T5 v1.0 head (the embedding times
``n_embd ** -0.5``) is written as its own ``output`` matrix: the logits come out as transformers' do.

Tokenizers: a SentencePiece-style unigram one (T5's own, or ``tokenizers``' ``Unigram``) becomes llama.cpp's
``t5`` vocabulary (pieces, scores, types, the normalizer's precompiled character map); a byte-level BPE one
(what ``lmforge tokenizer train`` makes) is written as for a decoder.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import gguf
from gguf import GGMLQuantizationType as QType
from gguf import TokenType

from lmforge.config import Config
from lmforge.errors import LmforgeError, UnsupportedError
from lmforge.formats.atomic import atomic_write_file
from lmforge.formats.gguf import GGUFFile
from lmforge.formats.gguf_writer import (
    FILE_TYPES,
    Weights,
    _add_tokenizer_metadata,
    _encode,
    check_file_type,
    tokenizer_fields,
)
from lmforge.quant import QuantizedWeight
from lmforge.tokenizer import Tokenizer

# llama.cpp's llama_relative_position_bucket has the distance limit built in
LLAMA_CPP_MAX_DISTANCE = 128

_HF_FIX = "export it with --format hf (transformers' AutoModelForSeq2SeqLM loads that folder)"

# our parameter (after "blocks.N.") -> llama.cpp's tensor (after "enc.blk.N." / "dec.blk.N.")
_BLOCK = {
    "attn_norm": "attn_norm",
    "attn.q_proj": "attn_q",
    "attn.k_proj": "attn_k",
    "attn.v_proj": "attn_v",
    "attn.o_proj": "attn_o",
    "cross_norm": "cross_attn_norm",
    "cross.q_proj": "cross_attn_q",
    "cross.k_proj": "cross_attn_k",
    "cross.v_proj": "cross_attn_v",
    "cross.o_proj": "cross_attn_o",
    "mlp_norm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def check_t5_exportable(config: Config) -> None:
    """One line naming what llama.cpp's T5 cannot run (BART, mBART, or a T5 changed beyond its shape)."""
    if config.model_type in ("bart", "mbart"):
        raise UnsupportedError(
            f"{config.name} is a {config.model_type.upper()} model; llama.cpp has no {config.model_type} "
            "architecture (of encoder–decoders it runs T5 only), so there is no GGUF file to write",
            hint=_HF_FIX,
        )
    checks = (
        (config.position == "relative", "relative positions"),
        (config.attention_scale == 1.0, "unscaled attention"),
        (config.norm == "rmsnorm" and not config.bias and not config.qkv_bias, "RMS norms and no biases"),
        (config.n_kv_head == config.n_head, "as many key/value heads as query heads"),
        (not config.post_norm and config.final_norm and not config.embedding_norm, "pre-norm blocks"),
        (not config.scale_embeddings and not config.logits_bias, "unscaled embeddings and no logits bias"),
        (
            (config.gated_mlp and config.activation == "gelu_tanh")
            or (not config.gated_mlp and config.activation == "relu"),
            "a ReLU MLP (T5 v1.0) or a gated tanh-GELU one (v1.1)",
        ),
        (config.relative_max_distance == LLAMA_CPP_MAX_DISTANCE, "bucket distances up to 128"),
    )
    for ok, needs in checks:
        if not ok:
            raise UnsupportedError(
                f"llama.cpp's T5 needs {needs}, which {config.name} does not have", hint=_HF_FIX
            )


def write_t5_gguf(
    path: str | Path,
    config: Config,
    state: Mapping[str, Weights],
    tokenizer: Tokenizer,
    file_type: str = "f32",
) -> Path:
    """Write one T5 GGUF file atomically (a temporary sibling, read back and checked, then renamed)."""
    path = Path(path)
    file_type = check_file_type(file_type)
    check_t5_exportable(config)
    vocab = _vocabulary(tokenizer, config.vocab_size)
    qtype, ftype = FILE_TYPES[file_type]
    tensors = dict(t5_tensors(config, state))

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, "t5")
        _add_metadata(writer, config)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab(writer)
        for name, tensor in tensors.items():
            # llama.cpp's converter keeps norms and the small bias tables in F32
            data, data_type = _encode(name, tensor, QType.F32 if "attn_rel_b" in name else qtype)
            writer.add_tensor(name, data, raw_dtype=data_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _check_read_back(tmp, tensors)

    return atomic_write_file(path, write)


def _add_metadata(writer: gguf.GGUFWriter, config: Config) -> None:
    writer.add_name(config.name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.n_layer)
    writer.add_decoder_block_count(config.n_decoder_layer)
    writer.add_head_count(config.n_head)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_eps(config.norm_eps)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_relative_attn_buckets_count(config.relative_buckets)
    start = config.decoder_start_token_id
    writer.add_decoder_start_token_id(config.pad_token_id if start is None else start)


def t5_tensors(config: Config, state: Mapping[str, Weights]) -> Iterator[tuple[str, Weights]]:
    """(llama.cpp name, tensor) for every weight; the tied v1.0 head as its own, pre-scaled ``output``."""
    for name, tensor in state.items():
        module, _, kind = name.rpartition(".")
        if name == "wte.weight":
            yield "token_embd.weight", tensor
            if config.tie_embeddings:
                table = tensor.dequantize() if isinstance(tensor, QuantizedWeight) else tensor
                scale = config.n_embd**-0.5 if config.scale_head_input else 1.0
                yield "output.weight", table.float() * scale
        elif name == "lm_head.weight":
            if not config.tie_embeddings:
                yield "output.weight", tensor
        elif name.endswith("relative_bias.weight"):
            yield f"{_stack(name)}.blk.0.attn_rel_b.weight", tensor
        elif module in ("encoder.norm", "decoder.norm"):
            yield f"{_stack(name)}.output_norm.{kind}", tensor
        else:
            stack, _, rest = module.partition(".blocks.")
            layer, _, part = rest.partition(".")
            if stack not in ("encoder", "decoder") or part not in _BLOCK:
                raise KeyError(f"no llama.cpp T5 name for parameter {name!r}")
            yield f"{_stack(name)}.blk.{layer}.{_BLOCK[part]}.{kind}", tensor


def _stack(name: str) -> str:
    return "enc" if name.startswith("encoder.") else "dec"


# ---------------------------------------------------------------------------------------------- tokenizer
def _vocabulary(tokenizer: Tokenizer, vocab_size: int) -> Callable[[gguf.GGUFWriter], None]:
    """A function that writes the tokenizer's metadata; the checks run now, before any file is opened."""
    spec = json.loads(tokenizer.backend.to_str())
    if spec["model"]["type"] == "Unigram":
        fields = _unigram_fields(tokenizer, spec, vocab_size)
        return lambda writer: _add_unigram_metadata(writer, fields, tokenizer)
    byte_level = tokenizer_fields(tokenizer, vocab_size)  # one line for anything but byte-level BPE
    return lambda writer: _add_tokenizer_metadata(writer, byte_level, tokenizer)


def _unigram_fields(tokenizer: Tokenizer, spec: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """llama.cpp's ``t5`` (UGM) vocabulary from a ``tokenizers`` Unigram model: pieces, log-probabilities,
    types, and the normalizer's settings."""
    model = spec["model"]
    pieces = model["vocab"]
    if len(pieces) > vocab_size:
        raise LmforgeError(
            f"the tokenizer has {len(pieces)} pieces but the model's vocabulary is {vocab_size}",
            hint="the tokenizer does not belong to this model",
        )
    normalizers = _steps(spec.get("normalizer"), "normalizers")
    charsmap = b""
    collapse_spaces = False
    for step in normalizers:
        if step["type"] == "Precompiled":
            charsmap = base64.b64decode(step.get("precompiled_charsmap") or "")
        elif step["type"] == "Replace" and step["pattern"].get("Regex") == " {2,}" and step["content"] == " ":
            collapse_spaces = True  # T5's tokenizer.json: SentencePiece's remove_extra_whitespaces
        elif step["type"] != "Strip":
            raise _unsupported_tokenizer(f"its {step['type']} normalizer")
    splits = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    for step in splits:
        # transformers' newer T5 tokenizers split on whitespace: runs of spaces count as one
        if step["type"] == "WhitespaceSplit":
            collapse_spaces = True
        elif step["type"] != "Metaspace":
            raise _unsupported_tokenizer(f"its {step['type']} pre-tokenizer")
    metaspace = [step for step in splits if step["type"] == "Metaspace"]
    if not metaspace or metaspace[0].get("replacement", "▁") != "▁":
        raise _unsupported_tokenizer("no Metaspace pre-tokenizer (SentencePiece's '▁' for spaces)")
    prepend = metaspace[0].get(
        "prepend_scheme", "always" if metaspace[0].get("add_prefix_space") else "never"
    )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [TokenType.UNUSED] * vocab_size
    for i, (piece, score) in enumerate(pieces):
        tokens[i], scores[i] = piece, float(score)
        byte = (
            model.get("byte_fallback") and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
        )
        types[i] = TokenType.BYTE if byte else TokenType.NORMAL
    if model.get("unk_id") is not None:
        types[model["unk_id"]] = TokenType.UNKNOWN
    for i, added in tokenizer.backend.get_added_tokens_decoder().items():
        if i >= vocab_size:
            raise LmforgeError(
                f"the tokenizer's token {added.content!r} has id {i}, beyond the model's vocabulary {vocab_size}",
                hint="the tokenizer does not belong to this model",
            )
        tokens[i] = added.content
        if types[i] != TokenType.UNKNOWN:
            types[i] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED
    with_specials, without = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    return {
        "tokens": tokens,
        "scores": scores,
        "types": types,
        "unk": model.get("unk_id"),
        "charsmap": charsmap,
        "space_prefix": prepend != "never",
        "collapse_spaces": collapse_spaces,
        "add_bos": tokenizer.bos_id is not None and with_specials[0] == tokenizer.bos_id != without[0],
        "add_eos": tokenizer.eos_id is not None and with_specials[-1] == tokenizer.eos_id != without[-1],
    }


def _steps(step: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if not step:
        return []
    return list(step[key]) if step["type"] == "Sequence" else [step]


def _unsupported_tokenizer(what: str) -> UnsupportedError:
    return UnsupportedError(
        f"llama.cpp's T5 vocabulary cannot follow this unigram tokenizer: {what}", hint=_HF_FIX
    )


def _add_unigram_metadata(writer: gguf.GGUFWriter, fields: dict[str, Any], tokenizer: Tokenizer) -> None:
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(fields["tokens"])
    writer.add_token_scores(fields["scores"])
    writer.add_token_types(fields["types"])
    writer.add_add_space_prefix(fields["space_prefix"])
    writer.add_remove_extra_whitespaces(fields["collapse_spaces"])
    if fields["charsmap"]:
        writer.add_precompiled_charsmap(fields["charsmap"])
    for token_id, add in (
        (tokenizer.bos_id, writer.add_bos_token_id),
        (tokenizer.eos_id, writer.add_eos_token_id),
        (tokenizer.pad_id, writer.add_pad_token_id),
        (fields["unk"], writer.add_unk_token_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(fields["add_bos"])
    writer.add_add_eos_token(fields["add_eos"])


# ------------------------------------------------------------------------------------------------- checks
def _check_read_back(path: Path, tensors: Mapping[str, Weights]) -> None:
    """The file parses (lmforge's own header reader: gguf-py's takes seconds over a 240 KB character map), names
    the ``t5`` architecture and holds every tensor in its shape."""
    written = GGUFFile(path)
    if written.metadata.get("general.architecture") != "t5":
        raise LmforgeError(f"{path} was written without the t5 architecture", hint="report this as a bug")
    shapes = {t.name: t.shape for t in written.tensors}
    for name, tensor in tensors.items():
        if shapes.get(name) != tuple(tensor.shape):
            raise LmforgeError(
                f"{path}: tensor {name} reads back as {shapes.get(name)}, not {tuple(tensor.shape)}",
                hint="report this as a bug",
            )
