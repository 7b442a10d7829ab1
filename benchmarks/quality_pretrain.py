"""Pretraining quality on the shared corpora, through the same recipe users call.

    python benchmarks/quality_pretrain.py shakespeare [--steps 2500]   # char-level baby GPT (6L/6H/384d/256 ctx)
    python benchmarks/quality_pretrain.py chinese [--steps 1500]       # byte-level BPE GPT on 宋词 + 鲁迅

Prints steps, minutes, final/best validation loss and samples; the loss curve PNG lands in the run folder.
Data comes from ../shared/data/text (benchmarks and tests may read it; the product never needs it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lmforge import LLM
from lmforge.data.text import prepare_corpus
from lmforge.recipes.pretrain import pretrain
from lmforge.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


def shakespeare(out: Path, steps: int, batch: int) -> tuple[object, str]:
    corpus = DATA / "tinyshakespeare.txt"
    tokenizer = train_tokenizer([corpus], kind="char", show_progress=False)
    prepare_corpus([corpus], tokenizer, out / "data", val_fraction=0.1, show_progress=False)
    result = pretrain(
        out / "data",
        model="baby-gpt",
        model_config={"vocab_size": tokenizer.vocab_size, "dropout": 0.0},
        train={
            "out_dir": str(out / "run"),
            "max_steps": steps,
            "micro_batch_size": batch,
            "lr": 1.5e-3,
            "min_lr": 1e-4,
            "warmup_steps": 100,
            "beta2": 0.99,
            "weight_decay": 0.1,
            "eval_every": 200,
            "eval_batches": 10,
            "sample_prompt": "ROMEO:",
            "sample_tokens": 200,
        },
    )
    return result, "ROMEO:"


def chinese(out: Path, steps: int, batch: int) -> tuple[object, str]:
    corpora = [DATA / "songci.txt", DATA / "luxun.txt"]
    tokenizer = train_tokenizer(corpora, 8000, split_paragraphs=True, show_progress=False)
    prepare_corpus(
        corpora, tokenizer, out / "data", split_paragraphs=True, val_fraction=0.02, show_progress=False
    )
    result = pretrain(
        out / "data",
        model="tiny-gpt2",
        model_config={"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "dropout": 0.0},
        train={
            "out_dir": str(out / "run"),
            "max_steps": steps,
            "micro_batch_size": batch,
            "lr": 1e-3,
            "min_lr": 1e-4,
            "warmup_steps": 100,
            "beta2": 0.99,
            "eval_every": max(1, min(250, steps // 5)),
            "eval_batches": 20,
            "sample_prompt": "东风",
            "sample_tokens": 100,
        },
    )
    return result, "东风"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", choices=["shakespeare", "chinese"])
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/output/{args.corpus}")
    start = time.perf_counter()
    result, prompt = (shakespeare if args.corpus == "shakespeare" else chinese)(out, args.steps, args.batch)
    minutes = (time.perf_counter() - start) / 60
    llm = LLM.load(result.model_dir, dtype="float32", device="cpu")
    print("\n| corpus | steps | batch | minutes | final train loss | final val loss | best val loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.corpus} | {result.steps} | {args.batch} | {minutes:.1f} | {result.train_loss:.3f} | "
        f"{result.val_loss:.3f} | {result.best_val_loss:.3f} |"
    )
    print(f"\nloss curve: {result.model_dir.parent / 'loss.png'}\n")
    for seed in range(2):
        text = llm.generate_text(prompt, max_length=200, temperature=0.8, top_k=50, seed=seed)
        print(f"--- sample {seed} ---\n{prompt}{text}\n")


if __name__ == "__main__":
    main()
