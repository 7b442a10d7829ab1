"""Which model fits: ``estimate`` sizes one model for a workload, ``select`` ranks candidates on the user's data.

    lmforge.estimate("default", context=2048)                        # SmolLM2 inference: breakdown + tokens/s
    lmforge.estimate("runs/base/model", quant="int4", context=512)    # packed on load, as LLM.load(quant=...)
    lmforge.estimate("runs/base/model", mode="lora", context=512, batch=8)
    lmforge.select("classify", "spam.jsonl", candidates=["default", "spam:v1"], max_ram="4GB")

``estimate`` lives here and joins the package's three parts:

    memory.py    the memory model: runtime, AdamW state, activations saved for backward (measured on the
                 real modules), backward peak, KV cache, and the peak they add up to
    weights.py   the weights as the loader holds them (packed layers at their packed size, by its own rules)
                 and what loading holds on top
    units.py     an estimate's parts and sizes (4GB, 512MiB)
    measure.py   what is measured on this machine: tokens/s, the runtime's own memory (and a compiled
                 step's), and the real peak of a generation (``measure_peak``, what estimates are checked on)
    ranking.py   ``select``: fit, speed and quality on a sample, ranked
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch

from lmforge import runtime
from lmforge.errors import LmforgeError, UnsupportedError
from lmforge.info import read_header
from lmforge.loading import resolve_dtype
from lmforge.sizing.measure import measure_peak, measure_speed, runtime_baseline
from lmforge.sizing.memory import MODES, WORKLOADS, Estimate, check_choice, model_shell, size_memory
from lmforge.sizing.ranking import Candidate, Selection, select
from lmforge.sizing.units import Component, format_size, parse_size
from lmforge.sizing.weights import load_quant

__all__ = [
    "Candidate",
    "Component",
    "Estimate",
    "Selection",
    "estimate",
    "format_size",
    "measure_peak",
    "parse_size",
    "runtime_baseline",
    "select",
]


def estimate(
    model: str | Path | None = None,
    *,
    context: int | None = None,
    batch: int = 1,
    mode: str = "infer",
    dtype: str = "auto",
    quant: str = "auto",
    compile: bool | None = None,
    measure: bool = True,
    task: str | None = None,
    lora_rank: int = 8,
    lora_targets: Sequence[str] | None = None,
    train_last_blocks: int = 2,
    activation_checkpointing: bool = False,
    num_labels: int = 2,
    freeze_last: int | None = None,
) -> Estimate:
    """Peak memory (RSS, CPU) of running or fine-tuning ``model``, part by part, and tokens/s measured here.

    ``context`` is the tokens per sequence (default: the model's context, at most 2048 for inference and 512,
    fine-tuning's default, for training), ``batch`` the sequences at once. ``mode``: infer | full | freeze |
    lora; ``task`` the workload (see ``WORKLOADS``; default embed for a sentence encoder, else generate).
    ``quant`` and ``compile`` are ``LLM.load``'s: ``auto`` holds a GGUF's Q4_0/Q4_1 layers packed as int4 and
    Q8_0 as int8 (the file's types say which), ``none`` float weights, ``int8`` / ``int4`` any model packed on
    load; a compiled decode step adds its own memory to generation. A GGUF file type (``q8_0``, ``q4_0``...),
    the old meaning of ``quant``, still works with a DeprecationWarning: it means the kind such a file loads as.
    For generation ``context`` is prompt + new tokens: the KV cache is sized to it (in steps of 256 tokens),
    as ``generate`` sizes it to the request. ``measure`` runs a few decode or training steps for tokens/s.
    ``freeze_last`` is the old name of ``train_last_blocks``.
    """
    compile = runtime.compile_by_default() if compile is None else compile  # as LLM.load decides
    if freeze_last is not None:
        warnings.warn(
            "freeze_last is deprecated, use train_last_blocks (it trains the last N blocks)",
            DeprecationWarning,
            stacklevel=2,
        )
        train_last_blocks = freeze_last
    check_choice("mode", mode, allowed=MODES)
    training = mode != "infer"
    if task is not None:
        check_choice(
            "task", task, allowed=WORKLOADS["train" if training else "infer"], context=f"for mode {mode}"
        )
    for name, value in (
        ("batch", batch),
        ("context", 1 if context is None else context),
        ("lora_rank", lora_rank),
    ):
        if not isinstance(value, int) or value < 1:
            raise LmforgeError(f"{name}={value!r} must be a positive integer", hint=f"e.g. {name}=1")
    if training and dtype not in ("auto", "float32", "fp32"):
        raise UnsupportedError(
            f"training estimates are for float32, not {dtype}",
            hint="fine-tuning loads fp32 weights: drop --dtype",
        )
    torch_dtype = resolve_dtype("float32" if training else dtype, torch.device("cpu"))
    quant = load_quant(quant, dtype=dtype, training=training)
    header = read_header(model)
    if header.config.is_seq2seq:
        raise UnsupportedError(
            f"{header.config.model_type} is an encoder–decoder: estimate and select size decoders and encoders",
            hint="size it by its parameters in `lmforge info` for now",
        )
    if header.config.is_encoder and quant in ("int8", "int4"):
        quant = "none"  # the loader packs decoders only
    task = task or ("embed" if header.config.is_encoder else "generate")
    block = header.config.block_size
    context = context or min(block, 512 if training else 2048)
    if context > block:
        raise LmforgeError(
            f"context {context} is longer than the model's {block} tokens",
            hint=f"use --context {block} or less",
        )
    shell = model_shell(
        header.config,
        mode,
        task=task,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        train_last_blocks=train_last_blocks,
        num_labels=num_labels,
    )
    result = size_memory(
        header,
        shell,
        mode=mode,
        task=task,
        context=context,
        batch=batch,
        dtype=torch_dtype,
        quant=quant,
        compile=compile and task == "generate",
        checkpointing=activation_checkpointing,
    )
    if not measure:
        return result
    available = psutil.virtual_memory().available
    if result.peak_bytes > available:
        result.speed_note = f"needs {format_size(result.peak_bytes)}, {format_size(available)} is free"
        return result
    result.tokens_per_s, result.speed_note = measure_speed(
        model,
        dtype=torch_dtype,
        mode=mode,
        task=task,
        batch=batch,
        context=context,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        train_last_blocks=train_last_blocks,
        num_labels=num_labels,
        quant=quant,
        compile=compile,
    )
    return result
