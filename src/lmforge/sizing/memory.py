"""The memory model: peak resident memory (RSS, CPU) of a workload, part by part, from file headers only.

What the code really holds, counted on a model shell (the network on the meta device: shapes, no storage):

- runtime: a Python process with torch and lmforge imported and warmed up (measured once, ``measure.py``), and
  for compiled decoding what building the ``torch.compile``d step adds (measured once too).
- weights as ``LLM.load(quant=...)`` holds them, packed layers at their packed size, and what loading holds on
  top (``weights.py``: the loader's own rules). Fine-tuning always holds fp32 weights (``finetune`` loads
  float32).
- training: AdamW's two moments for the parameters the method trains (decided by ``choose_trainable`` on the
  shell: the same code fine-tuning runs), the tensors autograd saves for backward (``saved_per_token``:
  measured by running the real modules on fake tensors, never a copy of their rules) and gradients, at the
  moment of the backward pass where their sum peaks (``_backward_peak``).
- inference: the KV cache (generation sizes it to the request: prompt + new tokens rounded up to
  ``generate.CACHE_BUCKET``), one block's temporaries (a prompt is prefilled ``PREFILL_CHUNK`` tokens at a
  time), and the logits the workload keeps.

Not counted: the user's tokenized dataset, and heap memory the C allocator keeps after tensors are freed
(a few percent of the activations in our measurements).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

# Fake tensors carry shape, dtype and device but no storage, and run each operator's real dispatch (so SDPA
# picks the kernel it picks on a CPU). torch.compile and torch.export build on them; the module is private.
from torch._subclasses.fake_tensor import FakeTensorMode

from lmforge.config import Config
from lmforge.errors import LmforgeError, UnsupportedError
from lmforge.generate import CACHE_BUCKET, PREFILL_CHUNK, cache_length
from lmforge.info import ModelHeader
from lmforge.loading import build_network
from lmforge.lora import LoRAConfig
from lmforge.model import Network, shell_device
from lmforge.sizing.measure import PROBE, compile_overhead, runtime_baseline
from lmforge.sizing.units import Component, MiB, format_size
from lmforge.sizing.weights import held_weights, load_transient
from lmforge.train.methods import add_classifier, choose_trainable

MODES = ("infer", "full", "freeze", "lora")
# What the model computes. Inference: decode with a KV cache (generate), log-likelihoods over whole sequences
# (score: zero-shot classification, perplexity), a head on the last token (classify), hidden states (embed).
# Training: next-token loss on every position (generate: instruct, summarize, pretrain) or a head (classify).
WORKLOADS = {"infer": ("generate", "score", "classify", "embed"), "train": ("generate", "classify")}
FP32 = 4
# `tokenizers` holds the vocabulary and merges as Rust maps: measured 18 MiB for SmolLM2's 49k-entry vocabulary
# read from GGUF and 29 MiB from its tokenizer.json, so about half a kilobyte per entry.
TOKENIZER_BYTES_PER_ENTRY = 512
PROBE_TOKENS = 8  # tokens per sequence when measuring what autograd saves (on fake tensors: any size is free)
# Compiling the decode step holds more the more blocks its graph has (dynamo's and inductor's graphs, IR and
# generated code). Measured with an empty compile cache, decode steps of 2, 8 and 30 blocks of a tiny model
# took 136, 153 and 228 MiB, SmolLM2's 30 blocks ~207 MiB: ~3 MiB a block beyond the measured 2-block probe
# (with the kernels cached, later runs hold about half of that).
COMPILE_BYTES_PER_LAYER = 3 * MiB


# ------------------------------------------------------------------ results
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
    quant: str = "none"  # how the weights are loaded: LLM.load's quant, as load_quant resolves it
    packing: str = ""  # which layers are packed how, when any are

    @property
    def peak_bytes(self) -> int:
        return sum(c.bytes for c in self.components)

    def table(self) -> str:
        what = f"{self.mode}" + (f" ({self.task})" if self.task != "generate" or self.mode != "infer" else "")
        lines = [
            f"{self.model}: {what}, batch {self.batch} x context {self.context}, {self.dtype}"
            + (f" ({self.packing})" if self.packing else "")
            + f", {self.parameters / 1e6:.1f}M parameters"
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


def check_choice(name: str, value: str, *, allowed: Sequence[str], context: str = "") -> None:
    if value not in allowed:
        raise LmforgeError(
            f"unknown {name} {value!r}" + (f" {context}" if context else ""),
            hint=f"use {' | '.join(allowed)}",
        )


# -------------------------------------------------------------- the shell
def model_shell(
    config: Config,
    mode: str,
    *,
    task: str,
    lora_rank: int = 8,
    lora_targets: Sequence[str] | None = None,
    train_last_blocks: int = 2,
    num_labels: int = 2,
) -> Network:
    """The model on the meta device (no memory), with fine-tuning's own choice of what trains."""
    # An encoder embeds, and classifies once it has a trained head (no zero-shot: it cannot score text). Its
    # training is not sized: the activation model below is the decoder's.
    classifies = task == "classify" and bool(config.labels)
    if config.is_encoder and not (mode == "infer" and (classifies or task == "embed")):
        raise UnsupportedError(
            f"this model is a sentence encoder: it embeds (and classifies with a fine-tuned head), so "
            f"{mode} / {task} is not sized",
            hint="size it with --task embed, or --task classify once it has a classification head",
        )
    config = config.replace(extra=dict(config.extra))  # inject_lora records itself in the config
    with shell_device():
        net = build_network(config)
        if task == "classify":
            add_classifier(net, [str(i) for i in range(num_labels)], regression=False, seed=0)
    if mode == "infer":
        net.requires_grad_(False)
    else:
        targets = list(lora_targets) if lora_targets else LoRAConfig().targets
        choose_trainable(net, mode, train_last_blocks, LoRAConfig(rank=lora_rank, targets=targets))
    return net


def _unique_parameters(net: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in net.parameters()}.values())  # a tied head is one tensor


# ------------------------------------------------------------- the total
def size_memory(
    header: ModelHeader,
    net: Network,
    *,
    mode: str,
    task: str,
    context: int,
    batch: int,
    dtype: torch.dtype,
    quant: str = "none",
    compile: bool = False,
    checkpointing: bool = False,
) -> Estimate:
    """The memory part of ``estimate``, for a model shell whose ``requires_grad`` says what trains.

    ``quant`` is ``LLM.load``'s, resolved by ``load_quant``: how the weights are held. ``compile``: the
    workload runs a compiled decode step (inference only).
    """
    training = mode != "infer"
    config = header.config
    width = torch.empty((), dtype=dtype).element_size()
    dtype_name = str(dtype).removeprefix("torch.")
    params = _unique_parameters(net)
    count = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    held = held_weights(header, net, quant=quant, width=width)
    vocab = header.tokenizer.vocab_size
    components = [
        Component(
            "runtime (python, torch, lmforge)",
            runtime_baseline()["train" if training else "infer"],
            "measured once in a subprocess",
        ),
        Component("tokenizer", vocab * TOKENIZER_BYTES_PER_ENTRY, f"{vocab:,} entries"),
        Component("weights", held.bytes, held.note(dtype_name)),
    ]
    load = load_transient(header, held, dtype=dtype, parameters=count)
    if training:
        work, moment = _training_peak(net, task, tokens=batch * context, checkpointing=checkpointing)
        work.insert(0, Component("AdamW moments", 2 * trainable * FP32, f"2 x {trainable:,} trained params"))
    else:
        work, moment = _inference_peak(config, task, batch=batch, context=context, width=width)
        if compile:
            layers = max(0, config.n_layer - PROBE.n_layer)
            work.append(
                Component(
                    "compiled decode step",
                    compile_overhead() + layers * COMPILE_BYTES_PER_LAYER,
                    f"torch.compile: measured on a {PROBE.n_layer}-block model, + {layers} blocks x "
                    f"{COMPILE_BYTES_PER_LAYER // MiB} MiB (a first compile; cached kernels hold less)",
                )
            )
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
        components, phase, notes=notes, quant=quant, packing=held.packing(),
    )  # fmt: skip


# ---------------------------------------------------------------- inference
def _inference_peak(
    config: Config, task: str, *, batch: int, context: int, width: int
) -> tuple[list[Component], str]:
    tokens = batch * context
    C, V = config.n_embd, config.vocab_size
    # One block in inference mode keeps only its temporaries: the residual stream, the normalised input and
    # (gated MLP) act(gate), up and their product, or (GPT-2) up and act(up).
    mlp = (3 if config.gated_mlp else 2) * config.intermediate_size
    if task == "generate":
        # The prompt is prefilled PREFILL_CHUNK tokens at a time, into a cache sized to the request.
        chunk = batch * min(context, PREFILL_CHUNK)
        cached = cache_length(context, config.block_size)
        kv = batch * cached * config.n_layer * config.n_kv_head * config.head_dim * 2 * width
        return [
            Component(
                "KV cache",
                kv,
                f"{batch} x {cached} tokens (prompt + new, in steps of {CACHE_BUCKET}) x {config.n_layer} "
                f"layers x {config.n_kv_head} kv heads x {config.head_dim} x 2",
            ),
            Component(
                "activations (one block)", chunk * (2 * C + mlp) * width, f"{chunk:,} prompt tokens at a time"
            ),
            Component("logits", batch * V * (width + FP32), "last position only, as float32"),
        ], "generate"
    parts = [
        Component(
            "activations (one block)", tokens * (2 * C + mlp) * width, f"{tokens:,} tokens, freed per block"
        )
    ]
    if task == "score":
        # sequence_logprobs: logits for every position and their float32 log-softmax (a float copy first
        # when the model runs in 16 bits)
        per_token = V * (width + FP32 + (FP32 if width != FP32 else 0))
        logits = Component("logits + log-probabilities", tokens * per_token, "every position, as float32")
        # The batch runs through a KV cache, from which LLM's prefix cache keeps the prompts' blocks.
        kv = tokens * config.n_layer * config.n_kv_head * config.head_dim * 2 * width
        cache = Component("KV cache", kv, f"{tokens:,} tokens (the prefix cache's blocks come from it)")
        return ([logits] if logits.bytes > parts[0].bytes else parts) + [cache], "scoring"
    hidden = Component("hidden states (float32)", tokens * C * FP32, "pooled or read at the last token")
    return parts + [hidden], "forward"


# ---------------------------------------------- what autograd saves (measured)
Phase = int | str  # a block's index, "outside" the blocks, or "loss"


def saved_bytes(net: Network, task: str, *, rows: int, tokens: int) -> dict[Phase, int]:
    """Bytes autograd saves for backward in one forward pass of ``rows`` x ``tokens`` token ids through
    ``net`` as it is (real tensors, or fake ones inside a ``FakeTensorMode``), by where they are saved: in
    block i, "outside" the blocks, or "loss" (the log-probabilities of next-token prediction).

    A storage counts once, however many tensors view it; the weights and buffers are not counted (they are
    the weights). A storage saved in two places (RoPE's cos/sin, made once and kept by every block that
    trains) is outside; kept by one block only, it is that block's, and freed with it. The loss's integer
    targets are counted outside: backward makes no gradient for them.
    """
    phase: list[Phase] = ["outside"]  # where the forward pass is now

    def move_to(where: Phase) -> Callable[..., None]:
        def hook(*_: object) -> None:
            phase[0] = where

        return hook

    hooks = [block.register_forward_pre_hook(move_to(i)) for i, block in enumerate(net.blocks)]
    hooks += [block.register_forward_hook(move_to("outside")) for block in net.blocks]
    if task == "generate":  # what the lm_head's logits become is the loss
        hooks.append(net.lm_head.register_forward_hook(move_to("loss")))
    weights = {t.untyped_storage()._cdata for t in [*net.parameters(), *net.buffers()]}
    owner: dict[int, Phase] = {}
    size: dict[int, int] = {}
    held: list[torch.Tensor] = []  # keeps storages alive, so that their ids stay unique

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in weights:
            return tensor
        held.append(tensor)
        where = phase[0] if phase[0] != "loss" or tensor.is_floating_point() else "outside"
        owner[key] = where if owner.get(key, where) == where else "outside"
        size[key] = storage.nbytes()
        return tensor

    ids = torch.zeros(rows, tokens, dtype=torch.long)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            if task == "generate":
                net(ids, targets=ids.clone())
            elif task == "classify":
                net.classify(ids)
            else:
                net.hidden_states(ids)
    finally:
        for hook in hooks:
            hook.remove()
    totals: dict[Phase, int] = {}
    for key, where in owner.items():
        totals[where] = totals.get(where, 0) + size[key]
    return totals


def _fake_weights(net: nn.Module) -> None:
    """Replace a meta-device network's weights by fake CPU tensors of the current ``FakeTensorMode`` (same
    shapes, dtypes, ``requires_grad`` and tying)."""
    made: dict[int, torch.Tensor] = {}
    for module in net.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) not in made:
                    fake = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
                    if isinstance(tensor, nn.Parameter):
                        fake = nn.Parameter(fake, requires_grad=tensor.requires_grad)
                    made[id(tensor)] = fake
                table[name] = made[id(tensor)]


def saved_per_token(net: Network, task: str) -> tuple[list[int], int, int, bool]:
    """Bytes per token that autograd saves in fp32 training: per block, outside the blocks, and the loss's
    log-probabilities; and whether the embedding trains. ``net`` is a meta-device shell.

    Measured, not modelled: a fake-tensor twin of the shell runs the real forward pass (``saved_bytes``) for
    one and for two sequences of PROBE_TOKENS tokens. The difference is one sequence's worth, and everything
    in it grows with the tokens; what the rows share (GPT-2's position ids) and the loss's scalars cancel out.
    The twin runs in eval mode, i.e. without dropout: with dropout SDPA falls back to a kernel that keeps the
    T x T attention weights, which a per-token count cannot hold (models read from Hugging Face or GGUF files
    have no dropout; a config that sets it is estimated as if it had none).
    """
    twin = copy.deepcopy(net).eval()  # meta tensors: copied for free
    with FakeTensorMode():
        _fake_weights(twin)
        one, two = (saved_bytes(twin, task, rows=rows, tokens=PROBE_TOKENS) for rows in (1, 2))
    per_token = {where: (two.get(where, 0) - one.get(where, 0)) // PROBE_TOKENS for where in {*one, *two}}
    blocks = [per_token.get(i, 0) for i in range(len(net.blocks))]
    return blocks, per_token.get("outside", 0), per_token.get("loss", 0), net.wte.weight.requires_grad


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


def _training_peak(
    net: Network, task: str, *, tokens: int, checkpointing: bool
) -> tuple[list[Component], str]:
    stage = _backward_peak(net, task, tokens=tokens, checkpointing=checkpointing)
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


def _backward_peak(net: Network, task: str, *, tokens: int, checkpointing: bool) -> _Stage:
    """Walk the backward pass and return the moment where saved activations + gradients + temporaries peak.

    Backward frees each block's saved tensors after its gradients are made, so the peak is either at the loss
    (everything saved, plus the loss's gradients) or where a large gradient appears, such as the embedding's.
    """
    config = net.config
    blocks, outside, loss_bytes, embedding_trains = saved_per_token(net, task)
    grads = {
        i: sum(p.numel() for p in block.parameters() if p.requires_grad) * FP32
        for i, block in enumerate(net.blocks)
    }
    C, V = config.n_embd, config.vocab_size
    if checkpointing:  # each block keeps only its input; backward recomputes one block at a time
        kept = [tokens * C * FP32 if b else 0 for b in blocks]
    else:
        kept = [tokens * b for b in blocks]
    loss = tokens * loss_bytes
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
