"""The one training loop. Pretraining and every fine-tune are a ``Trainer`` with a different ``Objective``.

An ``Objective`` says how a batch is drawn (deterministically from the step number, so resume needs no data
state) and how a batch becomes a loss. Which parameters train is decided before the Trainer sees the model
(``requires_grad``: all, the last blocks, or LoRA adapters). Everything else exists once, here: AdamW with
sensible weight-decay groups, warmup + cosine schedule, gradient accumulation and clipping, bf16 autocast,
``torch.compile``, activation checkpointing, DDP/FSDP, evaluation, samples, checkpoints with exact resume,
CSV/TensorBoard/PNG metrics and a progress bar.

Evaluation keeps ``checkpoints/best``; with a ``Selection`` (fine-tuning, ``selection.py``) the run ends with
that evaluation's weights (or, with ``average_last``, the mean of the last evaluations' trainable weights, kept
in memory) and may stop early, without one (pretraining) it ends with the last step's.

Failures lose nothing: a NaN/Inf loss or gradient is caught before the optimizer applies it (``on_nan``: stop
the run, or skip that step), so no checkpoint ever holds poisoned weights; a checkpoint that cannot be written
(a full disk) leaves the previous one as it was; ``--resume`` passes over a damaged newest checkpoint to the one
before it, with a warning naming both.

Why one module: the Trainer's steps (fit, evaluate, save, resume) share one run's state (step, optimizer,
selection, the frozen base of a partial run) and one order of events that exact resume depends on; split apart,
each piece would need that state passed around and the order would be spread over files. What stands alone is
already elsewhere: checkpoint files (``checkpoint.py``), best-step selection (``selection.py``), metrics, the
schedule and distributed set-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from lmforge.errors import LmforgeError
from lmforge.formats.folder import atomic_write_folder, write_model_files
from lmforge.generate import SamplingParams, complete
from lmforge.model import Transformer, perplexity_from_loss
from lmforge.progress import progress_bar
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoint, distributed
from lmforge.train.metrics import MetricsLogger
from lmforge.train.schedule import Decay, learning_rate
from lmforge.train.selection import Selection

Batch = dict[str, torch.Tensor]


def _setting(default: Any, help: str, default_help: str | None = None, per_process: bool = False) -> Any:
    """A TrainConfig field; its help text (and what a default of None means) also serves ``--help``.
    ``per_process``: how this process runs, not what the run is (given with ``--resume``, it needs no
    ``--override``)."""
    meta: dict[str, Any] = {"help": help, "per_process": per_process}
    if default_help is not None:
        meta["default_help"] = default_help
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """How the one loop trains. Each field is also a CLI flag (``--max-steps``) and a key of a YAML train:."""

    out_dir: str = _setting(
        "runs/lmforge", "run folder: metrics, checkpoints and the final model/", per_process=True
    )
    max_steps: int = _setting(1000, "optimizer steps")
    micro_batch_size: int = _setting(8, "sequences per forward pass, per process")
    grad_accum: int = _setting(1, "micro-batches per optimizer step")
    block_size: int | None = _setting(None, "tokens per training sequence", "the model's context length")
    lr: float = _setting(6e-4, "peak learning rate")
    min_lr: float | None = _setting(None, "learning rate at the end of the decay", "lr / 10")
    warmup_steps: int = _setting(100, "steps of linear warmup")
    decay: Decay = _setting("cosine", "learning-rate decay after warmup")
    weight_decay: float = _setting(
        0.1, "AdamW weight decay of linear layers (never norms, biases, embeddings)"
    )
    beta1: float = _setting(0.9, "AdamW beta1")
    beta2: float = _setting(0.95, "AdamW beta2")
    grad_clip: float = _setting(1.0, "clip the gradient norm to this; 0 disables clipping")
    precision: Literal["fp32", "bf16"] = _setting("fp32", "fp32, or bf16 autocast")
    compile: bool = _setting(False, "torch.compile the model", per_process=True)
    activation_checkpointing: bool = _setting(
        False, "recompute activations in the backward pass (less memory, more compute)", per_process=True
    )
    seed: int = _setting(1337, "seed of the initial weights and the data order")
    eval_every: int = _setting(100, "steps between evaluations; 0 disables evaluation")
    eval_batches: int | None = _setting(
        None, "validation batches per evaluation", "pretraining: 20; fine-tuning: the whole validation set"
    )
    sample_prompt: str = _setting("", "at each evaluation, print a sample continuing this prompt")
    sample_tokens: int = _setting(64, "tokens per sample")
    save_every: int | None = _setting(None, "steps between checkpoints", "at every evaluation")
    keep_last: int = _setting(2, "newest checkpoints kept (the best one is kept besides)", per_process=True)
    log_every: int = _setting(1, "steps between logged metrics")
    fsdp: bool = _setting(
        False, "shard model, gradients and optimizer state across processes (FSDP)", per_process=True
    )
    device: str = _setting("auto", "auto, cpu, cuda or cuda:N", per_process=True)
    progress: bool = _setting(True, "show a progress bar", per_process=True)
    on_nan: Literal["stop", "skip"] = _setting(
        "stop",
        "a NaN/Inf loss or gradient: stop the run (resume from the last checkpoint), or skip that step "
        "(no update of weights or optimizer state)",
    )

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_steps", "micro_batch_size", "grad_accum", "eval_batches", "log_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            problems.append(f"lr={self.lr} must be > 0")
        if self.precision not in ("fp32", "bf16"):
            problems.append(f"precision={self.precision!r} must be fp32 or bf16")
        if self.decay not in ("cosine", "linear", "constant"):
            problems.append(f"decay={self.decay!r} must be cosine, linear or constant")
        if self.on_nan not in ("stop", "skip"):
            problems.append(f"on_nan={self.on_nan!r} must be stop or skip")
        if problems:
            raise LmforgeError(
                "invalid training settings: " + "; ".join(problems), hint="fix the values named"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LmforgeError(
                f"unknown training settings: {', '.join(unknown)}", hint=f"known: {', '.join(sorted(known))}"
            )
        return cls(**values)


class Objective(Protocol):
    """How batches are drawn and turned into a loss. Pretraining and each kind of fine-tuning implement this."""

    def train_batch(self, index: int, rank: int, world_size: int) -> Batch:
        """Micro-batch number ``index`` for process ``rank`` (a pure function of its arguments)."""
        ...

    def val_batches(self, count: int | None) -> Iterable[Batch]:
        """``count`` validation batches, or all the objective has (None); none: no evaluation."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...

    def loss_terms(self, batch: Batch) -> int:
        """How many terms ``loss`` averages over for ``batch`` (target tokens, rows): its weight in a step."""
        ...

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        """``val_loss`` over ``batches`` and the task's other figures (``accuracy``...); {} for no batches."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the objective trains on, for lineage records."""
        ...


@dataclass
class TrainResult:
    steps: int  # the last step trained (below max_steps when the run stopped early)
    train_loss: float
    val_loss: float | None  # of the last evaluation
    best_val_loss: float | None  # of the best evaluation (the final model's, with a Selection)
    seconds: float
    model_dir: Path
    losses: list[float] = field(default_factory=list)  # per step, for this process's run only (skipped too)
    skipped: list[int] = field(default_factory=list)  # steps skipped for a NaN/Inf loss or gradient
    evaluations: list[dict[str, float]] = field(default_factory=list)  # {"step", "val_loss", ...}, whole run
    best: dict[str, float] | None = None  # the best of them
    stopped_early: bool = False  # the Selection's patience ran out
    # average_last: {"steps": those averaged into the final model, and the mean's validation figures}
    averaged: dict[str, Any] | None = None


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices of linear layers; never norms, biases or embeddings (GPT-2/nanoGPT practice)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        is_embedding = name.split(".")[-2] in ("wte", "wpe") if "." in name else False
        (decay if param.dim() >= 2 and not is_embedding else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = [g for g in optimizer_groups(model, config.weight_decay) if g["params"]]
    if not groups:
        raise LmforgeError("no trainable parameters", hint="unfreeze some layers or add LoRA adapters")
    # The fused kernel (one pass over all parameters) is available on CPU and CUDA in current torch.
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=True)


def _dcp() -> Any:
    """``torch.distributed.checkpoint.state_dict``, imported when a checkpoint is written or read: it pulls in
    DTensor and sympy (~50 MiB resident), which a process that imports lmforge only to decode never needs."""
    import torch.distributed.checkpoint.state_dict as state_dict

    return state_dict


class Trainer:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        objective: Objective,
        config: TrainConfig,
        lineage: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
        *,
        selection: Selection | None = None,
    ) -> None:
        """``lineage``: where the model came from (its ``parent`` names a frozen base in partial checkpoints);
        ``settings``: the recipe's settings, recorded in every checkpoint for ``--resume`` to restore."""
        self.model, self.tokenizer, self.objective, self.config = model, tokenizer, objective, config
        self.lineage = lineage or {}
        self.settings = settings
        self.selection = selection
        self.run_dir = Path(config.out_dir)
        self._trainable: set[str] = set()
        self._base: dict[str, Any] | None = None  # the frozen base of a partial run, once fit() starts
        self._check_fit()

    def _check_fit(self) -> None:
        model_config = self.model.config
        if self.selection and self.selection.average_last and self.config.fsdp:
            raise LmforgeError(
                "--average-last averages whole copies of what trains, and --fsdp shards them across processes",
                hint="drop one of --average-last and --fsdp",
            )
        if self.tokenizer.vocab_size > model_config.vocab_size:
            raise LmforgeError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocabulary is "
                f"{model_config.vocab_size}",
                hint=f"build the model with vocab_size >= {self.tokenizer.vocab_size} (or use its own tokenizer)",
            )
        block = self.config.block_size or model_config.block_size
        if block > model_config.block_size:
            raise LmforgeError(
                f"block_size {block} is longer than the model's context of {model_config.block_size} tokens",
                hint=f"use block_size <= {model_config.block_size}",
            )

    # ----------------------------------------------------------------- running
    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        info = distributed.setup(cfg.device)
        try:
            return self._fit(info, resume)
        finally:
            distributed.cleanup(info)

    def _fit(self, info: distributed.DistInfo, resume: bool) -> TrainResult:
        cfg, model = self.config, self.model
        select = self.selection or Selection()
        model.to(info.device)
        model.gradient_checkpointing = cfg.activation_checkpointing
        optimizer = make_optimizer(model, cfg, info.device)
        self._trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if any(not p.requires_grad for p in model.parameters()):
            # Checkpoints hold only what trains; the rest is the base, known by its source and content.
            state = model.state_dict()
            self._base = {
                "model": self.lineage.get("parent"),
                "sha256": checkpoint.frozen_digest(state, self._trainable),
            }
        start_step, progress = 0, Selection.start()  # what evaluations found, kept in every checkpoint
        if not resume and checkpoint.checkpoints(self.run_dir) and info.is_main:
            raise LmforgeError(
                f"{self.run_dir} already holds checkpoints",
                hint="pass --resume to continue that run, or choose another --out directory",
            )
        wrapped = distributed.wrap(model, info, cfg.fsdp)
        # State dicts go through the wrapper: under FSDP only it knows how to gather and shard them.
        if resume:
            start_step, trainer_state = self._resume(wrapped, optimizer, info)
            progress = {key: trainer_state.get(key, value) for key, value in progress.items()}
        forward_model = torch.compile(wrapped) if cfg.compile else wrapped
        metrics = MetricsLogger(self.run_dir, start_step, enabled=info.is_main)
        save_every = cfg.save_every if cfg.save_every is not None else cfg.eval_every
        bar = progress_bar(
            total=cfg.max_steps, initial=start_step, disable=not (cfg.progress and info.is_main), unit="step"
        )
        losses: list[float] = []
        skipped: list[int] = []
        train_loss = val_loss = float("nan")
        started = time.perf_counter()
        done = start_step
        # average_last: the trainable weights at the last K evaluations, on the CPU (a partial run's are small)
        snapshots: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=select.average_last or 1)
        if select.average_last and resume and info.is_main:
            tqdm.write(
                "warning: --average-last keeps its evaluations' weights in memory: the resumed run averages "
                "only the evaluations from here on",
                file=sys.stderr,
            )
        model.train()
        for step in range(start_step, cfg.max_steps):
            if select.stopped(progress):  # a resumed run that had stopped early stays stopped
                break
            t0 = time.perf_counter()
            lr = self._set_lr(optimizer, step)
            loss, tokens, problem = self._train_step(forward_model, wrapped, optimizer, step, info)
            losses.append(loss)
            done = step + 1
            if problem is not None:
                self._non_finite(problem, done, info)
                skipped.append(done)
            else:
                train_loss = loss
            tokens_per_s = tokens * info.world_size / (time.perf_counter() - t0)
            evaluate = cfg.eval_every > 0 and (done % cfg.eval_every == 0 or done == cfg.max_steps)
            values = self._evaluate(forward_model, info) if evaluate else {}
            if values:
                val_loss = values["val_loss"]
                if select.record(progress, {"step": done, **values}):
                    self._save(wrapped, optimizer, done, progress, info, name="best", val_loss=val_loss)
                if select.average_last:
                    snapshots.append((done, self._trainable_weights()))
                self._sample(model, metrics, done, info)
            if done % cfg.log_every == 0 or values:
                metrics.log(
                    done,
                    loss=None if problem else train_loss,
                    lr=lr,
                    tokens_per_s=tokens_per_s,
                    val_loss=values.get("val_loss"),
                    val_ppl=perplexity_from_loss(values["val_loss"]) if values else None,
                    val_accuracy=values.get("accuracy"),
                    val_macro_f1=values.get("macro_f1"),
                    elapsed_s=round(time.perf_counter() - started, 3),
                )
            stop = select.stopped(progress)
            if save_every and done % save_every == 0 and done != cfg.max_steps and not stop:
                self._save(wrapped, optimizer, done, progress, info)
            if values:
                metrics.plot()
            shown = {"loss": "skipped" if problem else f"{train_loss:.4f}", "tok_s": f"{tokens_per_s:,.0f}"}
            if not math.isnan(val_loss):  # before the first evaluation there is nothing to show
                shown["val"] = f"{val_loss:.4f}"
            bar.set_postfix(shown, refresh=False)  # drawn with the update, at the bar's own interval
            bar.update(1)
            if stop:
                break
        bar.close()
        best = progress["best"]
        self._save(wrapped, optimizer, done, progress, info)  # the last step's: where --resume continues
        averaged = None
        if self.selection is not None and snapshots and select.average_last:
            averaged = self._average(snapshots, forward_model, info)
        elif self.selection is not None and best is not None and best["step"] != done:
            self._load_best(wrapped)
        model_dir = self.run_dir / "model"
        state = self._full_model_state(wrapped, optimizer)  # collective under FSDP: every rank calls it
        if info.is_main:
            model.config.extra["lineage"] = {
                **self.lineage,
                **self.objective.describe(),
                "steps": done,
                # the final weights: the best evaluation's, or the mean of the last ones
                **({"selected": best} if self.selection is not None and best and not averaged else {}),
                **({"averaged": averaged} if averaged else {}),
            }
            with self._resumable():
                atomic_write_folder(
                    model_dir,
                    lambda tmp: write_model_files(tmp, model.config, state, self.tokenizer),
                )
            metrics.plot()
        metrics.close()
        distributed.barrier(info)
        return TrainResult(
            steps=done,
            train_loss=train_loss,
            val_loss=None if math.isnan(val_loss) else val_loss,
            best_val_loss=best["val_loss"] if best else None,
            seconds=time.perf_counter() - started,
            model_dir=model_dir,
            losses=losses,
            skipped=skipped,
            evaluations=progress["evaluations"],
            best=best,
            stopped_early=select.stopped(progress),
            averaged=averaged,
        )

    def _trainable_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of what trains (every rank holds all of it: averaging refuses FSDP's shards)."""
        return {
            n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def _average(
        self,
        snapshots: Iterable[tuple[int, dict[str, torch.Tensor]]],
        forward_model: nn.Module,
        info: distributed.DistInfo,
    ) -> dict[str, Any]:
        """Set what trains to the mean of ``snapshots`` (the frozen rest is the same in all of them) and score
        the mean on validation once: the figures the final model really has."""
        steps, states = zip(*snapshots, strict=True)
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                mean = torch.stack([state[name].double() for state in states]).mean(0)
                param.copy_(mean.to(param.dtype))
        return {"steps": list(steps), **self._evaluate(forward_model, info)}

    def _load_best(self, wrapped: nn.Module) -> None:
        """Put the best evaluation's weights (``checkpoints/best``) back into the model, on every process."""
        # In a partial run (freeze, LoRA) ``best`` holds only what trains; the frozen rest is already in place.
        state = checkpoint.read_weights(
            self.model, self.run_dir / "checkpoints" / "best", {"base": self._base}
        )
        if self.model.config.tie_embeddings and "wte.weight" in state:
            state["lm_head.weight"] = state["wte.weight"]
        options = _dcp().StateDictOptions(full_state_dict=True, strict=self._base is None)
        _dcp().set_model_state_dict(wrapped, state, options=options)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _set_lr(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        cfg = self.config
        lr = learning_rate(
            step,
            lr=cfg.lr,
            min_lr=cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10,
            warmup=cfg.warmup_steps,
            total=cfg.max_steps,
            decay=cfg.decay,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _train_step(
        self,
        forward_model: nn.Module,
        wrapped: nn.Module,
        optimizer: torch.optim.Optimizer,
        step: int,
        info: distributed.DistInfo,
    ) -> tuple[float, int, str | None]:
        """One optimizer step: the mean loss, the tokens this process read (padding excluded), and what was
        not finite (then no update was applied: weights and optimizer state are as before), or None."""
        cfg = self.config
        total = torch.zeros((), device=info.device)
        micro_losses = []
        tokens = 0
        first = step * cfg.grad_accum  # the data order's number of this step's first micro-batch
        terms = 0  # what this process's losses average over (target tokens, rows)
        for micro in range(cfg.grad_accum):
            batch = self.objective.train_batch(first + micro, info.rank, info.world_size)
            count = self.objective.loss_terms(batch)
            terms += count
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            batch = {k: v.to(info.device) for k, v in batch.items()}
            last = micro == cfg.grad_accum - 1
            # Gradients are averaged across processes only once per step, on the last micro-batch.
            sync = contextlib.nullcontext() if last or not info.distributed else wrapped.no_sync()
            with sync, self._autocast(info.device):
                loss = self.objective.loss(forward_model, batch) * count  # the sum over its terms
                loss.backward()
            total += loss.detach()
            micro_losses.append(loss.detach())
        total *= self._to_step_mean(terms, info)
        # The norm is wanted even without clipping, to catch an Inf/NaN gradient behind a finite loss; a
        # max_norm of inf scales by exactly 1.0, which leaves every finite gradient as it was.
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        if isinstance(wrapped, nn.Module) and hasattr(wrapped, "clip_grad_norm_"):
            norm = wrapped.clip_grad_norm_(max_norm)  # FSDP: over all shards, the same on every rank
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        mean = distributed.mean_across(total, info)  # every rank sees the same loss and norm: one decision
        problem, bad = None, []
        if not math.isfinite(mean):
            problem = f"non-finite loss ({mean})"
            losses = torch.stack(micro_losses).tolist()
            bad = [first + i for i, x in enumerate(losses) if not math.isfinite(x)]
        elif not math.isfinite(float(norm)):
            problem = f"non-finite gradient norm ({float(norm)})"
        if problem is None:
            optimizer.step()
        else:  # the batch that gave it when this process saw one, else all of the step's
            bad = bad[:1] or list(range(first, first + cfg.grad_accum))
            problem += f" in batch {bad[0]}" if len(bad) == 1 else f" in batches {bad[0]}-{bad[-1]}"
        optimizer.zero_grad(set_to_none=True)
        return mean, tokens, problem

    def _to_step_mean(self, terms: int, info: distributed.DistInfo) -> float:
        """Divide the step's gradients (of summed losses) by its terms on every process; return the factor.

        The step then follows the mean over all its terms (target tokens, rows), as one process holding the
        whole batch would, however they fall into micro-batches and processes. Instruction data's targets vary
        by example: a mean of each micro-batch's mean would weigh a token of a short-answer micro-batch more.
        DDP and FSDP average gradients over processes, hence the factor of their number."""
        everywhere = round(distributed.sum_across(torch.tensor(float(terms), device=info.device), info))
        scale = info.world_size / everywhere if everywhere else 1.0  # no term anywhere: the loss is NaN
        for parameter in self.model.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(scale)
        return scale

    def _non_finite(self, problem: str, step: int, info: distributed.DistInfo) -> None:
        """Stop (the default) or, with ``on_nan: skip``, warn and go on: the step's update was not applied."""
        where = f"{problem} at step {step}"
        if self.config.on_nan == "stop":
            raise LmforgeError(
                f"{where}: the run stopped without applying it",
                hint=f"{self._resume_hint()}; lower the learning rate, use fp32 or gradient clipping, or pass "
                "--on-nan skip to skip such steps",
            )
        if info.is_main:
            tqdm.write(
                f"warning: {where}: step skipped (weights and optimizer state unchanged)", file=sys.stderr
            )

    @torch.no_grad()
    def _evaluate(self, forward_model: nn.Module, info: distributed.DistInfo) -> dict[str, float]:
        self.model.eval()
        batches = (
            {k: v.to(info.device) for k, v in batch.items()}
            for batch in self.objective.val_batches(self.config.eval_batches)
        )
        with self._autocast(info.device):
            values = self.objective.evaluate(forward_model, batches)
        self.model.train()
        return values

    def _sample(
        self, model: Transformer, metrics: MetricsLogger, step: int, info: distributed.DistInfo
    ) -> None:
        if not self.config.sample_prompt or not info.is_main or self.config.fsdp:
            return
        model.eval()
        prompt = self.tokenizer.encode(self.config.sample_prompt) or [self.tokenizer.eos_id or 0]
        # A private generator: sampling must not move the global RNG, or resumed runs would diverge.
        params = SamplingParams(
            max_new_tokens=self.config.sample_tokens, temperature=0.8, top_k=50, seed=step
        )
        text = complete(model, self.tokenizer, [prompt], params, [])[0].text
        model.train()
        metrics.text("sample", self.config.sample_prompt + text, step)
        tqdm.write(f"[step {step}] {self.config.sample_prompt}{text}")

    # ------------------------------------------------------------- checkpoints
    def _state_options(self) -> Any:  # a StateDictOptions
        # Full (unsharded) tensors. Offload only from an accelerator: FSDP's gather with offload on a CPU
        # model (rank0_only) segfaults in torch 2.x, and the tensors are in CPU memory already.
        return _dcp().StateDictOptions(full_state_dict=True, cpu_offload=self.model.device.type != "cpu")

    def _full_model_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, torch.Tensor]:
        state, _ = _dcp().get_state_dict(model, optimizer, options=self._state_options())
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    def _save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        step: int,
        progress: dict[str, Any],
        info: distributed.DistInfo,
        name: str | None = None,
        val_loss: float | None = None,
    ) -> None:
        model_state, optim_state = _dcp().get_state_dict(model, optimizer, options=self._state_options())
        if info.is_main:
            folder = self.run_dir / "checkpoints" / (name or f"step-{step:06d}")
            best = progress["best"]
            trainer_state = {
                "step": step,
                "best_val_loss": best["val_loss"] if best else None,
                "val_loss": val_loss,
                **progress,
                "train_config": dataclasses.asdict(self.config),
                "settings": self.settings,
                "world_size": info.world_size,
                "base": self._base,
            }
            if self._base is not None:
                model_state = {k: v for k, v in model_state.items() if k in self._trainable}
            with self._resumable():
                checkpoint.save_checkpoint(
                    folder,
                    model_state=model_state,
                    config=self.model.config,
                    tokenizer=self.tokenizer,
                    optimizer_state=None if name == "best" else optim_state,  # best is no resume point
                    trainer_state=trainer_state,
                )
            if name is None:
                checkpoint.prune(self.run_dir, self.config.keep_last)
        distributed.barrier(info)

    @contextlib.contextmanager
    def _resumable(self) -> Iterator[None]:
        """A failed save (a full disk) left the earlier checkpoints intact: its error says where to go on."""
        try:
            yield
        except LmforgeError as e:
            raise LmforgeError(e.message, hint=f"{e.hint}; {self._resume_hint()}") from None

    def _resume_hint(self) -> str:
        """Where ``--resume`` would continue, for the errors that stop a run."""
        last = checkpoint.checkpoints(self.run_dir)
        return f"`--resume` continues from {last[-1][1]}" if last else "no checkpoint was written yet"

    def _resume(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, info: distributed.DistInfo
    ) -> tuple[int, dict[str, Any]]:
        checkpoint.remove_partial(self.run_dir)
        found = checkpoint.checkpoints(self.run_dir)
        if not found:
            raise LmforgeError(
                f"nothing to resume in {self.run_dir}: no checkpoints", hint="start without --resume"
            )
        # Newest first; a damaged one (truncated by a crash outside our atomic writes, a bad disk) is passed
        # over for the one before it, so one bad file costs the steps since that one, not the run.
        damaged: list[str] = []
        for _, folder in reversed(found):
            try:
                trainer_state, optim_state, rng = checkpoint.read_checkpoint(folder)
                model_state = checkpoint.read_weights(self.model, folder, trainer_state)
                break
            except LmforgeError as e:
                damaged.append(e.message)
        else:
            raise LmforgeError(
                f"every checkpoint in {self.run_dir / 'checkpoints'} is damaged; the newest: {damaged[0]}",
                hint="start the run again without --resume, in another --out folder",
            )
        if damaged and info.is_main:
            tqdm.write(f"warning: {'; '.join(damaged)}; resuming from {folder} instead", file=sys.stderr)
        checkpoint.check_base(trainer_state.get("base"), self._base, folder)
        if self.model.config.tie_embeddings and "wte.weight" in model_state:
            model_state["lm_head.weight"] = model_state["wte.weight"]
        # A partial checkpoint sets only what trains; the frozen rest is the base loaded, checked above.
        options = _dcp().StateDictOptions(full_state_dict=True, strict=trainer_state.get("base") is None)
        _dcp().set_state_dict(
            model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options
        )
        checkpoint.set_rng_state(rng)
        return int(trainer_state["step"]), trainer_state
