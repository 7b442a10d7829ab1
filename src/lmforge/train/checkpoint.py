"""Training checkpoints: a model folder plus the trainer's state, safetensors + JSON, never pickle.

    run/checkpoints/step-000200/   config.json, model.safetensors, tokenizer.json, ... (a loadable model folder)
                                   optimizer.safetensors   AdamW moments, keyed by parameter name
                                   rng_state.safetensors   the RNG states
                                   trainer_state.json      step, best val loss, optimizer settings, the run's
                                                           settings (what ``--resume`` restores)
    run/checkpoints/best/          the weights and trainer_state.json at the best validation loss so far (a
                                   model to pick, not a place to resume: no optimizer or RNG state)

A run that freezes part of the model (freeze, LoRA) checkpoints only what trains: ``trainable.safetensors``
instead of the model folder, and in trainer_state.json a ``base`` record naming the frozen model (as the run
loaded it: a store name, path or hub id) with a sha256 of its frozen tensors, so resuming on a base that has
changed since is an error rather than a silently different model. SmolLM2-135M training its last two blocks
(10 steps, `--method freeze`): a step checkpoint of 82 MB (28 MB of weights, 57 MB of AdamW moments), ``best``
28 MB, the run folder 625 MB with its 529 MB final model (before: 1.7 GB, two 571 MB full checkpoints).

Each checkpoint folder appears by one atomic rename of a finished temporary folder, so a folder named
``step-N`` is always complete: the newest one is where ``--resume`` continues, and a crash during a write
(even SIGKILL) leaves only a ``.step-N.tmp-*`` folder that resume removes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.formats.folder import (
    OPTIMIZER_FILE,
    RNG_FILE,
    TRAINABLE_FILE,
    TRAINER_STATE_FILE,
    atomic_write_folder,
    load_model_state,
    write_model_files,
)
from lmforge.model import Transformer

STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def flatten_optimizer_state(optimizer_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """A full optimizer state dict (keyed by parameter name) -> flat tensors ``name::key`` + param groups."""
    tensors = {
        f"{name}::{key}": torch.as_tensor(value).detach().cpu().contiguous()
        for name, state in optimizer_state["state"].items()
        for key, value in state.items()
    }
    return tensors, optimizer_state["param_groups"]


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in tensors.items():
        name, key = flat.rsplit("::", 1)
        state.setdefault(name, {})[key] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    folder: Path,
    *,
    model_state: dict[str, torch.Tensor],
    config: Any,
    tokenizer: Any,
    optimizer_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
) -> Path:
    """Write a checkpoint folder atomically. With a ``base`` in ``trainer_state``, ``model_state`` holds only
    the trained tensors; without ``optimizer_state`` (the ``best`` folder) no optimizer or RNG state is kept."""
    partial = trainer_state.get("base") is not None
    tensors, groups = flatten_optimizer_state(optimizer_state) if optimizer_state else ({}, None)

    def write(tmp: Path) -> None:
        if partial:
            weights = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
            save_file(weights, str(tmp / TRAINABLE_FILE))
        else:
            write_model_files(tmp, config, model_state, tokenizer)
        state = dict(trainer_state)
        if optimizer_state:
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            save_file(rng_state(), str(tmp / RNG_FILE))
            state["optimizer_param_groups"] = groups
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2, default=_json_default) + "\n")

    return atomic_write_folder(folder, write)


def frozen_digest(state: Mapping[str, torch.Tensor], trainable: set[str]) -> str:
    """sha256 of the tensors that do not train (names, dtypes, shapes and bytes): the identity of a partial
    checkpoint's base. Hashing the tensors, not a file, covers every source a base loads from (a store entry,
    a folder, a GGUF, the hub) and any conversion on the way; it reads each frozen byte once (~1 s per GB)."""
    digest = hashlib.sha256()
    for name in sorted(set(state) - trainable):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_base(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None, folder: Path) -> None:
    """A partial checkpoint (``saved``: its base record) continues only on the frozen weights it was trained on
    top of (``current``: this run's base record, None when every weight trains). A full checkpoint, ``saved``
    None, holds every weight: any run can continue from it, as from older lmforge versions."""
    if saved is None:
        return
    if current is None:
        raise LmforgeError(
            f"{folder} holds only the trained weights of a freeze or LoRA run, but this run trains every weight",
            hint="resume with the run's own method (--method), or start a new run in another --out folder",
        )
    if saved.get("sha256") != current["sha256"]:
        raise LmforgeError(
            f"the base model {current['model']} is not the one {folder} was trained on "
            f"(its frozen weights changed: sha256 {str(saved.get('sha256'))[:12]}… then, "
            f"{current['sha256'][:12]}… now)",
            hint=f"resume on the base the run started from ({saved.get('model')}), or start a new run "
            "in another --out folder",
        )


def read_weights(model: Transformer, folder: Path, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A step checkpoint's weights for ``model``: the whole state, or only the trained tensors when the
    checkpoint's ``state`` (its trainer_state.json) names a frozen base."""
    try:
        if state.get("base") is not None:
            return load_file(str(folder / TRAINABLE_FILE))
        return load_model_state(model, folder)
    except LmforgeError as e:
        raise damaged(folder, e.message) from None
    except Exception as e:  # a missing or damaged safetensors file
        raise damaged(folder, f"{type(e).__name__}: {e}") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def remove_partial(run_dir: Path) -> None:
    """Drop temporary folders left by a save that was killed midway, and put back a folder that a killed
    replace had moved aside (``best``): between its two renames, ``.best.old-*`` is the only copy."""
    folder = run_dir / "checkpoints"
    if folder.is_dir():
        for child in sorted(folder.iterdir()):
            name, old, _ = child.name[1:].partition(".old-")
            if child.name.startswith(".") and old and not (folder / name).exists():
                child.rename(folder / name)
            elif child.name.startswith(".") and (".tmp-" in child.name or old):
                shutil.rmtree(child, ignore_errors=True)


def prune(run_dir: Path, keep_last: int) -> None:
    for _, path in checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def recorded_settings(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The recipe settings recorded in the newest readable checkpoint of ``run_dir`` and that checkpoint, or
    None (no checkpoint, or only ones from before settings were recorded). A damaged newest checkpoint is
    passed over here as ``--resume`` passes over it."""
    for _, folder in reversed(checkpoints(run_dir)):
        try:
            state = json.loads((folder / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        settings = state.get("settings") if isinstance(state, dict) else None
        if isinstance(settings, dict):
            return settings, folder
    return None


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(trainer_state, optimizer state dict, rng state) of a checkpoint folder, with a clear error if damaged."""
    try:
        state = json.loads((folder / TRAINER_STATE_FILE).read_text())
        optim = unflatten_optimizer_state(
            load_file(str(folder / OPTIMIZER_FILE)), state["optimizer_param_groups"]
        )
        rng = load_file(str(folder / RNG_FILE))
    except Exception as e:  # missing files, bad JSON, damaged safetensors: all mean the same to the user
        raise damaged(folder, f"{type(e).__name__}: {e}") from None
    return state, optim, rng


def damaged(folder: Path, why: str) -> LmforgeError:
    """The error for a checkpoint folder that cannot be read back."""
    return LmforgeError(
        f"checkpoint {folder} is damaged ({why})".replace("\n", " "),
        hint=f"delete {folder} to resume from the checkpoint before it",
    )
