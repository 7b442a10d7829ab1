"""GGUF files (llama.cpp's format): metadata -> Config, tokenizer metadata -> Tokenizer, tensors -> weights.

Tensor names follow llama.cpp (``blk.N.attn_q.weight``...). llama.cpp's converter permutes the rows of the
Llama query/key weights to suit its interleaved RoPE kernel; we undo that so the weights fit the rotate-half
RoPE that transformers (and our model) use.
"""

from __future__ import annotations

import contextlib
import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lmforge import limits
from lmforge.config import Config
from lmforge.errors import LmforgeError, ModelFormatError, UnsupportedError
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


class _Damaged(Exception):
    """The header contradicts itself or the file (GGUFFile turns it into one ModelFormatError)."""


class _Truncated(_Damaged):
    """A tensor's data runs past the end of the file."""


# The fewest bytes one metadata pair (key length, empty key, value type, 1-byte value) and one tensor description
# (name length, empty name, dimension count, type, offset) can take: the counts in the header must fit the file.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
# The fewest bytes one array item of each value type takes (a string: its length; an array: type and count).
_MIN_ITEM_BYTES = {**{t: struct.calcsize(f) for t, f in _SCALAR_FORMATS.items()}, 8: 8, 9: 12}


class _HeaderReader:
    """Reads a GGUF header from a buffer, checking every declared count and size against the bytes left."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 4  # after the magic

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if size > self.left():
            raise _Damaged(f"the header runs past the end of the file at byte {self.pos:,}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def count(self, what: str, item_bytes: int) -> int:
        """A declared count of items of at least ``item_bytes`` each, which the rest of the file must hold."""
        n = self.take("<Q")
        if n * item_bytes > self.left():
            raise _Damaged(f"declares {n:,} {what}, more than the {self.left():,} bytes left can hold")
        return n

    def string(self) -> str:
        n = self.count("string bytes", 1)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Damaged(f"a string at byte {self.pos - n:,} is not UTF-8 ({e.reason})") from None

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == 8:
            return self.string()
        if vtype in _SCALAR_FORMATS:
            return self.take(_SCALAR_FORMATS[vtype])
        if vtype != 9:
            raise _Damaged(f"unknown metadata value type {vtype}")
        if depth >= limits.GGUF_MAX_ARRAY_DEPTH:
            raise _Damaged(f"arrays nested deeper than {limits.GGUF_MAX_ARRAY_DEPTH} levels")
        item_type = self.take("<I")
        if item_type not in _MIN_ITEM_BYTES:
            raise _Damaged(f"unknown metadata array item type {item_type}")
        n = self.count("array items", _MIN_ITEM_BYTES[item_type])
        if item_type in _NUMPY_TYPES:
            values = np.frombuffer(
                self.buf, dtype=np.dtype(_NUMPY_TYPES[item_type]), count=n, offset=self.pos
            )
            self.pos += values.nbytes
            return values.tolist()
        return [self.value(item_type, depth + 1) for _ in range(n)]

    def read(self) -> tuple[dict[str, Any], list[TensorInfo]]:
        version = self.take("<I")
        if version not in (2, 3):
            raise _Damaged(f"GGUF version {version} (lmforge reads versions 2 and 3)")
        n_tensors, n_kv = self.take("<Q"), self.take("<Q")
        if n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > self.left():
            raise _Damaged(
                f"declares {n_tensors:,} tensors and {n_kv:,} metadata pairs, more than the "
                f"{self.left():,} bytes left can hold"
            )
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self.string()
            if key in metadata:
                raise _Damaged(f"metadata key {key!r} appears twice")
            metadata[key] = self.value(self.take("<I"))
        raw_tensors = [self.tensor_info() for _ in range(n_tensors)]
        alignment = metadata.get("general.alignment", 32)
        if (
            type(alignment) is not int
            or not 0 < alignment <= limits.GGUF_MAX_ALIGNMENT
            or alignment & (alignment - 1)
        ):
            raise _Damaged(
                f"general.alignment {alignment!r} is not a power of two up to {limits.GGUF_MAX_ALIGNMENT:,}"
            )
        data_start = -(-self.pos // alignment) * alignment
        tensors, names = [], set()
        for name, shape, qtype_id, offset in raw_tensors:
            if name in names:
                raise _Damaged(f"tensor {name} appears twice")
            names.add(name)
            if offset % alignment:
                raise _Damaged(f"tensor {name} starts at offset {offset:,}, not a multiple of {alignment}")
            try:
                qtype = gguf.GGMLQuantizationType(qtype_id)
            except ValueError:
                raise UnsupportedError(
                    f"tensor {name} has unknown GGML type id {qtype_id}",
                    hint="this file needs a newer reader; re-quantize it to a common type such as Q8_0",
                ) from None
            nbytes = tensor_nbytes(qtype, shape)
            end = data_start + offset + nbytes
            if end > len(self.buf):
                raise _Truncated(f"tensor {name} ends at byte {end:,}, the file has {len(self.buf):,}")
            tensors.append(TensorInfo(name, shape, qtype, data_start + offset, nbytes))
        return metadata, tensors

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string()
        n_dims = self.take("<I")
        if not 1 <= n_dims <= limits.GGUF_MAX_DIMS:
            raise _Damaged(
                f"tensor {name} has {n_dims} dimensions (GGUF tensors have 1 to {limits.GGUF_MAX_DIMS})"
            )
        dims = [self.take("<Q") for _ in range(n_dims)]
        if min(dims) < 1:
            raise _Damaged(f"tensor {name} has an empty dimension {dims}")
        # Python integers do not overflow, and a tensor larger than the whole file fails the end check later.
        return name, tuple(reversed(dims)), self.take("<I"), self.take("<Q")


class GGUFFile:
    """An opened GGUF file: its metadata as plain Python values and its tensors, read lazily from a memory map.

    We parse the header ourselves (the layout is small and fixed, see the GGUF spec in llama.cpp's docs):
    it gives one-line errors for damaged files and reads a 50k-token vocabulary in milliseconds. No count,
    length or size in the header is trusted: each is checked against the bytes the file has left (and the caps in
    ``lmforge.limits``) before anything is allocated, so a damaged or hostile file fails with one
    ``ModelFormatError`` naming it and costs at most its own size in memory.
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
            self.metadata, self.tensors = _HeaderReader(self._map).read()
        except _Truncated as e:
            raise ModelFormatError(
                f"{self.path}: truncated GGUF file ({e})",
                hint="the download was cut short; download the file again",
            ) from None
        except _Damaged as e:
            raise ModelFormatError(
                f"{self.path}: damaged GGUF header ({e})",
                hint="the file is truncated or corrupt; download it again",
            ) from None
        except LmforgeError as e:
            raise type(e)(f"{self.path}: {e.message}", hint=e.hint) from None

    def config(self) -> Config:
        """The model the metadata declares, checked against the tensors the file holds (layer count, embedding
        shape) before anything is built from it."""
        with self._naming_file("model metadata"):
            config = config_from_gguf(self.metadata, self.tensor_names(), name=self.path.stem)
            layers = {int(m.group(1)) for t in self.tensors if (m := _TENSOR_NAME.match(t.name))}
            embedding = next((t.shape for t in self.tensors if t.name == "token_embd.weight"), None)
            config.check_weights(self.path, layers, embedding)
        return config

    def tokenizer(self) -> Tokenizer:
        with self._naming_file("tokenizer metadata"):
            specials = special_tokens_from_gguf(self.metadata)
            arch = self.metadata.get("general.architecture", "")
            context = self.metadata.get(f"{arch}.context_length")
            return Tokenizer(
                tokenizer_from_gguf(self.metadata),
                **specials,
                chat_template=self.metadata.get("tokenizer.chat_template"),
                model_max_length=context if type(context) is int else None,
            )

    @contextlib.contextmanager
    def _naming_file(self, what: str) -> Iterator[None]:
        """Errors in reading the metadata's values become one error naming this file: a value of the wrong type
        (a string where a count belongs) surfaces as TypeError / ValueError / ArithmeticError in the code that
        uses it, a tensor that does not fit the declared heads as torch's RuntimeError."""
        try:
            yield
        except LmforgeError as e:
            if str(self.path) in e.message:
                raise
            raise type(e)(f"{self.path}: {e.message}", hint=e.hint) from None
        except (TypeError, ValueError, ArithmeticError, AttributeError, LookupError, RuntimeError) as e:
            raise ModelFormatError(
                f"{self.path}: malformed {what} ({type(e).__name__}: {e})",
                hint="the file is corrupt or was written by a broken converter; re-download or re-convert it",
            ) from None

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
            with self._naming_file(f"tensor {tensor.name} of shape {tensor.shape}"):
                out.update(self._convert(tensor, config, quant, dtype, undo_permutation))
        return out

    def _convert(
        self, tensor: TensorInfo, config: Config, quant: str, dtype: torch.dtype, undo_permutation: bool
    ) -> dict[str, Weights]:
        """One tensor under lmforge's name(s) and layout: float, or packed as ``packed_kind`` says."""
        out: dict[str, Weights] = {}
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
        # Its codes or floats are copies now (a float32 view re-reads its pages when used): drop the file's pages
        # from this process, and with them those the kernel mapped around the tensor (read-ahead and fault-around
        # kept ~50 MB of SmolLM2's file resident until the end otherwise).
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
