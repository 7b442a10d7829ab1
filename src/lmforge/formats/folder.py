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

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from lmforge.config import Config
from lmforge.errors import LmforgeError, ModelFormatError, UnsupportedError
from lmforge.formats.hf import StateDict, from_hf_state, read_hf_weights, to_hf_state
from lmforge.tokenizer import Tokenizer


def atomic_write_folder(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_folder)``, then swap the finished folder into ``target`` in one rename.

    If ``write`` fails the target is untouched and the temporary folder removed.
    """
    target = Path(target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmforgeError(
            f"cannot create {parent}: {e.strerror}", hint="choose a writable location"
        ) from None
    tmp = parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        write(tmp)
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        if target.exists():
            # A directory cannot be renamed over a non-empty one: move the old aside, then drop it.
            old = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
        fsync_path(parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LmforgeError(
            f"could not save to {target}: {e.strerror or e}",
            hint="check free disk space and write permission",
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def fsync_path(path: Path) -> None:
    # Directories need fsync too (on Linux) for the rename to survive a power cut.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_model_files(
    folder: Path,
    config: Config,
    state: StateDict,
    tokenizer: Tokenizer,
    generation_config: dict[str, Any] | None = None,
    card: str | None = None,
) -> None:
    """Write the model-folder files into ``folder`` (not atomic by itself: see ``save_model_folder``)."""
    weights = {k: v.detach().cpu().contiguous() for k, v in to_hf_state(state, config).items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save(folder / "config.json")
    tokenizer.save(folder)
    if config.is_encoder:
        _write_sentence_transformers_files(folder, config)
    else:
        gen = {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            **(generation_config or {}),
        }
        _write_json(folder / "generation_config.json", gen)
    (folder / "README.md").write_text(card or model_card(config, tokenizer), encoding="utf-8")


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
    try:
        settings = json.loads(path.read_text(encoding="utf-8")).items()
        # Newer files add non-mode switches such as "include_prompt": only the pooling_mode_* ones choose.
        modes = {k for k, v in settings if k.startswith("pooling_mode_") and v is True}
    except (json.JSONDecodeError, AttributeError) as e:
        raise ModelFormatError(f"{path}: not a valid pooling config ({e})", hint="fix the file") from None
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
    config = Config.load(folder / "config.json")
    if config.is_encoder:
        config.pooling = _sentence_transformers_pooling(folder) or config.pooling
    state = from_hf_state(read_hf_weights(folder), config)
    tokenizer = Tokenizer.load(folder)
    generation: dict[str, Any] = {}
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        try:
            generation = json.loads(gen_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ModelFormatError(
                f"{gen_path}: not valid JSON ({e})", hint="fix or delete the file"
            ) from None
    return config, state, tokenizer, generation


def model_card(config: Config, tokenizer: Tokenizer, record: Mapping[str, Any] | None = None) -> str:
    """The README.md of a model folder.

    ``record`` (from the model store) adds a ``description``, the ``lineage`` (one line per ancestor, nearest
    first), the training ``recipe``, the ``data`` fingerprint and ``metrics``. Without it, the training record
    in the config (``extra["lineage"]``) is shown.
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
