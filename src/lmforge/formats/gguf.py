"""GGUF files (llama.cpp's format): metadata -> Config, tokenizer metadata -> Tokenizer, tensors -> weights.

Tensor names follow llama.cpp (``blk.N.attn_q.weight``...). llama.cpp's converter permutes the rows of the
Llama query/key weights to suit its interleaved RoPE kernel; we undo that so the weights fit the rotate-half
RoPE that transformers (and our model) use.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lmforge.config import Config
from lmforge.errors import ModelFormatError, UnsupportedError
from lmforge.formats.gguf_quants import PACKED_TYPES, block_codes, dequantize, tensor_nbytes
from lmforge.formats.gguf_tokenizer import special_tokens_from_gguf, tokenizer_from_gguf
from lmforge.quant import Kind, PackedLinear, QuantizedWeight, quantize_weight
from lmforge.tokenizer import Tokenizer

StateDict = dict[str, torch.Tensor]
Weights = torch.Tensor | QuantizedWeight
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2", "mistral": "mistral"}

_LAYER_TENSORS = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {"token_embd": "wte", "position_embd": "wpe", "output_norm": "norm", "output": "lm_head"}
_TENSOR_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


# GGUF metadata value types -> struct format (numbers) ; 8 = string, 9 = array
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY_TYPES = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: rows first (GGUF stores the reverse)
    qtype: gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """An opened GGUF file: its metadata as plain Python values and its tensors, read lazily from a memory map.

    We parse the header ourselves (the layout is small and fixed, see the GGUF spec in llama.cpp's docs):
    it gives one-line errors for damaged files and reads a 50k-token vocabulary in milliseconds.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(f"{self.path}: no such file", hint="check the path to the .gguf file")
        self.size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelFormatError(
                    f"{self.path}: not a GGUF file (it does not start with the GGUF magic bytes)",
                    hint="pass a .gguf model file, or a model folder with config.json",
                )
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.metadata, self.tensors = self._parse_header()
        except (struct.error, UnicodeDecodeError, ValueError, KeyError, OverflowError) as e:
            raise ModelFormatError(
                f"{self.path}: damaged GGUF header ({type(e).__name__}: {e})",
                hint="the file is truncated or corrupt; download it again",
            ) from None
        for tensor in self.tensors:
            if tensor.offset + tensor.nbytes > self.size:
                raise ModelFormatError(
                    f"{self.path}: truncated GGUF file (tensor {tensor.name} ends at byte "
                    f"{tensor.offset + tensor.nbytes:,}, the file has {self.size:,})",
                    hint="the download was cut short; download the file again",
                )

    def _parse_header(self) -> tuple[dict[str, Any], list[TensorInfo]]:
        buf = self._map
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (lmforge reads versions 2 and 3)")
        pos = 24

        def read(fmt: str) -> Any:
            nonlocal pos
            (value,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return value

        def read_str() -> str:
            nonlocal pos
            n = read("<Q")
            if pos + n > len(buf):
                raise ValueError("string runs past the end of the file")
            text = bytes(buf[pos : pos + n]).decode("utf-8")
            pos += n
            return text

        def read_value(vtype: int) -> Any:
            nonlocal pos
            if vtype == 8:
                return read_str()
            if vtype == 9:
                item_type, count = read("<I"), read("<Q")
                if item_type in _NUMPY_TYPES:
                    dtype = np.dtype(_NUMPY_TYPES[item_type])
                    values = np.frombuffer(buf, dtype=dtype, count=count, offset=pos)
                    pos += dtype.itemsize * count
                    return values.tolist()
                return [read_value(item_type) for _ in range(count)]
            return read(_SCALAR_FORMATS[vtype])

        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = read_str()
            metadata[key] = read_value(read("<I"))
        raw_tensors = []
        for _ in range(n_tensors):
            name = read_str()
            dims = [read("<Q") for _ in range(read("<I"))]
            raw_tensors.append((name, tuple(reversed(dims)), read("<I"), read("<Q")))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = -(-pos // alignment) * alignment
        tensors = []
        for name, shape, qtype_id, offset in raw_tensors:
            try:
                qtype = gguf.GGMLQuantizationType(qtype_id)
            except ValueError:
                raise UnsupportedError(
                    f"{self.path}: tensor {name} has unknown GGML type id {qtype_id}",
                    hint="this file needs a newer reader; re-quantize it to a common type such as Q8_0",
                ) from None
            tensors.append(TensorInfo(name, shape, qtype, data_start + offset, tensor_nbytes(qtype, shape)))
        return metadata, tensors

    def config(self) -> Config:
        return config_from_gguf(self.metadata, self.tensor_names(), name=self.path.stem)

    def tokenizer(self) -> Tokenizer:
        specials = special_tokens_from_gguf(self.metadata)
        arch = self.metadata.get("general.architecture", "")
        return Tokenizer(
            tokenizer_from_gguf(self.metadata),
            **specials,
            chat_template=self.metadata.get("tokenizer.chat_template"),
            model_max_length=self.metadata.get(f"{arch}.context_length"),
        )

    def drop_vocabulary(self) -> None:
        """Forget the tokenizer's metadata (tens of thousands of strings, ~10 MB as Python objects) once the
        tokenizer is built: the loader packs the weights next, and the peak memory is then what stays."""
        self.metadata = {k: v for k, v in self.metadata.items() if not k.startswith("tokenizer.")}

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def tensor_data(self, tensor: TensorInfo) -> np.ndarray:
        """The raw bytes of one tensor (a view of the memory map, no copy)."""
        return np.frombuffer(self._map, dtype=np.uint8, count=tensor.nbytes, offset=tensor.offset)

    def state_dict(
        self, config: Config, dtype: torch.dtype = torch.float32, quant: str = "none"
    ) -> dict[str, torch.Tensor | PackedLinear]:
        """All weights under lmforge's names and layouts: float tensors, or with ``quant`` packed layers.

        ``quant="none"`` dequantizes everything. ``"auto"`` keeps linear layers as stored: Q4_0/Q4_1 -> int4 and
        Q8_0 -> int8 exactly, other block types (K-quants, Q5) requantized to the nearest kind, float types
        stay float. ``"int8"`` / ``"int4"`` pack every linear layer as that kind (the head as int8).
        """
        out: dict[str, Weights] = {}
        undo_permutation = self.metadata.get("general.architecture") == "llama"
        for tensor in self.tensors:
            kind = packed_kind(tensor, config, quant)
            weights: Weights
            if kind is None:
                array = dequantize(self.tensor_data(tensor), tensor.qtype, tensor.shape)
                weights = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
            elif PACKED_TYPES.get(tensor.qtype) == kind:
                codes, scales, zeros = block_codes(self.tensor_data(tensor), tensor.qtype, tensor.shape)
                weights = QuantizedWeight(
                    kind,
                    torch.from_numpy(np.ascontiguousarray(codes)),
                    torch.from_numpy(scales),
                    torch.from_numpy(zeros) if zeros is not None else None,
                )
            elif tensor.qtype == gguf.GGMLQuantizationType.Q4_0 and kind == "int8":
                # Q4_0 is (q - 8) * d: int8 codes q - 8 with the same scales hold it exactly (a tied table).
                codes, scales, _ = block_codes(self.tensor_data(tensor), tensor.qtype, tensor.shape)
                weights = QuantizedWeight(
                    "int8", torch.from_numpy(codes.astype(np.int8) - 8), torch.from_numpy(scales)
                )
            else:
                array = dequantize(self.tensor_data(tensor), tensor.qtype, tensor.shape)
                weights = quantize_weight(torch.from_numpy(array), kind)
            # Its codes or floats are copies now (a float32 view re-reads its pages when used): drop the file's
            # pages from this process, and with them those the kernel mapped around the tensor (read-ahead and
            # fault-around kept ~50 MB of SmolLM2's file resident until the end otherwise).
            self._map.madvise(mmap.MADV_DONTNEED)
            for name, value in _rename(tensor.name, weights, config, undo_permutation):
                # Pack now: the integer codes of one tensor at a time, not of the whole model, are ever in memory.
                out[name] = PackedLinear(value) if isinstance(value, QuantizedWeight) else value
        return out


# Block types without a packed layout of their own, and the packed kind with at least their precision.
_NEAREST_KIND: dict[str, Kind] = {"Q2_K": "int4", "Q3_K": "int4", "Q4_K": "int4"}


def nearest_kind(qtype: gguf.GGMLQuantizationType) -> Kind | None:
    """The packed kind ``quant="auto"`` keeps a block type's linear layers as: Q4_0/Q4_1 -> int4 and Q8_0 -> int8
    exactly, the other 2-4 bit types -> int4 and 5-8 bit types -> int8 (requantized); None for float types."""
    qtype = gguf.GGMLQuantizationType(qtype)
    if qtype in PACKED_TYPES:
        return PACKED_TYPES[qtype]  # type: ignore[return-value]
    if qtype.name in _NEAREST_KIND:
        return _NEAREST_KIND[qtype.name]
    if qtype.name.startswith(("Q5", "Q6", "Q8")):
        return "int8"
    return None  # F32, F16, BF16: float weights stay float


def packed_kind(tensor: TensorInfo, config: Config, quant: str) -> Kind | None:
    """The kind a GGUF tensor is packed as under ``quant``, or None to load it as floats (``state_dict``'s rule,
    which sizing reads too)."""
    top, _, field = tensor.name.rpartition(".")
    if quant == "none" or field != "weight" or len(tensor.shape) != 2 or "norm" in top:
        return None
    head = top == "output" or (top == "token_embd" and config.tie_embeddings)
    if top == "token_embd" and not head or top == "position_embd" or tensor.shape[-1] % 32:
        return None  # an untied embedding table is read a row at a time: it costs no bandwidth per token
    if quant in ("int8", "int4"):
        return "int8" if head else quant  # type: ignore[return-value]
    stored = nearest_kind(tensor.qtype)
    if stored is not None and top == "token_embd":
        return "int8"  # a packed embedding table is int8
    return stored


def _rename(name: str, weights: Weights, config: Config, undo_permutation: bool) -> list[tuple[str, Weights]]:
    top, _, kind = name.rpartition(".")
    if top in _TOP_TENSORS:
        return [(f"{_TOP_TENSORS[top]}.{kind}", weights)]
    if top == "rope_freqs":
        raise UnsupportedError(
            "GGUF with per-frequency RoPE factors (rope_freqs)", hint="use a Hugging Face folder"
        )
    match = _TENSOR_NAME.match(name)
    if match is None:
        raise UnsupportedError(
            f"unknown GGUF tensor {name!r}", hint="this architecture variant is not supported"
        )
    layer, part, kind = match.groups()
    prefix = f"blocks.{layer}"
    if part == "attn_qkv":  # GPT-2 fuses q, k, v
        q, k, v = weights.split([config.n_head * config.head_dim, *[config.n_kv_head * config.head_dim] * 2])
        return [(f"{prefix}.attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v), strict=True)]
    if part not in _LAYER_TENSORS:
        raise UnsupportedError(
            f"unknown GGUF tensor {name!r}", hint="this architecture variant is not supported"
        )
    if undo_permutation and part in ("attn_q", "attn_k"):
        heads = config.n_head if part == "attn_q" else config.n_kv_head
        if isinstance(weights, QuantizedWeight):  # codes and scales share the row order
            weights = weights.map_rows(lambda rows: unpermute_qk(rows, heads))
        else:
            weights = unpermute_qk(weights, heads)
    return [(f"{prefix}.{_LAYER_TENSORS[part]}.{kind}", weights)]


def unpermute_qk(weights: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of q/k: per head, rows (0, D/2, 1, D/2+1, ...) back to (0..D/2, D/2..D)."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_heads, rows // n_heads // 2, 2, *weights.shape[1:])
        .transpose(1, 2)
        .reshape(weights.shape)
    )


def config_from_gguf(metadata: dict[str, Any], tensor_names: list[str], name: str = "gguf") -> Config:
    arch = metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedError(
            f"unsupported architecture {arch!r} in GGUF file",
            hint=f"lmforge runs GGUF architectures: {', '.join(GGUF_ARCHITECTURES)}",
        )

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelFormatError(
                f"GGUF metadata lacks {arch}.{key}", hint="the file is incomplete; re-export it"
            )
        return value

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    vocab = metadata.get(f"{arch}.vocab_size") or len(metadata.get("tokenizer.ggml.tokens", []))
    common = dict(
        name=name,
        model_type=GGUF_ARCHITECTURES[arch],
        vocab_size=int(vocab),
        block_size=int(get("context_length")),
        n_layer=int(get("block_count")),
        n_head=n_head,
        n_embd=n_embd,
        intermediate_size=int(get("feed_forward_length")),
        tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
    )
    if arch == "gpt2":
        return Config(
            **common,
            position="learned",
            norm="layernorm",
            norm_eps=float(get("attention.layer_norm_epsilon", 1e-5)),
            gated_mlp=False,
            activation="gelu_tanh",
            bias=True,
        )
    scaling = None
    scaling_type = metadata.get(f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise UnsupportedError(f"GGUF RoPE scaling {scaling_type!r}", hint="supported: linear or none")
    return Config(
        **common,
        n_kv_head=int(get("attention.head_count_kv", n_head)),
        head_dim=int(get("attention.key_length", n_embd // n_head)),
        position="rope",
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        norm="rmsnorm",
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        gated_mlp=True,
        activation="silu",
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        sliding_window=metadata.get(f"{arch}.attention.sliding_window"),
    )
