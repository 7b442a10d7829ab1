"""LoRA: low-rank adapters that wrap the model's existing ``nn.Linear`` layers (no copy of the model code).

    y = base(x) + (alpha / r) * B(A(dropout(x)))      A: (r, in) random,  B: (out, r) zeros

Adapters save in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors`` under transformers'
module names), so ``peft.PeftModel.from_pretrained`` loads them onto the transformers model, and ``merge_lora``
folds them into the weights for plain inference.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.formats.folder import atomic_write_folder, load_model_folder, write_model_files
from lmforge.formats.hf import hf_module_name, lmforge_module_name
from lmforge.model import Transformer

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    rank: int = field(default=8, metadata={"help": "rank r of the adapters"})
    alpha: float = field(default=16.0, metadata={"help": "the update is scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input"})
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": f"linear layers to adapt, comma-separated, among {','.join(LINEAR_NAMES)}"},
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.targets) - set(LINEAR_NAMES))
        if unknown or not self.targets:
            raise LmforgeError(
                f"LoRA targets {unknown or self.targets} are not linear layers of the model",
                hint=f"choose among {', '.join(LINEAR_NAMES)} (or 'all-linear')",
            )
        if self.rank < 1:
            raise LmforgeError(f"LoRA rank {self.rank} must be >= 1", hint="typical ranks are 4 to 64")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        # PEFT's initialisation: A like a default nn.Linear, B zero, so training starts from the base model.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(base.weight.dtype)
        self.lora_B.to(base.weight.dtype)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """The base layer with the adapter folded into its weight."""
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
            self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


def _targets(model: Transformer, targets: Sequence[str]) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, full name) of every linear layer to wrap."""
    found = []
    for name, module in model.named_modules():
        for attr in targets:
            child = getattr(module, attr, None)
            if isinstance(child, nn.Linear) and name.startswith("blocks."):
                found.append((module, attr, f"{name}.{attr}"))
    return found


def inject_lora(model: Transformer, config: LoRAConfig, trainable: Sequence[str] = ()) -> list[str]:
    """Wrap the target layers with adapters; freeze everything except the adapters and ``trainable`` prefixes.

    Returns the wrapped layers' names.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for parent, attr, name in _targets(model, config.targets):
        setattr(parent, attr, LoRALinear(getattr(parent, attr), config.rank, config.alpha, config.dropout))
        names.append(name)
    for name, p in model.named_parameters():
        if ".lora_" in name or any(name.startswith(prefix) for prefix in trainable):
            p.requires_grad_(True)
    model.config.extra["lora"] = asdict(config)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight and unwrap it: a plain model, same outputs, no extra cost."""
    for name, layer in lora_layers(model).items():
        parent_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, layer.merged())
    model.config.extra.pop("lora", None)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _peft_config(config: LoRAConfig, base_model: str) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def split_lora_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A wrapped model's state -> (plain base-model state, adapter tensors), both under our names."""
    base, adapters = {}, {}
    for name, tensor in state.items():
        if ".lora_" in name:
            adapters[name] = tensor
        else:
            base[name.replace(".base.", ".")] = tensor
    return base, adapters


def join_lora_state(
    model: Transformer, base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The inverse of ``split_lora_state`` for a model that already has its adapters injected."""
    state = dict(base)
    for layer in lora_layers(model):
        for kind in ("weight", "bias"):
            if f"{layer}.{kind}" in state:
                state[f"{layer}.base.{kind}"] = state.pop(f"{layer}.{kind}")
    return {**state, **adapters}


def write_adapter_files(
    folder: Path, model_config: Any, adapters: dict[str, torch.Tensor], base_model: str = ""
) -> None:
    """PEFT's two files (``adapter_config.json``, ``adapter_model.safetensors``) for our adapter tensors."""
    config = LoRAConfig(**model_config.extra["lora"])
    tensors = {}
    for name, tensor in adapters.items():
        layer, part = name.rsplit(".lora_", 1)  # part: "A.weight" / "B.weight"
        key = f"base_model.model.{hf_module_name(layer, model_config)}.lora_{part}"
        tensors[key] = tensor.detach().float().cpu().contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    text = json.dumps(_peft_config(config, base_model), indent=2) + "\n"
    (folder / ADAPTER_CONFIG).write_text(text, encoding="utf-8")


def read_adapter_state(folder: Path, model_config: Any) -> dict[str, torch.Tensor]:
    """Adapter tensors of a PEFT-layout folder, under our module names."""
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as e:  # missing or damaged file
        raise LmforgeError(f"{folder}: unreadable LoRA adapter ({e})", hint="re-save the adapter") from None
    out = {}
    for key, value in tensors.items():
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
        peft_config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(
            f"{folder}: not a LoRA adapter folder ({e})", hint="point to adapter_config.json's folder"
        ) from None
    if peft_config.get("peft_type") != "LORA":
        raise LmforgeError(
            f"{folder}: adapter type {peft_config.get('peft_type')!r}", hint="only LoRA adapters load"
        )
    targets = peft_config["target_modules"]
    targets = list(LINEAR_NAMES) if targets == "all-linear" else list(targets)
    config = LoRAConfig(rank=peft_config["r"], alpha=peft_config["lora_alpha"], dropout=0.0, targets=targets)
    inject_lora(model, config)
    state = read_adapter_state(folder, model.config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(".lora_" in m for m in missing):
        raise LmforgeError(
            f"{folder}: the adapter does not fit this model", hint="load it onto its base model"
        )
    return model


def write_model_files_with_adapters(
    folder: Path,
    config: Any,
    state: dict[str, torch.Tensor],
    tokenizer: Any,
    generation_config: dict[str, Any] | None = None,
    card: str | None = None,
) -> None:
    """A model folder for a possibly LoRA-wrapped model: base weights as usual, adapters in PEFT's files."""
    base, adapters = split_lora_state(state)
    write_model_files(folder, config, base, tokenizer, generation_config, card)
    if adapters:
        write_adapter_files(folder, config, adapters)


def load_state_with_adapters(model: Transformer, folder: Path) -> dict[str, torch.Tensor]:
    """The full state (base + adapters) of a folder written by ``write_model_files_with_adapters``."""
    _, base, _, _ = load_model_folder(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        return join_lora_state(model, base, read_adapter_state(folder, model.config))
    return base
