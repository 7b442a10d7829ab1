"""Caps on what a model file may declare, checked before anything is allocated, parsed or built.

A file's header is never trusted: a few hundred bytes can claim a million layers, a 2^60-byte string or a
terabyte tensor. Every size a reader takes from a file is compared with the file itself and with these caps
first, so a hostile or damaged file costs at most its own size in memory and fails with one ``LmforgeError``
naming it. The caps sit far above every real model (Llama 3.1 405B: 126 layers, 128 heads, hidden 16384,
intermediate 53248; Gemma: 256k vocabulary) and are documented in docs/architecture.md ("Untrusted files").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError, ModelFormatError

MiB = 1 << 20

# JSON side files are read whole and parsed in memory, so each kind has a size cap checked before reading.
MAX_CONFIG_BYTES = 16 * MiB  # config.json, generation/tokenizer/adapter configs, shard indexes
MAX_TOKENIZER_BYTES = 128 * MiB  # tokenizer.json (Gemma 3's is 33 MB)
MAX_MANIFEST_BYTES = 64 * MiB  # store manifests (a data fingerprint lists every file of a corpus)
# The safetensors library's own cap on a header (its Rust reader refuses larger ones too).
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000

# GGUF: ggml tensors have at most 4 dimensions; arrays of arrays deeper than this appear in no real file.
GGUF_MAX_DIMS = 4
GGUF_MAX_ARRAY_DEPTH = 2
GGUF_MAX_ALIGNMENT = MiB  # general.alignment must be a power of two up to this

# Model shapes a config may declare (inclusive maxima; each must also be >= 1).
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HIDDEN = 65536  # n_embd
MAX_HEAD_DIM = 4096
MAX_INTERMEDIATE = 262144
MAX_VOCAB = 1 << 22
# The RoPE tables are precomputed for the whole context (block_size x head_dim, twice), so the context is capped
# at 1M tokens (Qwen2.5-1M's context fits).
MAX_CONTEXT = 1 << 20

# Tool calling (``lmforge.tools``): what one request's ``tools`` may hold. OpenAI's own caps: 128 tools, names of
# 64 letters, digits, '_' or '-'. A tool's JSON (name, description, schema) is rendered into every prompt, so it
# is capped too; the whole prompt is then bounded by the context.
MAX_TOOLS = 128
MAX_TOOL_NAME_CHARS = 64
MAX_TOOL_CHARS = 32_768

# Constrained decoding (lmforge.structured): a JSON schema, regex or choice list, as JSON text, at most this size.
# OpenAI's structured outputs allow 100 object properties nested 5 deep; such a schema is about 10 KB.
MAX_CONSTRAINT_BYTES = 64 * 1024

# The prefix cache's budget in MiB (lmforge.prefix_cache): LLM's and `lmforge serve --prefix-cache-mb`'s default
# holds ~5,600 tokens of SmolLM2 in float32 (46 KiB each); above the maximum, a figure is a typo.
DEFAULT_PREFIX_CACHE_MB = 256.0
MAX_PREFIX_CACHE_MB = float(1 << 20)


def check_prefix_cache_mb(megabytes: float) -> float:
    """A prefix cache budget in MiB, checked: 0 (off) to ``MAX_PREFIX_CACHE_MB``."""
    if not 0 <= megabytes <= MAX_PREFIX_CACHE_MB:  # NaN fails too
        raise LmforgeError(
            f"prefix cache budget of {megabytes} MB is out of range",
            hint=f"use 0 (off) to {MAX_PREFIX_CACHE_MB:.0f} MB",
        )
    return float(megabytes)


def check_file_size(path: Path, max_bytes: int, what: str) -> int:
    """The size of ``path``; a ``ModelFormatError`` when it is over ``max_bytes`` (checked before reading it)."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelFormatError(
            f"{path}: {size:,} bytes, over the {max_bytes:,}-byte limit for a {what}",
            hint="the file is damaged or not what its name says",
        )
    return size


def read_json_object(
    path: Path, max_bytes: int = MAX_CONFIG_BYTES, what: str = "JSON config"
) -> dict[str, Any]:
    """A JSON object from ``path``, size-capped before it is read; one ``ModelFormatError`` naming the file for
    anything else (too large, not UTF-8, not JSON, nested too deep, not an object). A missing file raises
    ``FileNotFoundError`` so callers can say which file a folder lacks."""
    size = check_file_size(path, max_bytes, what)
    with open(path, "rb") as f:
        # read(n) allocates n bytes up front: ask for the size checked (one more shows a file grown past the cap).
        raw = f.read(size + 1)
    try:
        if len(raw) > max_bytes:
            raise ValueError(f"over the {max_bytes:,}-byte limit")
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelFormatError(
            f"{path}: not a valid {what} ({e})", hint="fix or re-download the file"
        ) from None
    if not isinstance(value, dict):
        raise ModelFormatError(
            f"{path}: not a valid {what} (a JSON {type(value).__name__}, not an object)",
            hint="fix or re-download the file",
        )
    return value
