"""Pretraining speed: lmforge's Trainer next to a plain Hugging Face GPT2LMHeadModel + AdamW loop, one run.

    python benchmarks/pretrain.py [--threads 2] [--batch 8] [--warmup 3] [--steps 20] [--row-seconds 40]
                                  [--rounds 2] [--bf16 auto|on|off] [--warm-cache]

The model is nanoGPT's "baby Shakespeare" GPT: 6 layers, 6 heads, 384 dim, 256 context, a character vocabulary
of 65, no dropout, tied embeddings. Both loops train on the same random windows of tinyshakespeare and do the
same work per step: forward with the loss, backward, clip the gradient norm to 1.0, AdamW step, zero grads.

lmforge runs through the real ``Trainer`` (``progress=False``, ``eval_every=0``, a temporary ``out_dir``); its
per-step ``tokens_per_s`` is read back from ``metrics.csv``. The HF loop is timed the same way (drawing the
batch included). A row's figure is the median tokens/s over the timed steps that follow ``--warmup`` untimed
steps, in its best round: other work on a shared machine only ever slows a row down, so the fastest round is
the least disturbed (every round's median is listed too). "Warm-up extra" is how much longer the warm-up
steps took than as many timed steps, in the least disturbed round; with compile on, that is mostly
torch.compile's compilation, from a fresh Inductor cache unless ``--warm-cache``.

The number of timed steps is ``--steps``, lowered (to no fewer than 3) when the HF fp32 warm-up shows that
``--steps`` steps would take longer than ``--row-seconds``, so slow CPUs finish in minutes too; every row uses
the same count. ``--rounds N`` runs all rows N times, interleaved (every other round in reverse order), so a
burst of other work spoils one round of a row rather than the whole row. bf16 rows run when the CPU
multiplies bf16 matrices natively (``--bf16 auto`` probes a GEMM: on CPUs without AVX512-BF16 or AMX,
torch's bf16 GEMM is tens of times slower than fp32 and a bf16 row would take an hour); ``--bf16 on`` forces
them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models
from torch._inductor.utils import fresh_cache
from transformers import GPT2Config, GPT2LMHeadModel

from _data import add_data_option, data_files
from lmforge import Config, Tokenizer, Transformer
from lmforge.data.text import LanguageModelingObjective
from lmforge.train.loop import TrainConfig, Trainer

BLOCK = 256
SEED = 1337
MIN_STEPS = 3


class CharShards:
    """tinyshakespeare as char ids in memory, with TokenShards' ``batch`` signature (nanoGPT's 90/10 split)."""

    def __init__(self, ids: np.ndarray, vocab_size: int, path: Path) -> None:
        cut = int(0.9 * len(ids))
        self.splits = {"train": torch.from_numpy(ids[:cut]), "val": torch.from_numpy(ids[cut:])}
        self.folder = path
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


def load_corpus(path: Path) -> tuple[Tokenizer, CharShards]:
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = np.array([lookup[c] for c in text], dtype=np.int16)
    # A character lookup with no special tokens, so the vocabulary is exactly nanoGPT's 65.
    backend = HFTokenizer(models.BPE(vocab=lookup, merges=[]))
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend), CharShards(ids, len(chars), path)


def lmforge_config(vocab: int) -> Config:
    return Config.from_name("baby-gpt", vocab_size=vocab, dropout=0.0)


def hf_config(vocab: int) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab,
        n_positions=BLOCK,
        n_layer=6,
        n_head=6,
        n_embd=384,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )


class Measurement:
    def __init__(self, step_seconds: list[float], warmup: int) -> None:
        self.warmup_seconds = step_seconds[:warmup]
        self.timed = step_seconds[warmup:]
        extra = sum(self.warmup_seconds) - warmup * statistics.median(self.timed)
        self.warmup_extra = max(extra, 0.0)


def run_lmforge(
    tokenizer: Tokenizer, shards: CharShards, precision: str, compile: bool, args: argparse.Namespace
) -> Measurement:
    torch.manual_seed(SEED)
    if compile:
        torch._dynamo.reset()  # every compiled row pays its own compilation
    cache = fresh_cache() if compile and not args.warm_cache else contextlib.nullcontext()
    model = Transformer(lmforge_config(shards.vocab_size))
    task = LanguageModelingObjective(shards, args.batch, BLOCK, seed=SEED)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as out:
        cfg = TrainConfig(
            out_dir=out,
            max_steps=args.warmup + args.steps,
            micro_batch_size=args.batch,
            precision=precision,  # type: ignore[arg-type]
            compile=compile,
            eval_every=0,
            progress=False,
            device=args.device,
        )
        with cache:
            Trainer(model, tokenizer, task, cfg).fit()
        with (Path(out) / "metrics.csv").open(newline="") as f:
            tokens_per_s = [float(r["tokens_per_s"]) for r in csv.DictReader(f)]
    tokens = args.batch * BLOCK
    return Measurement([tokens / t for t in tokens_per_s], args.warmup)


def run_hf(shards: CharShards, precision: str, args: argparse.Namespace) -> Measurement:
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(hf_config(shards.vocab_size)).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(index: int) -> float:
        start = time.perf_counter()
        x, _ = shards.batch("train", args.batch, BLOCK, SEED, index)
        x = x.to(args.device)
        with torch.autocast(
            torch.device(args.device).type, dtype=torch.bfloat16, enabled=precision == "bf16"
        ):
            loss = model(input_ids=x, labels=x).loss  # HF shifts the labels itself
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())  # waits for the GPU too, so the step is timed whole
        if not math.isfinite(value):
            raise RuntimeError(f"HF loss became {value} at step {index + 1}")
        return time.perf_counter() - start

    seconds = [step(i) for i in range(args.warmup)]
    if args.steps is None:  # the first row decides how many steps fit in --row-seconds
        typical = statistics.median(seconds[1:] or seconds)
        args.steps = min(args.max_steps, max(MIN_STEPS, int(args.row_seconds / typical)))
    seconds += [step(args.warmup + i) for i in range(args.steps)]
    return Measurement(seconds, args.warmup)


def gemm_gflops(dtype: torch.dtype, bursts: int = 5, seconds: float = 0.1) -> float:
    """A (2048 x 1536) @ (1536 x 384) product (the MLP's down projection), best of a few short bursts."""
    a, b = torch.randn(2048, 1536, dtype=dtype), torch.randn(1536, 384, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(bursts):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            a @ b
            count += 1
        best = max(best, 2 * 2048 * 1536 * 384 * count / elapsed / 1e9)
    return best


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
        return "flags unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return "+".join(f for f in wanted if f in flags) or "no avx2/avx512/amx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on cuda the bf16 rows always run)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (compilation happens here)"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row per round (at most)")
    parser.add_argument("--row-seconds", type=float, default=40, help="lower --steps to fit this per row")
    parser.add_argument("--rounds", type=int, default=2, help="run all rows this many times, interleaved")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto")
    parser.add_argument(
        "--warm-cache", action="store_true", help="let torch.compile reuse kernels cached by earlier runs"
    )
    add_data_option(parser)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be at least 1")
    args.max_steps, args.steps = args.steps, None
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    tokenizer, shards = load_corpus(*data_files(args.data, "text/tinyshakespeare.txt"))
    fp32_gflops, bf16_gflops = gemm_gflops(torch.float32), gemm_gflops(torch.bfloat16)
    native_bf16 = args.device.startswith("cuda") or bf16_gflops >= 0.5 * fp32_gflops
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16)

    Row = tuple[str, str, str, Callable[[], Measurement]]
    rows: list[Row] = [
        ("HF GPT2LMHeadModel + AdamW", "fp32", "off", lambda: run_hf(shards, "fp32", args)),
        ("lmforge Trainer", "fp32", "off", lambda: run_lmforge(tokenizer, shards, "fp32", False, args)),
        ("lmforge Trainer", "fp32", "on", lambda: run_lmforge(tokenizer, shards, "fp32", True, args)),
    ]
    bf16_rows: list[Row] = [
        ("HF GPT2LMHeadModel + AdamW", "bf16 autocast", "off", lambda: run_hf(shards, "bf16", args)),
        (
            "lmforge Trainer",
            "bf16 autocast",
            "off",
            lambda: run_lmforge(tokenizer, shards, "bf16", False, args),
        ),
        (
            "lmforge Trainer",
            "bf16 autocast",
            "on",
            lambda: run_lmforge(tokenizer, shards, "bf16", True, args),
        ),
    ]
    measured = rows + bf16_rows if bf16 else rows
    rounds: dict[int, list[float]] = {i: [] for i in range(len(measured))}  # tokens/s, one per round
    extra: dict[int, list[float]] = {i: [] for i in range(len(measured))}
    tokens = args.batch * BLOCK
    started = time.perf_counter()
    for r in range(args.rounds):
        order = list(enumerate(measured))
        for i, (name, precision, compiled, fn) in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            m = fn()
            rounds[i].append(tokens / statistics.median(m.timed))
            extra[i].append(m.warmup_extra)
            print(
                f"  round {r + 1}/{args.rounds}: {name}, {precision}, compile {compiled}: "
                f"{tokens / statistics.median(m.timed):,.0f} tokens/s over {len(m.timed)} steps; warm-up steps "
                f"{', '.join(f'{s:.1f}' for s in m.warmup_seconds)} s; row took {time.perf_counter() - t0:.0f} s",
                flush=True,
            )

    tps = {i: max(rounds[i]) for i in rounds}
    params = Transformer(lmforge_config(shards.vocab_size)).num_parameters()
    hf_attn = GPT2LMHeadModel(hf_config(shards.vocab_size)).config._attn_implementation
    print(
        f"\nbaby-GPT pretraining on tinyshakespeare: {params / 1e6:.2f} M params (6L/6H/384d, context {BLOCK}, "
        f"vocab {shards.vocab_size}), batch {args.batch} x {BLOCK} = {tokens:,} tokens/step"
    )
    print(
        f"CPU: {cpu_model()} ({cpu_features()}), GEMM fp32 {fp32_gflops:.0f} / bf16 {bf16_gflops:.1f} GFLOP/s; "
        f"torch {torch.__version__}, transformers {transformers.__version__} (attention: {hf_attn}); "
        f"{args.threads} threads"
        + (f"; GPU: {torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda") else "")
    )
    print(
        f"tokens/s: median of {args.steps} timed steps (after {args.warmup} warm-up steps) in the best of "
        f"{args.rounds} interleaved round(s); whole run {time.perf_counter() - started:.0f} s\n"
    )
    print("| loop | precision | compile | tokens/s | ms/step | vs HF fp32 | each round | warm-up extra (s) |")
    print("|---|---|---|---:|---:|---:|---|---:|")
    for i, (name, precision, compiled, _) in enumerate(measured):
        each = " / ".join(f"{t:,.0f}" for t in rounds[i])
        print(
            f"| {name} | {precision} | {compiled} | {tps[i]:,.0f} | {1000 * tokens / tps[i]:,.0f} | "
            f"{tps[i] / tps[0]:.2f}x | {each} | {min(extra[i]):.1f} |"
        )
    if not bf16:
        why = (
            f"skipped: bf16 GEMM {bf16_gflops:.1f} GFLOP/s vs fp32 {fp32_gflops:.0f} on this CPU (--bf16 on forces)"
            if args.bf16 == "auto"
            else "skipped (--bf16 off)"
        )
        for name, precision, compiled, _ in bf16_rows:
            print(f"| {name} | {precision} | {compiled} | {why} | | | | |")


if __name__ == "__main__":
    main()
