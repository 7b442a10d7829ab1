"""The one model folder format, used for checkpoints, exports and the store.

    config.json              Hugging Face config (model_type gpt2 / llama / qwen2 / mistral / bert)
    model.safetensors        weights under transformers' names
    tokenizer.json           Hugging Face tokenizers file
    tokenizer_config.json    special tokens and chat template
    generation_config.json   default generation settings (optional; decoders only)
    README.md                model card

A sentence encoder (bert) also gets sentence-transformers' files (``modules.json``, ``1_Pooling/config.json``,
``sentence_bert_config.json``), so ``SentenceTransformer(folder)`` loads it with the same pooling.

Writes are atomic: everything goes to a temporary sibling folder, is fsynced, then renamed into place, so a
crash mid-save leaves the previous folder intact.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from lmforge.config import Config
from lmforge.errors import ModelFormatError, UnsupportedError
from lmforge.formats.atomic import atomic_write_folder
from lmforge.formats.hf import StateDict, from_hf_state, read_hf_weights, to_hf_state
from lmforge.formats.peft import has_adapter, read_adapter_state, write_adapter_files
from lmforge.limits import MAX_CONFIG_BYTES, read_json_object
from lmforge.lora import join_lora_state, split_lora_state
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer

# The folder's files, named once. A training checkpoint is a model folder plus the three trainer-state files.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation_config.json"
CARD_FILE = "README.md"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng_state.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"  # a freeze / LoRA checkpoint's weights: only the ones that train
TRAINER_FILES = (OPTIMIZER_FILE, RNG_FILE, TRAINER_STATE_FILE, TRAINABLE_FILE)
# A decoder's blocks, or an encoder–decoder's encoder blocks (n_layer counts those); more digits than any
# layer count is not a layer.
_BLOCK_KEY = re.compile(r"^(?:encoder\.)?blocks\.(\d{1,9})\.")


def write_model_files(
    folder: Path,
    config: Config,
    state: StateDict,
    tokenizer: Tokenizer,
    generation_config: dict[str, Any] | None = None,
    card: str | None = None,
) -> None:
    """Write the model-folder files into ``folder`` (not atomic by itself: see ``save_model_folder``).

    A LoRA-wrapped model's state writes its base weights as usual and its adapters in PEFT's files beside them.
    """
    base, adapters = split_lora_state(state)
    weights = {k: v.detach().cpu().contiguous() for k, v in to_hf_state(base, config).items()}
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if adapters:
        write_adapter_files(folder, config, adapters)
    config.save(folder / CONFIG_FILE)
    tokenizer.save(folder)
    if config.is_encoder:
        _write_sentence_transformers_files(folder, config)
    else:
        gen = {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            **(generation_config or {}),
        }
        _write_json(folder / GENERATION_FILE, gen)
    (folder / CARD_FILE).write_text(card or model_card(config, tokenizer), encoding="utf-8")


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


_ST_MODULES = "sentence_transformers.models."


def _write_sentence_transformers_files(folder: Path, config: Config) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": _ST_MODULES + "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_MODULES + "Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": _ST_MODULES + "Normalize"},
    ]
    _write_json(folder / "modules.json", modules)
    (folder / "1_Pooling").mkdir()
    pooling = {
        "word_embedding_dimension": config.n_embd,
        "pooling_mode_cls_token": config.pooling == "cls",
        "pooling_mode_mean_tokens": config.pooling == "mean",
    }
    _write_json(folder / "1_Pooling" / "config.json", pooling)
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": config.block_size})


def _sentence_transformers_pooling(folder: Path) -> str | None:
    """The pooling a sentence-transformers folder declares ("mean" or "cls"), or None if it declares none."""
    path = folder / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    settings = read_json_object(path, MAX_CONFIG_BYTES, "pooling config")
    # Newer files add non-mode switches such as "include_prompt": only the pooling_mode_* ones choose.
    modes = {k for k, v in settings.items() if k.startswith("pooling_mode_") and v is True}
    if modes == {"pooling_mode_mean_tokens"}:
        return "mean"
    if modes == {"pooling_mode_cls_token"}:
        return "cls"
    raise UnsupportedError(
        f"{path}: pooling {sorted(modes)} is not supported", hint="lmforge embeds with mean or [CLS] pooling"
    )


def save_model_folder(
    target: str | Path,
    config: Config,
    state: StateDict,
    tokenizer: Tokenizer,
    generation_config: dict[str, Any] | None = None,
    card: str | None = None,
) -> Path:
    """Write a model folder atomically: a failed save leaves any previous folder at ``target`` intact."""
    return atomic_write_folder(
        target, lambda tmp: write_model_files(tmp, config, state, tokenizer, generation_config, card)
    )


def load_model_folder(folder: str | Path) -> tuple[Config, StateDict, Tokenizer, dict[str, Any]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFormatError(f"{folder}: no such model folder", hint="check the path")
    config = Config.load(folder / CONFIG_FILE)
    if config.is_encoder:
        config.pooling = _sentence_transformers_pooling(folder) or config.pooling
    state = from_hf_state(read_hf_weights(folder), config)
    # Before anything is built from the config: it must describe the tensors the folder holds.
    layers = {int(m.group(1)) for name in state if (m := _BLOCK_KEY.match(name))}
    embedding = state["wte.weight"].shape if "wte.weight" in state else None
    config.check_weights(folder / CONFIG_FILE, layers, embedding)
    tokenizer = Tokenizer.load(folder)
    gen_path = folder / GENERATION_FILE
    generation = (
        read_json_object(gen_path, MAX_CONFIG_BYTES, "generation config") if gen_path.is_file() else {}
    )
    return config, state, tokenizer, generation


def load_model_state(model: Transformer, folder: Path) -> StateDict:
    """The full state (base + adapters) of a folder written by ``write_model_files``, for ``model`` (which
    already has its adapters injected, if the folder has any)."""
    _, base, _, _ = load_model_folder(folder)
    if has_adapter(folder):
        return join_lora_state(model, base, read_adapter_state(folder, model.config))
    return base


def model_card(
    config: Config,
    tokenizer: Tokenizer,
    record: Mapping[str, Any] | None = None,
    packing: str | None = None,
) -> str:
    """The README.md of a model folder.

    ``record`` (from the model store) adds a ``description``, the ``lineage`` (one line per ancestor, nearest
    first), the training ``recipe``, the ``data`` fingerprint and ``metrics``. Without it, the training record
    in the config (``extra["lineage"]``) is shown. ``packing`` (``lmforge.quant.packing_summary`` of the model
    saved) adds a row saying which linear layers were packed how.
    """
    record = record or {}
    params = config.num_parameters()
    description = record.get("description")
    lines = [
        f"# {config.name}",
        "",
        *([description, ""] if description else []),
        f"A {'sentence encoder' if config.is_encoder else 'causal language model'} saved by "
        "[lmforge](https://pypi.org/project/lmforge/).",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {config.model_type} |",
        f"| parameters | {params:,} ({params / 1e6:.1f} M) |",
        f"| layers / heads / kv heads | {config.n_layer} / {config.n_head} / {config.n_kv_head} |",
        f"| hidden size | {config.n_embd} |",
        f"| context length | {config.block_size} |",
        f"| vocabulary | {tokenizer.vocab_size} |",
        f"| chat template | {'yes' if tokenizer.chat_template else 'no'} |",
        *([f"| packing | {packing} |"] if packing else []),
        "",
        *_usage(config),
    ]
    ancestors = record.get("lineage") or []
    training = record.get("recipe") or config.extra.get("lineage")
    data = record.get("data")
    if ancestors or training or data:
        lines += ["## Lineage", ""]
        lines += [f"{i}. {ancestor}" for i, ancestor in enumerate(ancestors, 1)] + ([""] if ancestors else [])
        if data:
            lines += [f"Data: sha256 `{data['sha256']}` ({len(data['files'])} files)", ""]
        if training:
            lines += ["```json", json.dumps(training, indent=2, ensure_ascii=False), "```", ""]
    metrics = _flat_scalars(record.get("metrics") or {})
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
            for key, value in metrics.items()
        ]
        lines.append("")
    return "\n".join(lines)


def _usage(config: Config) -> list[str]:
    if config.is_encoder:
        call = "print(llm.embed(['Hello', '你好']).shape)"
        loaders = "`sentence_transformers.SentenceTransformer` and `transformers.AutoModel` load it"
    else:
        call = "print(llm.generate_text('Hello', max_length=50))"
        loaders = "`transformers.AutoModelForCausalLM.from_pretrained` loads it"
    return [
        "## Use",
        "",
        "```python",
        "from lmforge import LLM",
        "llm = LLM.load('path/to/this/folder')",
        call,
        "```",
        "",
        f"The folder is Hugging Face compatible: {loaders}.",
        "",
    ]


def _flat_scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics as ``outer / inner`` keys; lists (confusion matrices...) stay in the manifest only."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flat_scalars(value, f"{prefix}{key} / "))
        elif not isinstance(value, (list, tuple)):
            flat[f"{prefix}{key}"] = value
    return flat
