"""What a model is, read from its files' headers without loading the weights."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

from lmforge.api import locate_model
from lmforge.config import Config
from lmforge.errors import ModelFormatError
from lmforge.formats.gguf import GGUFFile
from lmforge.tokenizer import Tokenizer


def model_info(name_or_path: str | Path | None) -> dict[str, str]:
    kind, path = locate_model(name_or_path)
    if kind == "gguf":
        gguf_file = GGUFFile(path)
        config = gguf_file.config()
        tokenizer = gguf_file.tokenizer()
        types = Counter(t.qtype.name for t in gguf_file.tensors)
        dtype = ", ".join(f"{name} x{count}" for name, count in types.most_common())
        file_format = "GGUF"
    else:
        config = Config.load(path / "config.json")
        tokenizer = Tokenizer.load(path)
        dtype = ", ".join(sorted(_safetensors_dtypes(path)))
        file_format = "model folder (Hugging Face layout)"
    template = tokenizer.chat_template
    attention = f"{config.n_head} heads, {config.n_kv_head} key/value heads, head dim {config.head_dim}"
    position = f"RoPE (theta {config.rope_theta:g})" if config.position == "rope" else "learned absolute"
    return {
        "source": str(path),
        "format": file_format,
        "architecture": f"{config.model_type} ({config.n_layer} layers, {config.n_embd} hidden)",
        "attention": attention,
        "positions": position,
        "parameters": f"{config.num_parameters():,} ({config.num_parameters() / 1e6:.1f}M)",
        "dtype": dtype,
        "context length": str(config.block_size),
        "vocabulary": str(tokenizer.vocab_size),
        "special tokens": f"bos={tokenizer.bos_token!r} eos={tokenizer.eos_token!r} pad={tokenizer.pad_token!r}",
        "chat template": (template[:70].replace("\n", "\\n") + "...") if template else "none",
    }


def _safetensors_dtypes(folder: Path) -> set[str]:
    dtypes: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            try:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            except (struct.error, json.JSONDecodeError, UnicodeDecodeError, MemoryError) as e:
                raise ModelFormatError(
                    f"{file}: unreadable safetensors header ({e})", hint="re-save the file"
                ) from None
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes
