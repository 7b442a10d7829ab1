"""LoRA: low-rank adapters that wrap the model's existing ``nn.Linear`` layers (no copy of the model code).

    y = base(x) + (alpha / r) * B(A(dropout(x)))      A: (r, in) random,  B: (out, r) zeros

The base may also be a packed int4/int8 ``PackedLinear`` (``lmforge.quant``): QLoRA, a frozen quantized base
with float32 adapters. Gradients flow through the packed base to the adapters of earlier layers.

Adapters save in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors`` under transformers'
module names), so ``peft.PeftModel.from_pretrained`` loads them onto the transformers model, and ``merge_lora``
folds them into the weights for plain inference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.quant import PackedLinear

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    rank: int = field(default=8, metadata={"help": "rank r of the adapters"})
    alpha: float = field(default=16.0, metadata={"help": "the update is scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input"})
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={
            "help": f"linear layers to adapt, comma-separated, among {','.join(LINEAR_NAMES)}; all: every one"
        },
    )

    def __post_init__(self) -> None:
        if list(self.targets) in (["all"], ["all-linear"]):  # PEFT's name for every linear layer
            self.targets = list(LINEAR_NAMES)
        unknown = sorted(set(self.targets) - set(LINEAR_NAMES))
        if unknown or not self.targets:
            raise LmforgeError(
                f"LoRA targets {unknown or self.targets} are not linear layers of the model",
                hint=f"choose among {', '.join(LINEAR_NAMES)} (or 'all-linear')",
            )
        if self.rank < 1:
            raise LmforgeError(f"LoRA rank {self.rank} must be >= 1", hint="typical ranks are 4 to 64")


def _device_dtype(base: nn.Linear | PackedLinear) -> tuple[torch.device, torch.dtype]:
    """Where a base layer lives and the float type its adapters take (float32 beside packed integer weights)."""
    if isinstance(base, PackedLinear):
        return next(base.buffers()).device, torch.float32
    return base.weight.device, base.weight.dtype


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear | PackedLinear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        device, dtype = _device_dtype(base)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device)
        # PEFT's initialisation: A like a default nn.Linear, B zero, so training starts from the base model.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(dtype)
        self.lora_B.to(dtype)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        # The adapters' own type: float32 beside a packed base even when activations are bf16 (a no-op otherwise).
        update = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype))) * self.scaling
        return y + update.to(y.dtype)

    def merged(self) -> nn.Linear:
        """The base layer with the adapter folded into its weight.

        A packed base cannot take the update into its integer codes (requantizing would lose most of it), so
        it becomes a float32 ``nn.Linear`` holding ``base.dequantize() + delta``: the merged model is exact,
        and that layer is float again (pack the model anew to quantize it).
        """
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
            if isinstance(self.base, PackedLinear):
                base = self.base
                device = next(base.buffers()).device
                linear = nn.Linear(
                    base.in_features, base.out_features, bias=base.bias is not None, device=device
                )
                linear.weight.copy_(base.dequantize().to(device) + delta)
                if base.bias is not None:
                    linear.bias.copy_(base.bias)
                return linear
            self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


def _targets(model: Transformer, targets: Sequence[str]) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, full name) of every linear layer (float or packed) to wrap."""
    found = []
    for name, module in model.named_modules():
        for attr in targets:
            child = getattr(module, attr, None)
            # a decoder's blocks; an encoder–decoder's encoder and decoder blocks (cross-attention included)
            in_block = name.startswith(("blocks.", "encoder.blocks.", "decoder.blocks."))
            if isinstance(child, nn.Linear | PackedLinear) and in_block:
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
