"""PEFT's adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` under transformers' module
names, so ``peft.PeftModel.from_pretrained`` loads our adapters onto the transformers model and adapters trained
with PEFT attach to ours (``lmforge.lora`` holds the adapter layers themselves).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge.errors import LmforgeError
from lmforge.formats.atomic import atomic_write_folder
from lmforge.formats.hf import hf_module_name, lmforge_module_name, read_safetensors
from lmforge.limits import MAX_CONFIG_BYTES, MAX_HIDDEN, read_json_object
from lmforge.lora import LINEAR_NAMES, LoRAConfig, inject_lora, split_lora_state
from lmforge.model import Transformer

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def has_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def _task_type(model_config: Any) -> str:
    """The PEFT task whose model class wraps transformers' class for this model: an encoder–decoder's adapters
    go on ``*ForConditionalGeneration`` (``PeftModelForSeq2SeqLM``), an encoder's on its classifier or its bare
    model; a decoder's on ``*ForCausalLM``, also when it classifies (its head is ours, saved beside)."""
    if model_config.is_seq2seq:
        return "SEQ_2_SEQ_LM"
    if model_config.is_encoder:
        return "SEQ_CLS" if model_config.labels else "FEATURE_EXTRACTION"
    return "CAUSAL_LM"


def _peft_config(config: LoRAConfig, base_model: str, task_type: str, targets: list[str]) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def write_adapter_files(
    folder: Path, model_config: Any, adapters: dict[str, torch.Tensor], base_model: str = ""
) -> None:
    """PEFT's two files (``adapter_config.json``, ``adapter_model.safetensors``) for our adapter tensors."""
    config = LoRAConfig(**model_config.extra["lora"])
    tensors, targets = {}, set()
    for name, tensor in adapters.items():
        layer, part = name.rsplit(".lora_", 1)  # part: "A.weight" / "B.weight"
        hf_layer = hf_module_name(layer, model_config)
        tensors[f"base_model.model.{hf_layer}.lora_{part}"] = tensor.detach().float().cpu().contiguous()
        targets.add(hf_layer.rsplit(".", 1)[-1])  # PEFT matches transformers' names (T5: q, v; not q_proj)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    peft_config = _peft_config(config, base_model, _task_type(model_config), sorted(targets))
    text = json.dumps(peft_config, indent=2) + "\n"
    (folder / ADAPTER_CONFIG).write_text(text, encoding="utf-8")


def read_adapter_state(folder: Path, model_config: Any) -> dict[str, torch.Tensor]:
    """Adapter tensors of a PEFT-layout folder, under our module names."""
    tensors = read_safetensors(folder / ADAPTER_WEIGHTS)  # header checked before any tensor is read
    out = {}
    for key, value in tensors.items():
        if ".lora_" not in key:
            raise LmforgeError(
                f"{folder / ADAPTER_WEIGHTS}: tensor {key!r} is not a LoRA weight", hint="re-save the adapter"
            )
        hf_name, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        part = part.replace(".default", "")  # PEFT may store adapter names: lora_A.default.weight
        out[f"{lmforge_module_name(hf_name, model_config)}.lora_{part}"] = value
    return out


def save_adapter(model: Transformer, folder: str | Path, base_model: str = "") -> Path:
    """Write the adapters in PEFT's layout (transformers' module names, ``base_model.model.`` prefix)."""
    _, adapters = split_lora_state(model.state_dict())
    if not adapters:
        raise LmforgeError(
            "the model has no LoRA adapters to save", hint="fine-tune with --method lora first"
        )
    return atomic_write_folder(
        folder, lambda tmp: write_adapter_files(tmp, model.config, adapters, base_model)
    )


def load_adapter(model: Transformer, folder: str | Path) -> Transformer:
    """Attach a PEFT-layout LoRA adapter (ours or one trained with PEFT) to ``model``."""
    folder = Path(folder)
    try:
        peft_config = read_json_object(folder / ADAPTER_CONFIG, MAX_CONFIG_BYTES, "LoRA adapter config")
    except OSError as e:
        raise LmforgeError(
            f"{folder}: not a LoRA adapter folder ({e})", hint="point to adapter_config.json's folder"
        ) from None
    if peft_config.get("peft_type") != "LORA":
        raise LmforgeError(
            f"{folder}: adapter type {peft_config.get('peft_type')!r}", hint="only LoRA adapters load"
        )
    targets, rank, alpha = (peft_config.get(k) for k in ("target_modules", "r", "lora_alpha"))
    targets = list(LINEAR_NAMES) if targets == "all-linear" else targets
    # The rank sizes the matrices inject_lora allocates: bounded like a hidden size, before anything is built.
    if (
        not isinstance(targets, list)
        or not all(isinstance(t, str) for t in targets)
        or type(rank) is not int
        or not 1 <= rank <= MAX_HIDDEN
        or isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
    ):
        raise LmforgeError(
            f"{folder / ADAPTER_CONFIG}: needs target_modules (names), r (1 to {MAX_HIDDEN}) and a numeric "
            f"lora_alpha; it has {targets!r}, {rank!r}, {alpha!r}",
            hint="re-save the adapter",
        )
    state = read_adapter_state(folder, model.config)
    # The layers to wrap, under our names, from the tensors themselves: target_modules holds transformers'
    # names (T5's q and v, BERT's query and value), which are not ours.
    layers = sorted({name.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for name in state})
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=0.0, targets=layers)
    inject_lora(model, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(".lora_" in m for m in missing):
        raise LmforgeError(
            f"{folder}: the adapter does not fit this model", hint="load it onto its base model"
        )
    return model
