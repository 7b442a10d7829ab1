"""Hugging Face weights: safetensors files and the weight names transformers uses.

Our model folder stores weights under transformers' names, so the same folder loads in
``AutoModelForCausalLM.from_pretrained``. The name maps live here, not in the model.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmforge import limits
from lmforge.config import Config
from lmforge.errors import ModelFormatError, UnsupportedError

StateDict = dict[str, torch.Tensor]

# lmforge name -> transformers name, per layer ({i} is the block index)
_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.q_proj.bias": "self_attn.q_proj.bias",
    "attn.k_proj.bias": "self_attn.k_proj.bias",
    "attn.v_proj.bias": "self_attn.v_proj.bias",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_LLAMA_TOP = {"wte.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}

# GPT-2 stores linear layers as Conv1D, i.e. transposed, and fuses q/k/v into c_attn.
_GPT2_LAYER = {
    "attn_norm.weight": "ln_1.weight",
    "attn_norm.bias": "ln_1.bias",
    "attn.o_proj.weight": "attn.c_proj.weight",
    "attn.o_proj.bias": "attn.c_proj.bias",
    "mlp_norm.weight": "ln_2.weight",
    "mlp_norm.bias": "ln_2.bias",
    "mlp.up_proj.weight": "mlp.c_fc.weight",
    "mlp.up_proj.bias": "mlp.c_fc.bias",
    "mlp.down_proj.weight": "mlp.c_proj.weight",
    "mlp.down_proj.bias": "mlp.c_proj.bias",
}
_GPT2_TOP = {
    "wte.weight": "transformer.wte.weight",
    "wpe.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
}
# BERT encoders: separate q/k/v like Llama, but every linear layer has a bias and every norm comes after.
_BERT_LAYER = {
    f"{ours}.{kind}": f"{theirs}.{kind}"
    for ours, theirs in {
        "attn.q_proj": "attention.self.query",
        "attn.k_proj": "attention.self.key",
        "attn.v_proj": "attention.self.value",
        "attn.o_proj": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "mlp.up_proj": "intermediate.dense",
        "mlp.down_proj": "output.dense",
        "mlp_norm": "output.LayerNorm",
    }.items()
    for kind in ("weight", "bias")
}
_BERT_TOP = {
    "wte.weight": "embeddings.word_embeddings.weight",
    "wpe.weight": "embeddings.position_embeddings.weight",
    "wtt.weight": "embeddings.token_type_embeddings.weight",
    "embed_norm.weight": "embeddings.LayerNorm.weight",
    "embed_norm.bias": "embeddings.LayerNorm.bias",
    "pooler.weight": "pooler.dense.weight",
    "pooler.bias": "pooler.dense.bias",
}
# An encoder's heads sit beside the body ("bert."), under BertForSequenceClassification's / BertForMaskedLM's names.
_BERT_HEADS = {
    "score.weight": "classifier.weight",
    "score.bias": "classifier.bias",
    "mlm.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "lm_head.weight": "cls.predictions.decoder.weight",
    "lm_head.bias": "cls.predictions.bias",
}
_LAYER_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


_T5_ATTENTION = {f"{p}_proj": p for p in "qkvo"}
_BART_ATTENTION = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "out_proj"}


def _seq2seq_names(config: Config) -> dict[str, str]:
    """Every lmforge name of a T5 / BART / mBART network -> transformers' name (``seq2seq.Seq2SeqTransformer``)."""
    t5 = config.model_type == "t5"
    top = "" if t5 else "model."
    names = {"wte.weight": f"{top}shared.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    if config.logits_bias:
        names["logits_bias"] = "final_logits_bias"
    kinds = ("weight", "bias") if config.bias else ("weight",)
    for stack, layers in (("encoder", config.n_layer), ("decoder", config.n_decoder_layer)):
        decoder = stack == "decoder"
        parts: dict[str, str] = {}  # our stack-level module -> theirs
        if t5:
            prefix = f"{stack}.block"
            mlp = "layer.2" if decoder else "layer.1"
            if config.position == "relative":
                parts["relative_bias"] = f"{prefix}.0.layer.0.SelfAttention.relative_attention_bias"
            if config.final_norm:
                parts["norm"] = f"{stack}.final_layer_norm"
            block = {
                "attn_norm": "layer.0.layer_norm",
                **{f"attn.{o}": f"layer.0.SelfAttention.{t}" for o, t in _T5_ATTENTION.items()},
                "mlp_norm": f"{mlp}.layer_norm",
                "mlp.down_proj": f"{mlp}.DenseReluDense.wo",
                **(
                    {
                        "mlp.gate_proj": f"{mlp}.DenseReluDense.wi_0",
                        "mlp.up_proj": f"{mlp}.DenseReluDense.wi_1",
                    }
                    if config.gated_mlp
                    else {"mlp.up_proj": f"{mlp}.DenseReluDense.wi"}
                ),
            }
            if decoder:
                block["cross_norm"] = "layer.1.layer_norm"
                block.update({f"cross.{o}": f"layer.1.EncDecAttention.{t}" for o, t in _T5_ATTENTION.items()})
        else:
            prefix = f"model.{stack}.layers"
            if config.position == "learned":
                parts["wpe"] = f"model.{stack}.embed_positions"
            if config.embedding_norm:
                parts["embedding_norm"] = f"model.{stack}.layernorm_embedding"
            if config.final_norm:
                parts["norm"] = f"model.{stack}.layer_norm"
            block = {
                "attn_norm": "self_attn_layer_norm",
                **{f"attn.{o}": f"self_attn.{t}" for o, t in _BART_ATTENTION.items()},
                "mlp_norm": "final_layer_norm",
                "mlp.up_proj": "fc1",
                "mlp.down_proj": "fc2",
            }
            if decoder:
                block["cross_norm"] = "encoder_attn_layer_norm"
                block.update({f"cross.{o}": f"encoder_attn.{t}" for o, t in _BART_ATTENTION.items()})
        for ours, theirs in parts.items():
            # Position tables are embeddings (no bias); norms have one when the family has biases.
            for kind in ("weight",) if ours in ("wpe", "relative_bias") else kinds:
                names[f"{stack}.{ours}.{kind}"] = f"{theirs}.{kind}"
        for i in range(layers):
            for ours, theirs in block.items():
                for kind in kinds:
                    names[f"{stack}.blocks.{i}.{ours}.{kind}"] = f"{prefix}.{i}.{theirs}.{kind}"
    return names


def _name_maps(config: Config) -> tuple[dict[str, str], dict[str, str], str]:
    """(top-level names, per-layer names, transformers' layer prefix) for this model family."""
    if config.is_encoder:
        return _BERT_TOP, _BERT_LAYER, "encoder.layer"
    if config.model_type == "gpt2":
        return _GPT2_TOP, _GPT2_LAYER, "transformer.h"
    return _LLAMA_TOP, _LLAMA_LAYER, "model.layers"


def to_hf_state(state: StateDict, config: Config) -> StateDict:
    """lmforge parameter names and layouts -> transformers' (for saving)."""
    if config.is_encoder:
        return _encoder_to_hf_state(state, config)
    if config.is_seq2seq:
        names = _seq2seq_names(config)
        unknown = sorted(set(state) - set(names) - {"lm_head.weight"})
        if unknown:
            raise KeyError(f"no Hugging Face name for parameter {unknown[0]!r}")
        seq2seq = {names[k]: v for k, v in state.items() if k in names}
        if "final_logits_bias" in seq2seq:
            seq2seq["final_logits_bias"] = seq2seq["final_logits_bias"].reshape(1, -1)  # transformers' (1, V)
        return {k: v.contiguous() for k, v in seq2seq.items()}
    out: StateDict = {}
    gpt2 = config.model_type == "gpt2"
    top, layer_map, prefix = _name_maps(config)
    for name, tensor in state.items():
        if name == "lm_head.weight":
            if not config.tie_embeddings:
                out["lm_head.weight"] = tensor
            continue
        if name == "score.weight":
            out[name] = tensor
            continue
        if name in top:
            out[top[name]] = tensor
            continue
        match = _LAYER_KEY.match(name)
        if match is None:
            raise KeyError(f"no Hugging Face name for parameter {name!r}")
        i, rest = match.groups()
        if gpt2 and rest.startswith("attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            continue  # fused below
        hf_name = f"{prefix}.{i}.{layer_map[rest]}"
        out[hf_name] = tensor.t() if gpt2 and tensor.dim() == 2 else tensor
    if gpt2:
        for i in range(config.n_layer):
            parts = [f"blocks.{i}.attn.{p}_proj" for p in ("q", "k", "v")]
            out[f"{prefix}.{i}.attn.c_attn.weight"] = torch.cat([state[p + ".weight"] for p in parts]).t()
            out[f"{prefix}.{i}.attn.c_attn.bias"] = torch.cat([state[p + ".bias"] for p in parts])
    return {k: v.contiguous() for k, v in out.items()}


def _encoder_body(config: Config) -> str:
    """The prefix of an encoder's body: "bert." when a head sits beside it (as transformers' BertFor* save it)."""
    return "bert." if config.labels or config.masked_lm else ""


def _encoder_to_hf_state(state: StateDict, config: Config) -> StateDict:
    """An encoder's names: the body as BertModel's (under ``_encoder_body``) and the heads under theirs; the
    tied MLM decoder is the embeddings, not saved twice."""
    body = _encoder_body(config)
    out: StateDict = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        if name in _BERT_HEADS:
            out[_BERT_HEADS[name]] = tensor
        elif name in _BERT_TOP:
            out[body + _BERT_TOP[name]] = tensor
        elif (match := _LAYER_KEY.match(name)) is not None:
            out[f"{body}encoder.layer.{match.group(1)}.{_BERT_LAYER[match.group(2)]}"] = tensor
        else:
            raise KeyError(f"no Hugging Face name for parameter {name!r}")
    return {k: v.contiguous() for k, v in out.items()}


def _encoder_heads(config: Config) -> dict[str, str]:
    """transformers' name -> ours, for the heads this encoder's config builds (a checkpoint's others, such as
    a classifier's pooler read as a plain encoder or BERT's next-sentence head, are left out)."""
    wanted = {"pooler."} if config.labels and config.pooling == "cls" else set()
    wanted |= {"score."} if config.labels else set()
    wanted |= {"mlm.", "lm_head."} if config.masked_lm else set()
    heads = {**_BERT_HEADS, "pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"}
    return {theirs: ours for ours, theirs in heads.items() if ours.startswith(tuple(wanted))}


def from_hf_state(hf_state: StateDict, config: Config) -> StateDict:
    """transformers' parameter names and layouts -> lmforge's (for loading)."""
    if config.is_seq2seq:
        reverse = {v: k for k, v in _seq2seq_names(config).items()}
        # Tied copies (encoder/decoder embed_tokens) and anything else transformers keeps are not ours.
        loaded = {reverse[k]: v for k, v in hf_state.items() if k in reverse}
        if "logits_bias" in loaded:
            loaded["logits_bias"] = loaded["logits_bias"].reshape(-1)
        return loaded
    gpt2 = config.model_type == "gpt2"
    top, layer_map, prefix = _name_maps(config)
    reverse_top = {v: k for k, v in top.items()}
    reverse_layer = {v: k for k, v in layer_map.items()}
    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    out: StateDict = {}
    if config.is_encoder:
        heads = _encoder_heads(config)
        reverse_top = {k: v for k, v in reverse_top.items() if not k.startswith("pooler.")}
    for name, tensor in hf_state.items():
        if config.is_encoder:
            name = name.removeprefix("bert.")  # BertFor* checkpoints nest the encoder under "bert."
            if name in heads:
                out[heads[name]] = tensor
                continue
        if gpt2 and not name.startswith(("transformer.", "lm_head.", "score.")):
            name = "transformer." + name  # original GPT-2 checkpoints have no "transformer." prefix
        if name in ("lm_head.weight", "score.weight"):
            out[name] = tensor
            continue
        if name in reverse_top:
            out[reverse_top[name]] = tensor
            continue
        match = layer_key.match(name)
        if match is None:
            continue  # buffers (GPT-2's causal mask, rotary inv_freq, BERT's position_ids) and BERT's pooler
        i, rest = match.groups()
        if gpt2 and rest.startswith("attn.c_attn."):
            kind = rest.rsplit(".", 1)[1]
            fused = tensor.t() if kind == "weight" else tensor  # (3C, C) or (3C,)
            for part, chunk in zip(("q", "k", "v"), fused.chunk(3, dim=0), strict=True):
                out[f"blocks.{i}.attn.{part}_proj.{kind}"] = chunk.contiguous()
            continue
        if rest not in reverse_layer:
            continue  # GPT-2's attn.bias / attn.masked_bias buffers
        out[f"blocks.{i}.{reverse_layer[rest]}"] = (
            tensor.t().contiguous() if gpt2 and tensor.dim() == 2 else tensor
        )
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


# safetensors dtypes lmforge reads, and their bytes per element.
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


@dataclass(frozen=True)
class SafetensorsEntry:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, SafetensorsEntry]:
    """The tensors a safetensors file holds (name -> dtype, shape, bytes), from its header alone.

    Nothing in the header is trusted: its length is checked against the file and ``MAX_SAFETENSORS_HEADER_BYTES``
    before it is read, and every tensor's dtype, shape and byte range against the data the file holds, so a
    damaged file is one ``ModelFormatError`` naming it before any tensor is allocated.
    """
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such file", hint="check the path")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            _bad_safetensors(path, f"{size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, limits.MAX_SAFETENSORS_HEADER_BYTES):
            _bad_safetensors(
                path,
                f"its header claims {length:,} bytes; the file has {size - 8:,} after the length and "
                f"headers are capped at {limits.MAX_SAFETENSORS_HEADER_BYTES:,}",
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        _bad_safetensors(path, f"its header is not JSON: {e}")
    if not isinstance(header, dict):
        _bad_safetensors(path, "its header is not a JSON object")
    data_size = size - 8 - length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                _bad_safetensors(path, "__metadata__ is not a map of strings")
            continue
        entries[name] = _safetensors_entry(path, name, info, data_size)
    return entries


def _safetensors_entry(path: Path, name: str, info: Any, data_size: int) -> SafetensorsEntry:
    if not isinstance(info, dict):
        _bad_safetensors(path, f"tensor {name!r} has no description")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise UnsupportedError(
            f"{path}: tensor {name!r} has dtype {dtype!r}",
            hint=f"lmforge reads safetensors dtypes {', '.join(SAFETENSORS_DTYPES)}",
        )
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        _bad_safetensors(path, f"tensor {name!r} has shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(n) is int for n in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        _bad_safetensors(
            path, f"tensor {name!r} has data_offsets {offsets!r} outside the {data_size:,} data bytes"
        )
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        _bad_safetensors(
            path,
            f"tensor {name!r} ({dtype} {shape}) needs {nbytes:,} bytes, its offsets give {offsets[1] - offsets[0]:,}",
        )
    return SafetensorsEntry(dtype, tuple(shape), nbytes)


def _bad_safetensors(path: Path, problem: str) -> NoReturn:
    raise ModelFormatError(
        f"{path}: not a valid safetensors file ({problem})",
        hint="the file is truncated or corrupt; re-download or re-save it",
    )


def read_safetensors(path: Path) -> StateDict:
    """Load a safetensors file, its header checked first (``read_safetensors_header``); one error naming the file."""
    read_safetensors_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        _bad_safetensors(path, str(e))


def read_hf_weights(folder: Path) -> StateDict:
    """All tensors of a Hugging Face model folder: one model.safetensors or a sharded index."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        weight_map = limits.read_json_object(index, limits.MAX_CONFIG_BYTES, "shard index").get("weight_map")
        shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        # A shard name is a file beside the index: no path may lead out of the folder.
        if not shards or not all(
            isinstance(s, str) and s == Path(s).name and s not in ("", ".", "..") for s in shards
        ):
            raise ModelFormatError(
                f"{index}: not a valid shard index (weight_map must map tensor names to files in the folder)",
                hint="re-download the model",
            )
        state: StateDict = {}
        for shard in sorted(shards):
            state.update(read_safetensors(folder / shard))
        return state
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ModelFormatError(
            f"{folder}: only pickle weights (*.bin / *.pt) found, which lmforge never loads (unsafe)",
            hint="convert them to safetensors with transformers (save_pretrained(safe_serialization=True))",
        )
    raise ModelFormatError(
        f"{folder}: no model.safetensors", hint="a model folder needs its safetensors weights"
    )


def hf_module_name(name: str, config: Config) -> str:
    """Our module name (``blocks.3.attn.q_proj``) -> transformers' (``model.layers.3.self_attn.q_proj``)."""
    if config.is_seq2seq and f"{name}.weight" in (names := _seq2seq_names(config)):
        return names[f"{name}.weight"].removesuffix(".weight")
    match = _LAYER_KEY.match(name)
    if config.model_type == "gpt2" or match is None:
        raise UnsupportedError(
            f"no transformers module for {name!r} in a {config.model_type} model",
            hint="PEFT-layout adapters are written for Llama-family models and BERT encoders",
        )
    i, rest = match.groups()
    if config.is_encoder:
        return f"{_encoder_body(config)}encoder.layer.{i}.{_BERT_LAYER[rest + '.weight'].removesuffix('.weight')}"
    return f"model.layers.{i}.{_LLAMA_LAYER[rest + '.weight'].removesuffix('.weight')}"


def lmforge_module_name(hf_name: str, config: Config) -> str:
    """transformers' module name -> ours (the inverse of ``hf_module_name``)."""
    if config.is_seq2seq:
        reverse = {
            v.removesuffix(".weight"): k.removesuffix(".weight") for k, v in _seq2seq_names(config).items()
        }
        if hf_name in reverse:
            return reverse[hf_name]
    layers = _BERT_LAYER if config.is_encoder else _LLAMA_LAYER
    reverse = {v.removesuffix(".weight"): k.removesuffix(".weight") for k, v in layers.items()}
    prefix = r"(?:bert\.)?encoder\.layer" if config.is_encoder else r"model\.layers"
    match = re.match(rf"^{prefix}\.(\d+)\.(.+)$", hf_name)
    if config.model_type == "gpt2" or match is None or match.group(2) not in reverse:
        raise UnsupportedError(
            f"unknown transformers module {hf_name!r}", hint="use an adapter for this model type"
        )
    return f"blocks.{match.group(1)}.{reverse[match.group(2)]}"
