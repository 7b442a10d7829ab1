"""What a model is, read from its files' headers without loading the weights."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import Config
from lmforge.formats.folder import CONFIG_FILE
from lmforge.formats.gguf import GGUFFile, TensorInfo
from lmforge.formats.hf import read_safetensors_header
from lmforge.loading import locate_model
from lmforge.tokenizer import Tokenizer


@dataclass
class ModelHeader:
    """A model as its file headers describe it: enough to size it without reading any weights."""

    kind: str  # "gguf", or "folder" for model folders wherever they come from (path, store, hub)
    path: Path
    config: Config
    tokenizer: Tokenizer
    weight_types: Counter[str]  # tensor (GGUF) or safetensors dtype -> how many tensors
    file_bytes: int  # weights on disk
    tensors: tuple[
        TensorInfo, ...
    ] = ()  # a GGUF file's tensors: names, shapes, block types (none for folders)


def read_header(name_or_path: str | Path | None) -> ModelHeader:
    kind, path = locate_model(name_or_path)
    if kind == "gguf":
        gguf_file = GGUFFile(path)
        types = Counter(t.qtype.name for t in gguf_file.tensors)
        size = sum(t.nbytes for t in gguf_file.tensors)
        config, tokenizer = gguf_file.config(), gguf_file.tokenizer()
        return ModelHeader("gguf", path, config, tokenizer, types, size, tuple(gguf_file.tensors))
    types, size = _safetensors_dtypes(path)
    return ModelHeader("folder", path, Config.load(path / CONFIG_FILE), Tokenizer.load(path), types, size)


def model_info(name_or_path: str | Path | None) -> dict[str, str]:
    header = read_header(name_or_path)
    config, tokenizer = header.config, header.tokenizer
    if header.kind == "gguf":
        dtype = ", ".join(f"{name} x{count}" for name, count in header.weight_types.most_common())
        file_format = "GGUF"
    else:
        dtype = ", ".join(sorted(header.weight_types))
        file_format = "model folder (Hugging Face layout)"
    template = tokenizer.chat_template
    attention = f"{config.n_head} heads, {config.n_kv_head} key/value heads, head dim {config.head_dim}"
    position = {
        "rope": f"RoPE (theta {config.rope_theta:g})",
        "relative": f"relative ({config.relative_buckets} buckets up to {config.relative_max_distance})",
    }.get(config.position, "learned absolute")
    return {
        "source": str(header.path),
        "format": file_format,
        "architecture": f"{config.model_type} ({config.n_layer} layers, {config.n_embd} hidden)"
        if not config.is_seq2seq
        else f"{config.model_type} encoder–decoder ({config.n_layer} + {config.n_decoder_layer} layers, "
        f"{config.n_embd} hidden)",
        "attention": attention,
        "positions": position,
        "parameters": f"{config.num_parameters():,} ({config.num_parameters() / 1e6:.1f}M)",
        "dtype": dtype,
        "context length": str(config.block_size),
        "vocabulary": str(tokenizer.vocab_size),
        "special tokens": f"bos={tokenizer.bos_token!r} eos={tokenizer.eos_token!r} pad={tokenizer.pad_token!r}",
        "chat template": (template[:70].replace("\n", "\\n") + "...") if template else "none",
    }


def _safetensors_dtypes(folder: Path) -> tuple[Counter[str], int]:
    """Tensor dtypes (how many of each) and weight bytes of a folder's safetensors files, from their headers."""
    dtypes: Counter[str] = Counter()
    size = 0
    for file in folder.glob("*.safetensors"):
        header = read_safetensors_header(file)
        dtypes.update(entry.dtype for entry in header.values())
        size += sum(entry.nbytes for entry in header.values())
    return dtypes, size
