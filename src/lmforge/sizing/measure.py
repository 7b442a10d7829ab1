"""Measured on this machine: tokens/s of decoding, forward passes and training steps, and the runtime's own
memory (``runtime_baseline``: what a fresh Python process holds once torch and lmforge have run, which no
constant could know: torch imports its tracing stack on first use, ~75 MiB).

``python -m lmforge.sizing.measure`` is the fresh process that ``runtime_baseline`` starts; it prints the
resident bytes as one JSON line.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn as nn

from lmforge.config import Config
from lmforge.generate import SamplingParams, generate_tokens
from lmforge.loading import LoadedModel
from lmforge.lora import LoRAConfig
from lmforge.model import Transformer
from lmforge.tokenizer import train_tokenizer
from lmforge.train.loop import TrainConfig, Trainer, make_optimizer
from lmforge.train.methods import choose_trainable

MEASURE_TOKENS = 256  # tokens per training step when measuring speed: enough to be matmul-bound, quick


# --------------------------------------------------------------- the runtime
@cache
def runtime_baseline() -> dict[str, int]:
    """Resident bytes of a Python process with torch and lmforge imported and used once: after a tiny model
    decoded ("infer"), and after it also ran one real training step ("train"). Measured once per session in a
    fresh interpreter (``measure_runtime``)."""
    # runpy warns that this module was imported (by the lmforge.sizing package) before it runs as __main__:
    # expected here, and harmless.
    command = [sys.executable, "-W", "ignore::RuntimeWarning:runpy", "-m", "lmforge.sizing.measure"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:  # pragma: no cover - a broken installation
        raise RuntimeError(f"measuring the runtime failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class _OneBatch:
    """The smallest training ``Task``: one batch of 16 tokens."""

    def train_batch(self, index: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        ids = torch.arange(1, 17).unsqueeze(0)
        return {"input_ids": ids, "targets": ids}

    def val_batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        return []

    def loss(self, model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["input_ids"], targets=batch["targets"])[1]

    def describe(self) -> dict[str, Any]:
        return {}


def measure_runtime() -> dict[str, int]:
    """Run in a fresh interpreter: decode with a tiny model, then train it one step; the RSS after each."""
    config = Config(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)
    with torch.device("meta"):
        Transformer(
            config
        )  # LoadedModel.load builds on the meta device first; torch imports its tracing stack
    model = Transformer(config).eval()
    list(generate_tokens(model, [[1, 2, 3]], SamplingParams(max_new_tokens=4)))
    infer = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory() as tmp:  # a real run: metrics, TensorBoard, loss plot, checkpoint
        (Path(tmp) / "text.txt").write_text("a tiny corpus " * 20)
        tokenizer = train_tokenizer([str(Path(tmp) / "text.txt")], kind="char", show_progress=False)
        settings = TrainConfig(out_dir=tmp + "/run", max_steps=1, eval_every=0, progress=False, device="cpu")
        Trainer(model.train(), tokenizer, _OneBatch(), settings).fit()
    return {"infer": infer, "train": psutil.Process().memory_info().rss}


# ------------------------------------------------------------------- speed
def measure_speed(
    model: str | Path | None,
    *,
    dtype: torch.dtype,
    mode: str,
    task: str,
    batch: int,
    context: int,
    lora_rank: int = 8,
    lora_targets: Sequence[str] | None = None,
    train_last_blocks: int = 2,
    num_labels: int = 2,
) -> tuple[float, str]:
    """(tokens/s, how it was measured) of the workload ``estimate`` sized, on the model loaded for it."""
    llm = LoadedModel.load(model, dtype=dtype, device="cpu")
    try:
        if mode == "infer" and task == "generate":
            return decode_speed(llm, batch)
        if mode == "infer":
            return forward_speed(llm, batch, context=context)
        return train_speed(
            llm,
            mode,
            task=task,
            batch=batch,
            context=context,
            lora_rank=lora_rank,
            lora_targets=lora_targets,
            train_last_blocks=train_last_blocks,
            num_labels=num_labels,
        )
    finally:
        del llm
        gc.collect()  # the weights go now, not at the next collection


def _token_ids(llm: LoadedModel, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    # A private generator: measuring must not move the global RNG.
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, llm.config.vocab_size, shape, generator=generator)


def decode_speed(
    llm: LoadedModel, batch: int = 1, *, steps: int = 8, prompt_tokens: int = 16
) -> tuple[float, str]:
    """Tokens/s of greedy decoding with the KV cache (the prefill is not timed)."""
    prompts = _token_ids(llm, (batch, prompt_tokens)).tolist()
    decoding = generate_tokens(llm.model, prompts, SamplingParams(max_new_tokens=steps + 1))
    next(decoding)  # the prefill and the first token
    start = time.perf_counter()
    made = sum(1 for _ in decoding)
    seconds = time.perf_counter() - start
    return batch * made / seconds, f"{made} decode steps, batch {batch}, after a {prompt_tokens}-token prompt"


@torch.inference_mode()
def forward_speed(llm: LoadedModel, batch: int, *, context: int) -> tuple[float, str]:
    """Tokens/s of a forward pass over whole sequences (scoring, classification, embedding)."""
    length = min(context, MEASURE_TOKENS)
    rows = max(1, min(batch, MEASURE_TOKENS // length))
    ids = _token_ids(llm, (rows, length))
    # A sentence encoder's whole work is its hidden states; a decoder's also runs the vocabulary head.
    forward = llm.model.hidden_states if llm.config.is_encoder else llm.model
    forward(ids[:, :8])  # warm-up
    start = time.perf_counter()
    forward(ids)
    return rows * length / (time.perf_counter() - start), f"one forward pass of {rows} x {length} tokens"


def train_speed(
    llm: LoadedModel,
    mode: str,
    *,
    task: str,
    batch: int,
    context: int,
    lora_rank: int = 8,
    lora_targets: Sequence[str] | None = None,
    train_last_blocks: int = 2,
    num_labels: int = 2,
) -> tuple[float, str]:
    """Tokens/s of fine-tuning steps (forward, backward, AdamW) with the method's trainable parameters.

    Steps are capped at MEASURE_TOKENS tokens: throughput per token is what matmuls set, and it stays quick.
    """
    model = llm.model.train()
    if task == "classify":
        model.config.labels = [str(i) for i in range(num_labels)]
        model.score = nn.Linear(model.config.n_embd, num_labels, bias=False)
    targets = list(lora_targets) if lora_targets else LoRAConfig().targets
    choose_trainable(model, mode, train_last_blocks, LoRAConfig(rank=lora_rank, targets=targets))
    optimizer = make_optimizer(model, TrainConfig(lr=1e-5), torch.device("cpu"))
    length = min(context, MEASURE_TOKENS)
    rows = max(1, min(batch, MEASURE_TOKENS // length))
    ids = _token_ids(llm, (rows, length))
    labels = torch.zeros(rows, dtype=torch.long)

    def step() -> None:
        if task == "classify":
            loss = nn.functional.cross_entropy(model.classify(ids), labels)
        else:
            loss = model(ids, targets=ids)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first step allocates AdamW's moments
    start = time.perf_counter()
    step()
    step()
    seconds = time.perf_counter() - start
    return 2 * rows * length / seconds, f"2 training steps of {rows} x {length} tokens"


if __name__ == "__main__":
    print(json.dumps(measure_runtime()))
