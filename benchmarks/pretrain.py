"""Pretraining speed: lmforge's Trainer next to a plain Hugging Face GPT2LMHeadModel + AdamW loop, one run.

    python benchmarks/pretrain.py [--threads 2] [--batch 8] [--warmup 5] [--steps 20] [--rounds 1]

The model is nanoGPT's "baby Shakespeare" GPT: 6 layers, 6 heads, 384 dim, 256 context, character vocabulary
of 65, no dropout, tied embeddings. Both loops train on the same random windows of tinyshakespeare and do the
same work per step: forward with the loss, backward, clip the gradient norm to 1.0, AdamW step, zero grads.

lmforge runs through the real ``Trainer`` (``progress=False``, ``eval_every=0``, a temporary ``out_dir``); its
per-step ``tokens_per_s`` is read back from ``metrics.csv``. The HF loop is timed the same way (batch drawing
included). Each figure is the median tokens/s over the ``--steps`` steps that follow ``--warmup`` steps; the
warm-up column is the time the warm-up steps took beyond ``warmup`` ordinary steps (mostly torch.compile's
compilation when it is on). ``--rounds N`` runs every row N times, interleaved, and pools the timed steps,
so a machine shared with other work penalises every row alike.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models
from transformers import GPT2Config, GPT2LMHeadModel

from lmforge import Config, Tokenizer, Transformer
from lmforge.train.loop import LanguageModelingTask, Trainer, TrainConfig

DATA = Path("/work/shared/data/text/tinyshakespeare.txt")
BLOCK = 256
SEED = 1337


class CharShards:
    """tinyshakespeare as char ids in memory, with TokenShards' ``batch`` signature (nanoGPT's 90/10 split)."""

    def __init__(self, ids: np.ndarray, vocab_size: int) -> None:
        cut = int(0.9 * len(ids))
        self.splits = {"train": torch.from_numpy(ids[:cut]), "val": torch.from_numpy(ids[cut:])}
        self.folder = DATA
        self.meta = {"tokens": {k: len(v) for k, v in self.splits.items()}, "tokenizer_sha256": None}
        self.vocab_size = vocab_size

    def batch(
        self, split: str, batch_size: int, block_size: int, seed: int = 0, step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.splits[split]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen)
        windows = torch.stack([data[s : s + block_size + 1] for s in starts.tolist()]).long()
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def load_corpus() -> tuple[Tokenizer, CharShards]:
    text = DATA.read_text(encoding="utf-8")
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = np.array([lookup[c] for c in text], dtype=np.int16)
    # A 65-entry character lookup with no special tokens, so the vocabulary is exactly nanoGPT's 65.
    backend = HFTokenizer(models.BPE(vocab=lookup, merges=[]))
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend), CharShards(ids, len(chars))


def model_config(vocab: int) -> Config:
    return Config.from_name("baby-gpt", vocab_size=vocab, dropout=0.0)


def summarise(step_seconds: list[float], warmup: int) -> tuple[list[float], float]:
    """Timed step seconds, and the warm-up steps' extra seconds over as many median steps."""
    timed = step_seconds[warmup:]
    extra = sum(step_seconds[:warmup]) - warmup * statistics.median(timed)
    return timed, max(extra, 0.0)


def run_lmforge(
    tokenizer: Tokenizer, shards: CharShards, precision: str, compile: bool, args: argparse.Namespace
) -> tuple[list[float], float]:
    torch.manual_seed(SEED)
    if compile:
        torch._dynamo.reset()
    model = Transformer(model_config(shards.vocab_size))
    task = LanguageModelingTask(shards, args.batch, BLOCK, seed=SEED)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as out:
        cfg = TrainConfig(
            out_dir=out,
            max_steps=args.warmup + args.steps,
            micro_batch_size=args.batch,
            precision=precision,  # type: ignore[arg-type]
            compile=compile,
            eval_every=0,
            progress=False,
            device="cpu",
        )
        Trainer(model, tokenizer, task, cfg).fit()
        with (Path(out) / "metrics.csv").open(newline="") as f:
            tokens_per_s = [float(r["tokens_per_s"]) for r in csv.DictReader(f)]
    tokens = args.batch * BLOCK
    return summarise([tokens / t for t in tokens_per_s], args.warmup)


def run_hf(shards: CharShards, precision: str, args: argparse.Namespace) -> tuple[list[float], float]:
    torch.manual_seed(SEED)
    config = GPT2Config(
        vocab_size=shards.vocab_size,
        n_positions=BLOCK,
        n_layer=6,
        n_head=6,
        n_embd=384,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    seconds = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        x, _ = shards.batch("train", args.batch, BLOCK, SEED, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=x, labels=x).loss  # HF shifts the labels itself
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss)
        seconds.append(time.perf_counter() - start)
        if not np.isfinite(loss_value):
            raise RuntimeError(f"HF loss became {loss_value} at step {step + 1}")
    return summarise(seconds, args.warmup)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_features() -> str:
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return "?"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row per round")
    parser.add_argument("--rounds", type=int, default=1, help="run all rows this many times, interleaved")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer, shards = load_corpus()
    hf_attn = GPT2LMHeadModel(
        GPT2Config(vocab_size=65, n_positions=BLOCK, n_layer=1, n_head=6, n_embd=384)
    ).config._attn_implementation

    rows: list[tuple[str, str, str, Any]] = [
        ("HF GPT2LMHeadModel + AdamW", "fp32", "off", lambda: run_hf(shards, "fp32", args)),
        ("lmforge Trainer", "fp32", "off", lambda: run_lmforge(tokenizer, shards, "fp32", False, args)),
        ("lmforge Trainer", "bf16 autocast", "off", lambda: run_lmforge(tokenizer, shards, "bf16", False, args)),
        ("HF GPT2LMHeadModel + AdamW", "bf16 autocast", "off", lambda: run_hf(shards, "bf16", args)),
        ("lmforge Trainer", "fp32", "on", lambda: run_lmforge(tokenizer, shards, "fp32", True, args)),
        ("lmforge Trainer", "bf16 autocast", "on", lambda: run_lmforge(tokenizer, shards, "bf16", True, args)),
    ]
    timed: dict[int, list[float]] = {i: [] for i in range(len(rows))}
    warm: dict[int, list[float]] = {i: [] for i in range(len(rows))}
    started = time.perf_counter()
    for r in range(args.rounds):
        for i, (name, precision, compiled, fn) in enumerate(rows):
            t0 = time.perf_counter()
            seconds, extra = fn()
            timed[i] += seconds
            warm[i].append(extra)
            print(
                f"  round {r + 1}/{args.rounds} {name}, {precision}, compile {compiled}: "
                f"{args.batch * BLOCK / statistics.median(seconds):,.0f} tokens/s "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )

    tokens = args.batch * BLOCK
    tps = {i: tokens / statistics.median(timed[i]) for i in timed}
    hf32 = tps[0]
    params = Transformer(model_config(shards.vocab_size)).num_parameters()
    print(
        f"\nbaby-GPT pretraining ({params / 1e6:.2f} M params: 6L/6H/384d, context {BLOCK}, vocab "
        f"{shards.vocab_size}), batch {args.batch} x {BLOCK} = {tokens} tokens/step, tinyshakespeare"
    )
    print(
        f"CPU: {cpu_model()} ({cpu_features()}); torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {args.threads} threads; HF attention: {hf_attn}"
    )
    print(
        f"median over {args.steps * args.rounds} timed steps per row ({args.rounds} round(s) x {args.steps}, "
        f"each after {args.warmup} warm-up steps); total {time.perf_counter() - started:.0f} s\n"
    )
    print("| loop | precision | compile | tokens/s | ms/step | vs HF fp32 | warm-up extra s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for i, (name, precision, compiled, _) in enumerate(rows):
        ms = 1000 * statistics.median(timed[i])
        extra = statistics.median(warm[i])
        print(
            f"| {name} | {precision} | {compiled} | {tps[i]:,.0f} | {ms:.0f} | {tps[i] / hf32:.2f}x | {extra:.1f} |"
        )


if __name__ == "__main__":
    main()
