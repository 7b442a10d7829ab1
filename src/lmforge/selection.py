"""Which model fits: ``estimate`` sizes one model for a workload, ``select`` ranks candidates on the user's data.

    lmforge.estimate("default", context=2048)                        # SmolLM2 inference: breakdown + tokens/s
    lmforge.estimate("runs/base/model", mode="lora", context=512, batch=8)
    lmforge.select(task="classify", data="spam.jsonl", candidates=["default", "spam:v1"], max_ram="4GB")

Memory is the peak resident set (RSS) of a CPU process, counted part by part from the config (file headers
only, no weights are read), following what the code really holds:

- runtime: a Python process with torch and lmforge imported and warmed up. It is measured once per session in
  a subprocess: torch imports its tracing stack on first use (~75 MiB), which no constant could know.
- weights as held in memory: lmforge dequantizes GGUF files at load, so a Q4 file costs its dtype in RAM.
  Fine-tuning always holds fp32 weights (``finetune`` loads float32).
- loading: a GGUF file (or safetensors in another dtype) is memory-mapped and read while the weights are
  built, so its pages are resident next to the weights until the load returns.
- training: AdamW's two moments for the parameters the method trains (decided by ``choose_trainable`` on a
  meta-device model: the same code fine-tuning runs), the tensors autograd saves per token (``_saved_per_token``,
  checked against autograd in the tests) and gradients, at the moment of the backward pass where their sum
  peaks (``_backward_peak``).
- inference: the KV cache, one block's temporaries, and the logits the workload keeps.

Not counted: the user's tokenized dataset, and heap memory the C allocator keeps after tensors are freed
(a few percent of the activations in our measurements).
"""

from __future__ import annotations

import gc
import json
import math
import random
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from lmforge.config import Config
from lmforge.errors import LmforgeError, UnsupportedError

if TYPE_CHECKING:
    from lmforge.api import LLM
    from lmforge.info import ModelHeader
    from lmforge.model import Network, Transformer

MODES = ("infer", "full", "freeze", "lora")
# What the model computes. Inference: decode with a KV cache (generate), log-likelihoods over whole sequences
# (score: zero-shot classification, perplexity), a head on the last token (classify), hidden states (embed).
# Training: next-token loss on every position (generate: instruct, summarize, pretrain) or a head (classify).
WORKLOADS = {"infer": ("generate", "score", "classify", "embed"), "train": ("generate", "classify")}
SELECT_TASKS = ("classify", "generate", "summarize", "embed")
FP32 = 4
# `tokenizers` holds the vocabulary and merges as Rust maps: measured 18 MiB for SmolLM2's 49k-entry vocabulary
# read from GGUF and 29 MiB from its tokenizer.json, so about half a kilobyte per entry.
TOKENIZER_BYTES_PER_ENTRY = 512
MEASURE_TOKENS = 256  # tokens per training step when measuring speed: enough to be matmul-bound, quick
MiB, GiB = 2**20, 2**30


# ------------------------------------------------------------------ estimate
@dataclass
class Component:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Estimate:
    """Memory at the peak of a workload, part by part (the parts add up to ``peak_bytes``), and its speed."""

    model: str
    mode: str
    task: str
    context: int
    batch: int
    dtype: str
    parameters: int
    trainable_parameters: int
    components: list[Component]
    peak_phase: str  # when the peak happens: "loading" or the workload's own moment
    tokens_per_s: float | None = None
    speed_note: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return sum(c.bytes for c in self.components)

    def table(self) -> str:
        what = f"{self.mode}" + (f" ({self.task})" if self.task != "generate" or self.mode != "infer" else "")
        lines = [
            f"{self.model}: {what}, batch {self.batch} x context {self.context}, {self.dtype}, "
            f"{self.parameters / 1e6:.1f}M parameters"
            + (f", {self.trainable_parameters / 1e6:.2f}M trained" if self.mode != "infer" else ""),
            "",
            f"{'component':<34} {'memory':>10}  how it is counted",
        ]
        lines += [f"{c.name:<34} {format_size(c.bytes):>10}  {c.note}" for c in self.components]
        lines.append(f"{'peak (' + self.peak_phase + ')':<34} {format_size(self.peak_bytes):>10}")
        if self.tokens_per_s is not None:
            lines.append(f"\nspeed: {self.tokens_per_s:,.1f} tokens/s ({self.speed_note})")
        elif self.speed_note:
            lines.append(f"\nspeed: not measured ({self.speed_note})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def estimate(
    model: str | Path | None = None,
    *,
    context: int | None = None,
    batch: int = 1,
    mode: str = "infer",
    dtype: str = "auto",
    quant: str | None = None,
    measure: bool = True,
    task: str | None = None,
    lora_rank: int = 8,
    lora_targets: Sequence[str] | None = None,
    freeze_last: int = 2,
    activation_checkpointing: bool = False,
    num_labels: int = 2,
) -> Estimate:
    """Peak memory (RSS, CPU) of running or fine-tuning ``model``, part by part, and tokens/s measured here.

    ``context`` is the tokens per sequence (default: the model's context, at most 2048 for inference and 512,
    fine-tuning's default, for training), ``batch`` the sequences at once. ``mode``: infer | full | freeze |
    lora; ``task`` the workload (see ``WORKLOADS``; default embed for a sentence encoder, else generate). ``quant`` sizes a GGUF file of that type (q8_0, q4_0...)
    instead of the model's own file. ``measure`` runs a few decode or training steps for tokens/s.
    """
    _check_choice("mode", mode, MODES)
    training = mode != "infer"
    if task is not None:
        _check_choice("task", task, WORKLOADS["train" if training else "infer"], f"for mode {mode}")
    for name, value in (
        ("batch", batch),
        ("context", 1 if context is None else context),
        ("lora_rank", lora_rank),
    ):
        if not isinstance(value, int) or value < 1:
            raise LmforgeError(f"{name}={value!r} must be a positive integer", hint=f"e.g. {name}=1")
    from lmforge.info import read_header
    from lmforge.loading import resolve_dtype

    if training and dtype not in ("auto", "float32", "fp32"):
        raise UnsupportedError(
            f"training estimates are for float32, not {dtype}",
            hint="fine-tuning loads fp32 weights: drop --dtype",
        )
    torch_dtype = resolve_dtype("float32" if training else dtype, torch.device("cpu"))
    disk_type = _quant_type(quant) if quant else None
    header = read_header(model)
    task = task or ("embed" if header.config.is_encoder else "generate")
    block = header.config.block_size
    context = context or min(block, 512 if training else 2048)
    if context > block:
        raise LmforgeError(
            f"context {context} is longer than the model's {block} tokens",
            hint=f"use --context {block} or less",
        )
    shell = _shell(header.config, mode, task, lora_rank, lora_targets, freeze_last, num_labels)
    result = _size(
        header, shell, mode, task, context, batch, torch_dtype, disk_type, activation_checkpointing
    )
    if measure:
        _measure_into(result, model, torch_dtype, lora_rank, lora_targets, freeze_last, num_labels)
    return result


def _size(
    header: ModelHeader,
    net: Network,
    mode: str,
    task: str,
    context: int,
    batch: int,
    dtype: torch.dtype,
    quant: Any,
    checkpointing: bool,
) -> Estimate:
    """The memory part of ``estimate``, for a model shell whose ``requires_grad`` says what trains."""
    training = mode != "infer"
    config = header.config
    width = torch.empty((), dtype=dtype).element_size()
    dtype_name = str(dtype).removeprefix("torch.")
    params = _unique_parameters(net)
    count = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    disk, disk_note = _disk_size(header, net, quant)
    vocab = header.tokenizer.vocab_size
    components = [
        Component(
            "runtime (python, torch, lmforge)",
            runtime_baseline()["train" if training else "infer"],
            "measured once in a subprocess",
        ),
        Component("tokenizer", vocab * TOKENIZER_BYTES_PER_ENTRY, f"{vocab:,} entries"),
        Component("weights", count * width, f"{count:,} parameters as {dtype_name}; {disk_note}"),
    ]
    load = _load_transient(header, disk, quant, dtype, count)
    if training:
        work, moment = _training_peak(net, config, task, batch * context, checkpointing)
        work.insert(0, Component("AdamW moments", 2 * trainable * FP32, f"2 x {trainable:,} trained params"))
    else:
        work, moment = _inference_peak(config, task, batch, context, width)
    notes = []
    if load and load.bytes > sum(c.bytes for c in work):
        components.append(load)
        phase = "loading"
    else:
        components += work
        phase = moment
        if load:
            notes.append(f"loading briefly adds {format_size(load.bytes)} ({load.note}), less than this")
    notes.append(
        "not counted: your tokenized data, and freed heap the C allocator keeps (0-6 % more in our "
        "measurements; MALLOC_MMAP_THRESHOLD_=131072 removes it)"
    )
    return Estimate(
        str(header.path), mode, task, context, batch, dtype_name, config.num_parameters(), trainable,
        components, phase, notes=notes,
    )  # fmt: skip


def _check_choice(name: str, value: str, allowed: Sequence[str], context: str = "") -> None:
    if value not in allowed:
        raise LmforgeError(
            f"unknown {name} {value!r}" + (f" {context}" if context else ""),
            hint=f"use {' | '.join(allowed)}",
        )


def _shell(
    config: Config,
    mode: str,
    task: str,
    lora_rank: int,
    lora_targets: Sequence[str] | None,
    freeze_last: int,
    num_labels: int,
) -> Network:
    """The model on the meta device (no memory), with fine-tuning's own choice of what trains."""
    from lmforge.loading import build_network
    from lmforge.lora import LoRAConfig
    from lmforge.train.methods import choose_trainable

    if config.is_encoder and (mode != "infer" or task != "embed"):
        raise UnsupportedError(
            f"this model is a sentence encoder: it only embeds, so {mode} / {task} does not apply",
            hint="size it with --task embed (inference)",
        )
    config = config.replace(extra=dict(config.extra))  # inject_lora records itself in the config
    with torch.device("meta"):
        net = build_network(config)
        if task == "classify":
            net.score = nn.Linear(config.n_embd, num_labels, bias=False)
    if mode == "infer":
        net.requires_grad_(False)
    else:
        targets = list(lora_targets) if lora_targets else LoRAConfig().targets
        choose_trainable(net, mode, freeze_last, LoRAConfig(rank=lora_rank, targets=targets))
    return net


def _unique_parameters(net: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in net.parameters()}.values())  # a tied head is one tensor


# --------------------------------------------------------------- the runtime
_RUNTIME_PROBE = r"""
import json, sys, tempfile
from pathlib import Path

import psutil, torch
from lmforge.config import Config
from lmforge.generate import SamplingParams, generate_tokens
from lmforge.model import Transformer

config = Config(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)
with torch.device("meta"):
    Transformer(config)  # LLM.load builds on the meta device first; torch imports its tracing stack here
model = Transformer(config).eval()
list(generate_tokens(model, [[1, 2, 3]], SamplingParams(max_new_tokens=4)))
infer = psutil.Process().memory_info().rss

from lmforge.tokenizer import train_tokenizer
from lmforge.train import TrainConfig, Trainer


class OneBatch:  # the smallest Task
    def train_batch(self, index, rank, world_size):
        ids = torch.arange(1, 17).unsqueeze(0)
        return {"input_ids": ids, "targets": ids}

    def val_batches(self, count):
        return []

    def loss(self, model, batch):
        return model(batch["input_ids"], targets=batch["targets"])[1]

    def describe(self):
        return {}


with tempfile.TemporaryDirectory() as tmp:  # a real run: metrics, TensorBoard, loss plot, checkpoint
    (Path(tmp) / "text.txt").write_text("a tiny corpus " * 20)
    tokenizer = train_tokenizer([str(Path(tmp) / "text.txt")], kind="char", show_progress=False)
    settings = TrainConfig(out_dir=tmp + "/run", max_steps=1, eval_every=0, progress=False, device="cpu")
    Trainer(model.train(), tokenizer, OneBatch(), settings).fit()
print(json.dumps({"infer": infer, "train": psutil.Process().memory_info().rss}))
"""


@cache
def runtime_baseline() -> dict[str, int]:
    """Resident bytes of a Python process with torch and lmforge imported and used once: after a tiny model
    decoded ("infer"), and after it also ran one real training step ("train"). Measured once per session in a
    fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", _RUNTIME_PROBE], capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0:  # pragma: no cover - a broken installation
        raise RuntimeError(f"measuring the runtime failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------- load & disk
def _quant_type(name: str) -> Any:
    import gguf

    from lmforge.formats.gguf_quants import SUPPORTED_TYPES

    try:
        qtype = gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        qtype = None
    if qtype not in SUPPORTED_TYPES:
        raise LmforgeError(
            f"unknown quantization {name!r}",
            hint="use a GGUF type lmforge reads: " + ", ".join(t.name.lower() for t in SUPPORTED_TYPES),
        )
    return qtype


def _disk_size(header: ModelHeader, net: nn.Module, quant: Any) -> tuple[int, str]:
    """Weight bytes on disk and how they relate to memory."""
    if quant is None:
        types = ", ".join(f"{name} x{count}" for name, count in header.weight_types.most_common())
        held = "dequantized at load" if header.kind == "gguf" else "read from the file"
        return header.file_bytes, f"file: {types}, {format_size(header.file_bytes)}, {held}"
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[quant]
    size = 0
    for name, tensor in net.named_parameters():  # a tied head is listed once
        if ".lora_" in name:
            continue
        rows_fit = tensor.dim() >= 2 and tensor.shape[-1] % block == 0
        # llama.cpp quantizes matrices; norms and odd-sized rows stay F32
        size += tensor.numel() // block * type_size if rows_fit else tensor.numel() * FP32
    return size, f"as a {quant.name} GGUF {format_size(size)} on disk, dequantized at load"


def _load_transient(
    header: ModelHeader, disk: int, quant: Any, dtype: torch.dtype, parameters: int
) -> Component | None:
    """What loading holds on top of the weights: the mapped file while tensors are built from it.

    GGUF tensors are dequantized to a float32 state dict, which another dtype is then cast from. Safetensors in
    the target dtype are used in place from the memory map (their pages are the weights, counted once); in
    another dtype they are read next to the weights they become.
    """
    if header.kind == "gguf" or quant is not None:
        if dtype == torch.float32:
            return Component(
                "loading: GGUF file mapped", disk, "read while dequantizing, freed after loading"
            )
        fp32 = parameters * FP32
        return Component(
            "loading: GGUF file + float32 copy",
            disk + fp32,
            f"file mapped + {format_size(fp32)} dequantized to float32 before the cast, freed after loading",
        )
    if {_TORCH_DTYPES.get(t) for t in header.weight_types} == {dtype}:
        return None
    return Component("loading: file mapped", disk, "read while converting dtype, freed after loading")


_TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# ---------------------------------------------------------------- inference
def _inference_peak(
    config: Config, task: str, batch: int, context: int, width: int
) -> tuple[list[Component], str]:
    tokens = batch * context
    C, V = config.n_embd, config.vocab_size
    # One block in inference mode keeps only its temporaries: the residual stream, the normalised input and
    # (gated MLP) act(gate), up and their product, or (GPT-2) up and act(up).
    mlp = (3 if config.gated_mlp else 2) * config.intermediate_size
    parts = [
        Component(
            "activations (one block)", tokens * (2 * C + mlp) * width, f"{tokens:,} tokens, freed per block"
        )
    ]
    if task == "generate":
        kv = tokens * config.n_layer * config.n_kv_head * config.head_dim * 2 * width
        parts.insert(
            0,
            Component(
                "KV cache",
                kv,
                f"{batch} x {context} tokens x {config.n_layer} layers x {config.n_kv_head} kv heads x "
                f"{config.head_dim} x 2",
            ),
        )
        parts.append(Component("logits", batch * V * (width + FP32), "last position only, as float32"))
        return parts, "prefill"
    if task == "score":
        # sequence_logprobs: logits for every position and their float32 log-softmax (a float copy first
        # when the model runs in 16 bits)
        per_token = V * (width + FP32 + (FP32 if width != FP32 else 0))
        logits = Component("logits + log-probabilities", tokens * per_token, "every position, as float32")
        return ([logits] if logits.bytes > parts[0].bytes else parts), "scoring"
    hidden = Component("hidden states (float32)", tokens * C * FP32, "pooled or read at the last token")
    return parts + [hidden], "forward"


# ----------------------------------------------------------------- training
@dataclass
class _Stage:
    """The backward pass at one moment: saved activations still held, gradients so far, transient tensors."""

    name: str
    saved: int
    grads: int
    transient: int = 0

    @property
    def total(self) -> int:
        return self.saved + self.grads + self.transient


def _linear(module: nn.Module) -> tuple[bool, int]:
    """(does the layer's own weight train, LoRA rank or 0)."""
    from lmforge.lora import LoRALinear

    if isinstance(module, LoRALinear):
        return module.base.weight.requires_grad, module.lora_A.out_features
    return module.weight.requires_grad, 0


def _norm_saved(config: Config, norm: nn.Module, x_grad: bool) -> int:
    """Floats per token a norm saves. RMSNorm as autograd records it: x and rsqrt (x needs a gradient), the
    normalised x (the weight trains). LayerNorm's fused kernel: its input, mean and rstd."""
    w_grad = norm.weight.requires_grad
    if config.norm == "layernorm":
        return config.n_embd + 2 if x_grad or w_grad else 0
    return (config.n_embd + 1 if x_grad else 0) + (config.n_embd if w_grad else 0)


def _block_saved(config: Config, block: nn.Module, x_grad: bool) -> tuple[int, bool]:
    """Floats per token that autograd saves in one block, and whether its output needs a gradient.

    The rules are autograd's: a linear layer keeps its input only if its weight trains (a LoRA adapter's A
    keeps it too, and B keeps A's output); an elementwise product keeps each factor the other needs; RoPE keeps
    only cos/sin (shared by all layers, counted outside); SDPA's flash kernel keeps q, k, v (k and v per
    key/value head), its output (which o_proj's input shares) and the log-sum-exp per head.
    """
    C, inner = config.n_embd, config.intermediate_size
    q_width, kv_width = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    attn, mlp = block.attn, block.mlp
    saved = _norm_saved(config, block.attn_norm, x_grad)
    h_grad = x_grad or block.attn_norm.weight.requires_grad
    qkv = [_linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj)]
    saved += C if any(t or r for t, r in qkv) else 0  # q, k, v share their input
    saved += sum(r for _, r in qkv)
    attn_grad = h_grad or any(t or r for t, r in qkv)
    saved += 2 * q_width + 2 * kv_width + config.n_head if attn_grad else 0
    o_trains, o_rank = _linear(attn.o_proj)
    saved += o_rank + (q_width if (o_trains or o_rank) and not attn_grad else 0)
    x2_grad = x_grad or attn_grad or o_trains or o_rank > 0
    saved += _norm_saved(config, block.mlp_norm, x2_grad)
    h2_grad = x2_grad or block.mlp_norm.weight.requires_grad
    up, down = _linear(mlp.up_proj), _linear(mlp.down_proj)
    inputs = [up] + ([_linear(mlp.gate_proj)] if mlp.gate_proj is not None else [])
    saved += C if any(t or r for t, r in inputs) else 0
    saved += sum(r for _, r in inputs) + down[1]
    up_grad = h2_grad or up[0] or up[1] > 0
    if mlp.gate_proj is not None:
        gate_grad = h2_grad or inputs[1][0] or inputs[1][1] > 0
        # act(gate) keeps gate; the product keeps act(gate) for up's gradient and up for act(gate)'s
        saved += (inner if gate_grad else 0) + (inner if up_grad else 0) + (inner if gate_grad else 0)
        inner_grad = gate_grad or up_grad
    else:
        saved += inner if up_grad else 0  # the activation keeps its input
        inner_grad = up_grad
    saved += inner if down[0] or down[1] else 0  # down_proj's input
    return saved, x2_grad or inner_grad or down[0] or down[1] > 0


def _saved_per_token(net: Transformer, task: str) -> tuple[list[int], int, int, bool]:
    """Bytes per token autograd saves: per block, outside the blocks, and the head's log-softmax (V floats
    for next-token loss); and whether the embedding trains. fp32 training."""
    config = net.config
    grad = net.wte.weight.requires_grad or (net.wpe is not None and net.wpe.weight.requires_grad)
    blocks = []
    any_attention = False
    for block in net.blocks:
        floats, out_grad = _block_saved(config, block, grad)
        any_attention = any_attention or floats > 0
        blocks.append(floats * FP32)
        grad = out_grad
    # int64 token ids: the embedding keeps them when it trains, the next-token loss its targets
    outside = (8 if net.wte.weight.requires_grad else 0) + (8 if task == "generate" else 0)
    if config.position == "rope" and any_attention:
        outside += 2 * config.head_dim * FP32  # cos and sin, shared by every block
    outside += _norm_saved(config, net.norm, grad) * FP32
    head = net.score if task == "classify" else net.lm_head
    outside += config.n_embd * FP32 if head.weight.requires_grad else 0  # the final norm's output
    loss = config.vocab_size * FP32 if task == "generate" else 0
    return blocks, outside, loss, net.wte.weight.requires_grad


def _training_peak(
    net: Transformer, config: Config, task: str, tokens: int, checkpointing: bool
) -> tuple[list[Component], str]:
    stage = _backward_peak(net, config, task, tokens, checkpointing)
    parts = [
        Component(
            "activations saved for backward",
            stage.saved,
            f"{tokens:,} tokens" + (", activation checkpointing" if checkpointing else ""),
        ),
        Component("gradients (at the peak)", stage.grads, "fp32, of the trained parameters computed so far"),
        Component("backward temporaries", stage.transient, stage.name),
    ]
    return [p for p in parts if p.bytes], f"backward: {stage.name}"


def _backward_peak(net: Transformer, config: Config, task: str, tokens: int, checkpointing: bool) -> _Stage:
    """Walk the backward pass and return the moment where saved activations + gradients + temporaries peak.

    Backward frees each block's saved tensors after its gradients are made, so the peak is either at the loss
    (everything saved, plus the loss's gradients) or where a large gradient appears, such as the embedding's.
    """
    blocks, outside, loss_floats, embedding_trains = _saved_per_token(net, task)
    grads = {
        i: sum(p.numel() for p in block.parameters() if p.requires_grad) * FP32
        for i, block in enumerate(net.blocks)
    }
    C, V = config.n_embd, config.vocab_size
    if checkpointing:  # each block keeps only its input; backward recomputes one block at a time
        kept = [tokens * C * FP32 if b else 0 for b in blocks]
    else:
        kept = [tokens * b for b in blocks]
    loss = tokens * loss_floats
    saved = sum(kept) + tokens * outside + loss
    head_params = net.score if task == "classify" else net.lm_head
    head_grad = head_params.weight.numel() * FP32 if head_params.weight.requires_grad else 0
    head_grad += net.norm.weight.numel() * FP32 if net.norm.weight.requires_grad else 0
    # At the loss: the log-softmax output is saved; its gradient and the logits' gradient are made next to it.
    stages = [_Stage("at the loss", saved, 0, 2 * loss)]
    # The head's weight gradient appears while the logits' gradient is still held.
    saved -= loss
    stages.append(_Stage("head gradient", saved, head_grad, loss))
    done = head_grad
    for i in reversed(range(len(blocks))):
        recompute = tokens * blocks[i] if checkpointing else 0
        stages.append(_Stage(f"block {i}", saved, done, recompute))
        saved -= kept[i]
        done += grads[i]
    if embedding_trains:
        emb = V * C * FP32
        # A dense gradient for the whole table. When the table is also the head that made the logits, it is
        # added to the head's gradient already there, into a new tensor: two more tables at once.
        accumulates = config.tie_embeddings and task == "generate"
        stages.append(_Stage("embedding gradient", saved, done, emb * (2 if accumulates else 1)))
    every_grad = sum(p.numel() for p in _unique_parameters(net) if p.requires_grad) * FP32
    stages.append(_Stage("optimizer step", 0, every_grad))
    return max(stages, key=lambda s: s.total)


# ------------------------------------------------------------------ speed
def _measure_into(
    result: Estimate,
    model: str | Path | None,
    dtype: torch.dtype,
    lora_rank: int,
    lora_targets: Sequence[str] | None,
    freeze_last: int,
    num_labels: int,
) -> None:
    import psutil

    from lmforge.api import LLM

    available = psutil.virtual_memory().available
    if result.peak_bytes > available:
        result.speed_note = f"needs {format_size(result.peak_bytes)}, {format_size(available)} is free"
        return
    llm = LLM.load(model, dtype=dtype, device="cpu")
    try:
        if result.mode == "infer" and result.task == "generate":
            result.tokens_per_s, result.speed_note = decode_speed(llm, result.batch)
        elif result.mode == "infer":
            result.tokens_per_s, result.speed_note = forward_speed(llm, result.batch, result.context)
        else:
            result.tokens_per_s, result.speed_note = train_speed(
                llm,
                result.mode,
                result.task,
                result.batch,
                result.context,
                lora_rank,
                lora_targets,
                freeze_last,
                num_labels,
            )
    finally:
        del llm
        gc.collect()


def _token_ids(llm: LLM, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    # A private generator: measuring must not move the global RNG.
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, llm.config.vocab_size, shape, generator=generator)


def decode_speed(llm: LLM, batch: int = 1, steps: int = 8, prompt_tokens: int = 16) -> tuple[float, str]:
    """Tokens/s of greedy decoding with the KV cache (the prefill is not timed)."""
    from lmforge.generate import SamplingParams, generate_tokens

    prompts = _token_ids(llm, (batch, prompt_tokens)).tolist()
    decoding = generate_tokens(llm.model, prompts, SamplingParams(max_new_tokens=steps + 1))
    next(decoding)  # the prefill and the first token
    start = time.perf_counter()
    made = sum(1 for _ in decoding)
    seconds = time.perf_counter() - start
    return batch * made / seconds, f"{made} decode steps, batch {batch}, after a {prompt_tokens}-token prompt"


@torch.inference_mode()
def forward_speed(llm: LLM, batch: int, context: int) -> tuple[float, str]:
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
    llm: LLM,
    mode: str,
    task: str,
    batch: int,
    context: int,
    lora_rank: int = 8,
    lora_targets: Sequence[str] | None = None,
    freeze_last: int = 2,
    num_labels: int = 2,
) -> tuple[float, str]:
    """Tokens/s of fine-tuning steps (forward, backward, AdamW) with the method's trainable parameters.

    Steps are capped at MEASURE_TOKENS tokens: throughput per token is what matmuls set, and it stays quick.
    """
    from lmforge.lora import LoRAConfig
    from lmforge.train.loop import TrainConfig, make_optimizer
    from lmforge.train.methods import choose_trainable

    model = llm.model.train()
    if task == "classify":
        model.config.labels = [str(i) for i in range(num_labels)]
        model.score = nn.Linear(model.config.n_embd, num_labels, bias=False)
    targets = list(lora_targets) if lora_targets else LoRAConfig().targets
    choose_trainable(model, mode, freeze_last, LoRAConfig(rank=lora_rank, targets=targets))
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


# ------------------------------------------------------------------- sizes
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_size(text: str | int) -> int:
    """Bytes from ``4GB`` (10^9), ``512MiB`` / ``512M`` (2^20) or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.match(str(text))
    if match is None or match.group(2).lower() not in _UNITS:
        raise LmforgeError(
            f"cannot read the size {text!r}", hint="write a number and a unit, e.g. 4GB, 512MiB or 1.5G"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(size: int) -> str:
    return f"{size / GiB:.2f} GiB" if size >= GiB else f"{size / MiB:.1f} MiB"


# ------------------------------------------------------------------- select
@dataclass
class Candidate:
    name: str
    parameters: int | None = None
    memory: int | None = None  # estimated peak for this workload
    latency_ms: float | None = None
    quality: float | None = None
    status: str = "ok"  # ok, or why the candidate cannot be recommended
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def eligible(self) -> bool:
        return self.status == "ok"


@dataclass
class Selection:
    task: str
    data: str
    sample: int
    metric: str  # what quality means here, e.g. "accuracy"
    higher_is_better: bool
    latency_unit: str  # "ms/example" or "ms/token"
    candidates: list[Candidate]  # ranked: recommendable ones first
    recommended: str | None
    reason: str
    max_ram: int
    max_latency_ms: float | None = None

    def table(self) -> str:
        from lmforge.evaluate import markdown_table

        rows = [
            {
                "rank": i + 1,
                "candidate": c.name,
                "params": f"{c.parameters / 1e6:.1f}M" if c.parameters else "-",
                "memory (est.)": format_size(c.memory) if c.memory else "-",
                self.latency_unit: f"{c.latency_ms:.1f}" if c.latency_ms is not None else "-",
                self.metric: f"{c.quality:.3f}" if c.quality is not None else "-",
                "status": c.status,
            }
            for i, c in enumerate(self.candidates)
        ]
        columns = ["rank", "candidate", "params", "memory (est.)", self.latency_unit, self.metric, "status"]
        limits = f"max RAM {format_size(self.max_ram)}" + (
            f", max latency {self.max_latency_ms:g} {self.latency_unit}" if self.max_latency_ms else ""
        )
        better = "higher" if self.higher_is_better else "lower"
        head = f"{self.task} on {self.sample} examples of {self.data} ({limits}; {self.metric}: {better} is better)\n\n"
        verdict = f"recommended: {self.recommended} — {self.reason}" if self.recommended else self.reason
        return head + markdown_table(rows, columns) + "\n\n" + verdict


def select(
    task: str,
    data: str | Path,
    candidates: Sequence[str] | str,
    *,
    max_ram: int | str | None = None,
    max_latency_ms: float | None = None,
    sample: int = 32,
    shots: int = 0,
    text_field: str = "text",
    label_field: str = "label",
    summary_field: str = "summary",
    seed: int = 0,
) -> Selection:
    """Rank ``candidates`` (anything ``LLM.load`` takes) for ``task`` on a sample of the user's ``data``.

    Each candidate is sized for the workload (``estimate``) and checked against ``max_ram`` (default: the RAM
    free now); those that fit are loaded and scored on ``sample`` examples: classify - accuracy (a fine-tuned
    head when its labels match, else zero/``shots``-shot), summarize - ROUGE-L, generate - bits per byte of
    the target text (lower is better; comparable across tokenizers), embed - nearest-neighbour label accuracy
    (skipped without labels). The best quality among those that fit and meet ``max_latency_ms`` is recommended;
    ties go to the faster, then the smaller model.
    """
    _check_choice("task", task, SELECT_TASKS)
    names = [c.strip() for c in candidates.split(",")] if isinstance(candidates, str) else list(candidates)
    names = [n for n in names if n]
    if not names:
        raise LmforgeError(
            "no candidates given", hint="name models to compare, e.g. --candidates default,runs/x/model"
        )
    import psutil

    limit = parse_size(max_ram) if max_ram is not None else psutil.virtual_memory().available
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise LmforgeError(f"max_latency_ms={max_latency_ms} must be > 0", hint="e.g. --max-latency-ms 200")
    if sample < 1:
        raise LmforgeError(f"sample={sample} must be >= 1", hint="e.g. --sample 32")
    job = _read_job(task, data, sample, seed, shots, text_field, label_field, summary_field)
    results = [_evaluate_candidate(name, job, limit, max_latency_ms) for name in names]
    ranked = sorted(results, key=job.sort_key)
    best = next((c for c in ranked if c.eligible), None)
    return Selection(
        task,
        str(data),
        len(job.rows),
        job.metric,
        job.higher_is_better,
        job.latency_unit,
        ranked,
        best.name if best else None,
        _reason(ranked, best, job, limit, max_latency_ms),
        limit,
        max_latency_ms,
    )


SUMMARY_TOKENS = 64  # summary length when scoring summarization


@dataclass
class _Job:
    """The task, the sampled rows and how a model is scored on them."""

    task: str
    rows: list[dict[str, Any]]
    labels: list[str] = field(default_factory=list)  # every label in the data file (classify, embed)
    examples: list[tuple[str, str]] = field(
        default_factory=list
    )  # few-shot examples, from outside the sample

    @property
    def metric(self) -> str:
        names = {
            "classify": "accuracy",
            "summarize": "ROUGE-L",
            "generate": "bits/byte",
            "embed": "1-NN accuracy",
        }
        return names[self.task]

    @property
    def higher_is_better(self) -> bool:
        return self.task != "generate"

    @property
    def latency_unit(self) -> str:
        return "ms/token" if self.task == "generate" else "ms/example"

    def sort_key(self, c: Candidate) -> tuple[bool, float, float, float]:
        """Recommendable first, then better quality, then faster, then smaller."""
        if c.quality is None:
            quality = math.inf
        else:
            quality = -c.quality if self.higher_is_better else c.quality
        return (not c.eligible, round(quality, 6), c.latency_ms or math.inf, c.memory or math.inf)

    # ------------------------------------------------------- sizing a model
    def uses_head(self, config: Config) -> bool:
        return self.task == "classify" and bool(config.labels) and set(self.labels) <= set(config.labels)

    def workload(self, header: ModelHeader) -> tuple[str, int, int]:
        """(estimate's task, batch, context) that scoring this model on the sample runs: the batch sizes are
        those of tasks.py's batched loops, the context the longest example's tokens."""
        from lmforge.data.labelled import encode_conversation
        from lmforge.inference import chat_or_plain, classification_prompt, summarization_prompt

        tok, config = header.tokenizer, header.config
        texts = [str(r.get("text", "")) for r in self.rows]
        if self.task == "classify" and self.uses_head(config):
            return "classify", 16, max(len(tok.encode(t)) for t in texts)
        if self.task == "classify":
            answer = max(len(tok.encode(" " + label, add_special_tokens=False)) for label in self.labels)
            prompts = [
                chat_or_plain(tok, classification_prompt(t, self.labels, self.examples)) for t in texts
            ]
            return "score", 8, max(len(tok.encode(p, add_special_tokens=False)) for p in prompts) + answer
        if self.task == "summarize":
            prompts = [chat_or_plain(tok, summarization_prompt(t)) for t in texts]
            longest = max(len(tok.encode(p, add_special_tokens=False)) for p in prompts) + SUMMARY_TOKENS
            return "generate", 1, min(longest, config.block_size)  # longer texts are summarized in chunks
        if self.task == "generate":
            lengths = [
                len(encode_conversation(tok, r["messages"])[0])
                if "messages" in r
                else len(tok.encode(r["text"]))
                for r in self.rows
            ]
            return "score", 8, min(max(lengths), config.block_size)
        return "embed", 16, max(len(tok.encode(t)) for t in texts)

    # ------------------------------------------------------------- scoring
    def score(self, llm: LLM) -> tuple[float | None, float, dict[str, Any]]:
        """(quality, latency in ms per example or per token, details) of a loaded model on the sample."""
        start = time.perf_counter()
        if self.task == "classify":
            texts = [r["text"] for r in self.rows]
            head = self.uses_head(llm.config)
            found = llm.classify_text(texts) if head else llm.classify_text(texts, self.labels, self.examples)
            latency = (time.perf_counter() - start) * 1000 / len(texts)
            from lmforge.evaluate import classification_metrics

            truth = [r["label"] for r in self.rows]
            metrics = classification_metrics(truth, [f["label"] for f in found], self.labels)
            method = "fine-tuned head" if head else f"{len(self.examples)}-shot"
            return metrics["accuracy"], latency, {"macro_f1": metrics["macro_f1"], "method": method}
        if self.task == "summarize":
            from lmforge.evaluate import rouge

            summaries = llm.summarize([r["text"] for r in self.rows], max_length=SUMMARY_TOKENS)
            latency = (time.perf_counter() - start) * 1000 / len(self.rows)
            scores = rouge(summaries, [r["summary"] for r in self.rows])
            return scores["rougeL"], latency, scores
        if self.task == "generate":
            bits = _bits_per_byte(llm, self.rows)
            tokens_per_s, how = decode_speed(llm)
            return bits, 1000 / tokens_per_s, {"speed": how}
        vectors = llm.embed([r["text"] for r in self.rows])
        latency = (time.perf_counter() - start) * 1000 / len(self.rows)
        if not self.labels:
            return None, latency, {"note": "the data has no labels, so quality is not scored"}
        similarity = vectors @ vectors.T
        similarity[range(len(vectors)), range(len(vectors))] = -math.inf  # leave each text out of its search
        truth = [r["label"] for r in self.rows]
        hits = [truth[int(j)] == truth[i] for i, j in enumerate(similarity.argmax(1))]
        return sum(hits) / len(hits), latency, {}


def _bits_per_byte(llm: LLM, rows: Sequence[dict[str, Any]]) -> float:
    """Negative log-likelihood of each row's target text (an answer after its prompt, or a whole text), in
    bits per UTF-8 byte: comparable between models with different tokenizers."""
    from lmforge.data.labelled import encode_conversation
    from lmforge.inference import sequence_logprobs

    tok, context = llm.tokenizer, llm.config.block_size
    prompts, targets = [], []
    for row in rows:
        if "messages" in row:
            ids, weights = encode_conversation(tok, row["messages"])
            split = weights.index(1)
        else:
            ids, split = tok.encode(row["text"]), 1
        target = ids[split:][: context - 1]  # a target longer than the context is scored up to it
        prompts.append(ids[:split][-(context - len(target)) :])
        targets.append(target)
    nll = -sum(sequence_logprobs(llm, prompts, targets))
    size = sum(len(tok.decode(t, skip_special_tokens=True).encode("utf-8")) for t in targets)
    return nll / math.log(2) / max(1, size)


def _read_job(
    task: str,
    data: str | Path,
    size: int,
    seed: int,
    shots: int,
    text_field: str,
    label_field: str,
    summary_field: str,
) -> _Job:
    """A seeded random sample of the data file's rows, in the shape the task's scoring reads."""
    from lmforge.data.labelled import format_instruction, read_records

    required = {
        "classify": [text_field, label_field],
        "summarize": [text_field, summary_field],
        "embed": [text_field],
        "generate": [],
    }[task]
    records = read_records(data, required)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen, rest = order[:size], order[size:]
    if task == "generate":
        first = records[0]
        if "messages" in first or ("instruction" in first and "output" in first):
            records = read_records(data, ["messages"] if "messages" in first else ["instruction", "output"])
            rows = [{"messages": format_instruction(records[i])} for i in chosen]
        else:
            records = read_records(data, [text_field])
            rows = [{"text": str(records[i][text_field])} for i in chosen]
        return _Job(task, rows)
    rows = [
        {
            "text": str(records[i][text_field]),
            **({"label": str(records[i][label_field])} if label_field in records[i] else {}),
            **({"summary": str(records[i][summary_field])} if task == "summarize" else {}),
        }
        for i in chosen
    ]
    job = _Job(task, rows)
    if task in ("classify", "embed") and all("label" in r for r in rows):
        job.labels = sorted({str(r[label_field]) for r in records if label_field in r})
    if task == "classify" and len(job.labels) < 2:
        raise LmforgeError(
            f"{data}: only one label ({job.labels[0]!r}) in the data", hint="classification needs two"
        )
    if shots and task == "classify":  # examples from outside the sample, taking the labels in turn
        pools = [[i for i in rest if str(records[i][label_field]) == label] for label in job.labels]
        picks = [pool[k] for k in range(shots) for pool in pools if k < len(pool)][:shots]
        job.examples = [(str(records[i][text_field]), str(records[i][label_field])) for i in picks]
    return job


def _evaluate_candidate(name: str, job: _Job, limit: int, max_latency_ms: float | None) -> Candidate:
    """Size the candidate for the job; if it fits, load it and score it. Its own errors mark only its row."""
    from lmforge.api import LLM
    from lmforge.info import read_header

    candidate = Candidate(name)
    try:
        header = read_header(name)
        candidate.parameters = header.config.num_parameters()
        workload, batch, context = job.workload(header)
        context = min(context, header.config.block_size)
        shell = _shell(header.config, "infer", workload, 8, None, 2, max(2, len(job.labels)))
        needed = _size(header, shell, "infer", workload, context, batch, torch.float32, None, False)
        candidate.memory = needed.peak_bytes
        if candidate.memory > limit:
            candidate.status = (
                f"does not fit: needs {format_size(candidate.memory)}, limit {format_size(limit)}"
            )
            return candidate
        llm = LLM.load(name, dtype="float32", device="cpu")  # as sized above
        candidate.quality, candidate.latency_ms, candidate.details = job.score(llm)
        del llm
        gc.collect()
    except LmforgeError as e:
        candidate.status = f"failed: {e.message}"
        return candidate
    if max_latency_ms is not None and candidate.latency_ms > max_latency_ms:
        candidate.status = f"too slow: {candidate.latency_ms:.0f} > {max_latency_ms:g} {job.latency_unit}"
    return candidate


def _reason(
    ranked: list[Candidate], best: Candidate | None, job: _Job, limit: int, max_latency: float | None
) -> str:
    if best is None:
        why = "; ".join(f"{c.name}: {c.status}" for c in ranked)
        return f"no candidate can be recommended ({why})"
    eligible = [c for c in ranked if c.eligible]
    many = len(eligible) > 1
    where = f"{'fit' if many else 'fits'} in {format_size(limit)}"
    if max_latency:
        where += f" and {'answer' if many else 'answers'} within {max_latency:g} {job.latency_unit}"
    count = f"the {len(eligible)} candidates that {where}" if many else f"the only candidate that {where}"
    if best.quality is None:
        reason = f"fastest of {count} ({best.details.get('note', 'quality not scored')})"
    elif many:
        reason = f"best {job.metric} ({best.quality:.3f}) among {count}"
    else:
        reason = f"{job.metric} {best.quality:.3f}; {count}"
    if (
        len(eligible) > 1
        and best.quality is not None
        and round(best.quality, 6) == round(eligible[1].quality or 0, 6)
    ):
        other = eligible[1]
        if (best.latency_ms or 0) < (other.latency_ms or 0):
            reason += f"; tied with {other.name}, and faster ({best.latency_ms:.1f} vs {other.latency_ms:.1f} {job.latency_unit})"
        else:
            reason += f"; tied with {other.name}, and smaller ({format_size(best.memory or 0)})"
    return reason
