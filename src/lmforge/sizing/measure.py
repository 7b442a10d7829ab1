"""Measured on this machine: tokens/s of decoding, forward passes and training steps, the runtime's own
memory (``runtime_baseline``: what a fresh Python process holds once torch and lmforge have run, which no
constant could know: torch imports its tracing stack on first use, ~75 MiB; ``compile_overhead``: what
building and running a ``torch.compile``d decode step adds), and the real peak of a generation
(``measure_peak``), which the estimates are checked against.

``python -m lmforge.sizing.measure`` is the fresh process these start; it prints one JSON line:

    python -m lmforge.sizing.measure                  # {"infer": RSS after a tiny decode, "train": ... a step}
    python -m lmforge.sizing.measure --compiled       # {"eager": ..., "compiled": peak once compiled}
    python -m lmforge.sizing.measure generate [MODEL] --quant int4 --prompt-tokens 16 --new-tokens 16
                                                      # {"load": peak after loading, "peak": ... generating}
"""

from __future__ import annotations

import argparse
import gc
import json
import re
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

from lmforge import runtime
from lmforge.config import Config
from lmforge.generate import SamplingParams, generate_tokens
from lmforge.loading import LoadedModel
from lmforge.lora import LoRAConfig
from lmforge.model import Transformer, loss_terms, shell_device
from lmforge.quant import QUANT_CHOICES
from lmforge.tokenizer import train_tokenizer
from lmforge.train.loop import TrainConfig, Trainer, make_optimizer
from lmforge.train.methods import add_classifier, choose_trainable

MEASURE_TOKENS = 256  # tokens per training step when measuring speed: enough to be matmul-bound, quick


# --------------------------------------------------------------- the runtime
_RUN_MEASURE = [sys.executable, "-W", "ignore::RuntimeWarning:runpy", "-m", "lmforge.sizing.measure"]


def _measure_in_a_fresh_process(*arguments: str) -> dict[str, int]:
    # runpy warns that this module was imported (by the lmforge.sizing package) before it runs as __main__:
    # expected here, and harmless.
    result = subprocess.run(
        [*_RUN_MEASURE, *arguments], capture_output=True, text=True, timeout=900, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"measuring failed ({' '.join(arguments)}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@cache
def runtime_baseline() -> dict[str, int]:
    """Resident bytes of a Python process with torch and lmforge imported and used once: after a tiny model
    decoded ("infer"), and after it also ran one real training step ("train"). Measured once per session in a
    fresh interpreter (``measure_runtime``)."""
    return _measure_in_a_fresh_process()


@cache
def compile_overhead() -> int:
    """Bytes a ``torch.compile``d decode step adds to the process at its peak (dynamo, inductor, the compiled
    graph and kernels), measured once per session on the tiny ``PROBE`` model in a fresh interpreter, with the
    compile cache ``LLM.load`` uses. A bigger step graph holds more (``memory.COMPILE_BYTES_PER_LAYER``)."""
    measured = _measure_in_a_fresh_process("--compiled")
    return max(0, measured["compiled"] - measured["eager"])


def peak_bytes() -> int:
    """This process's peak resident memory so far (Linux: VmHWM; elsewhere the resident memory now)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return psutil.Process().memory_info().rss
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) * 1024 if match else psutil.Process().memory_info().rss


PROBE = Config(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)  # the runtime's tiny model


def _tiny_model() -> Transformer:
    config = PROBE
    with shell_device():  # as LoadedModel.load builds first: whatever that imports, the probe imports too
        Transformer(config)
    return Transformer(config).eval()


class _OneBatch:
    """The smallest training ``Task``: one batch of 16 tokens."""

    def train_batch(self, index: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        ids = torch.arange(1, 17).unsqueeze(0)
        return {"input_ids": ids, "targets": ids}

    def val_batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        return []

    def loss(self, model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["input_ids"], targets=batch["targets"])[1]

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> int:
        return loss_terms(batch["targets"])

    def describe(self) -> dict[str, Any]:
        return {}


def measure_runtime() -> dict[str, int]:
    """Run in a fresh interpreter: decode with a tiny model, then train it one step; the RSS after each."""
    runtime.configure()  # as LLM.load does: threads, the compile cache, freed memory returned to the system
    model = _tiny_model()
    model.compile_decode = False
    list(generate_tokens(model, [[1, 2, 3]], SamplingParams(max_new_tokens=4)))
    infer = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory() as tmp:  # a real run: metrics, TensorBoard, loss plot, checkpoint
        (Path(tmp) / "text.txt").write_text("a tiny corpus " * 20)
        tokenizer = train_tokenizer([str(Path(tmp) / "text.txt")], kind="char", show_progress=False)
        settings = TrainConfig(out_dir=tmp + "/run", max_steps=1, eval_every=0, progress=False, device="cpu")
        Trainer(model.train(), tokenizer, _OneBatch(), settings).fit()
    return {"infer": infer, "train": psutil.Process().memory_info().rss}


def measure_compile() -> dict[str, int]:
    """Run in a fresh interpreter: a tiny model decodes eagerly, then with its compiled step; RSS and peak."""
    runtime.configure()
    model = _tiny_model()
    model.compile_decode = False
    list(generate_tokens(model, [[1, 2, 3]], SamplingParams(max_new_tokens=4)))
    eager = psutil.Process().memory_info().rss
    model.compile_decode = True
    list(generate_tokens(model, [[1, 2, 3]], SamplingParams(max_new_tokens=4)))
    return {"eager": eager, "compiled": peak_bytes()}


# ------------------------------------------------------------------- peaks
def measure_peak(
    model: str | Path | None = None,
    *,
    quant: str = "auto",
    compile: bool = True,
    dtype: str = "auto",
    batch: int = 1,
    prompt_tokens: int = 16,
    new_tokens: int = 16,
) -> dict[str, int]:
    """The real peak resident bytes of loading ``model`` on the CPU (``LLM.load``'s quant, compile and dtype)
    and generating ``new_tokens`` after ``batch`` prompts of ``prompt_tokens`` random tokens, in a fresh
    process: ``{"load": peak once loaded, "peak": peak at the end}``. What ``estimate`` with
    ``context=prompt_tokens + new_tokens`` predicts."""
    arguments = ["generate", *([str(model)] if model is not None else [])]
    arguments += ["--quant", quant, "--dtype", dtype, "--batch", str(batch)]
    arguments += ["--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens)]
    return _measure_in_a_fresh_process(*arguments, *([] if compile else ["--no-compile"]))


def generation_peak(
    model: str | None,
    *,
    quant: str,
    compile: bool,
    dtype: str,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
) -> dict[str, int]:
    """``measure_peak``'s work, run in the fresh interpreter."""
    llm = LoadedModel.load(model, dtype=dtype, device="cpu", quant=quant, compile=compile)
    loaded = peak_bytes()
    prompts = _token_ids(llm, (batch, prompt_tokens)).tolist()
    for _ in generate_tokens(llm.model, prompts, SamplingParams(max_new_tokens=new_tokens)):
        pass
    return {"load": loaded, "peak": peak_bytes(), "rss": psutil.Process().memory_info().rss}


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
    quant: str = "auto",
    compile: bool = True,
) -> tuple[float, str]:
    """(tokens/s, how it was measured) of the workload ``estimate`` sized, on the model loaded for it (with
    ``LLM.load``'s ``quant`` and ``compile``)."""
    llm = LoadedModel.load(model, dtype=dtype, device="cpu", quant=quant, compile=compile)
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
    """Tokens/s of greedy decoding with the KV cache (the prefill and the first step, which compiles a
    compiled model's step, are not timed)."""
    prompts = _token_ids(llm, (batch, prompt_tokens)).tolist()
    decoding = generate_tokens(llm.model, prompts, SamplingParams(max_new_tokens=steps + 2))
    next(decoding)  # the prefill and the first token
    next(decoding)  # the first decode step: torch.compile builds the step here (or loads it from its cache)
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
        add_classifier(model, [str(i) for i in range(num_labels)], regression=False, seed=0)
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


def _main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(
        prog="python -m lmforge.sizing.measure", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--compiled", action="store_true", help="what a compiled decode step adds (tiny model)"
    )
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("generate", help="the peak of loading a model and generating (one JSON line)")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--quant", default="auto", choices=QUANT_CHOICES)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    if args.command == "generate":
        options = {k: v for k, v in vars(args).items() if k not in ("command", "compiled")}
        return generation_peak(**options)
    return measure_compile() if args.compiled else measure_runtime()


if __name__ == "__main__":
    print(json.dumps(_main()))
