"""Pretraining quality on the shared corpora, through the same recipe users call.

    python benchmarks/quality_pretrain.py shakespeare [--steps 2500]   # char-level baby GPT (6L/6H/384d/256 ctx)
    python benchmarks/quality_pretrain.py chinese [--steps 1500]       # byte-level BPE GPT on 宋词 + 鲁迅
    python benchmarks/quality_pretrain.py shakespeare --out DIR --evaluate DIR/run/checkpoints/step-2000

Prints steps, minutes, final/best validation loss and samples; the loss curve PNG lands in the run folder.
Data comes from ../shared/data/text, or --data DIR laid out the same (benchmarks may read it; the product never
needs it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _data import add_data_option, data_files
from lmforge import LLM
from lmforge.data.text import TokenShards, prepare_corpus
from lmforge.recipes.pretrain import pretrain
from lmforge.tokenizer import train_tokenizer


def shakespeare(
    data: Path, out: Path, steps: int, batch: int, dropout: float, lr: float, compile: bool, resume: bool
) -> tuple[object, str]:
    (corpus,) = data_files(data, "text/tinyshakespeare.txt")
    tokenizer = train_tokenizer([corpus], kind="char", show_progress=False)
    prepare_corpus([corpus], tokenizer, out / "data", val_fraction=0.1, show_progress=False)
    result = pretrain(
        out / "data",
        arch="baby-gpt",
        model_config={"vocab_size": tokenizer.vocab_size, "dropout": dropout},
        train={
            "out_dir": str(out / "run"),
            "max_steps": steps,
            "micro_batch_size": batch,
            "lr": lr,
            "min_lr": 1e-4,
            "warmup_steps": 100,
            "beta2": 0.99,
            "weight_decay": 0.1,
            "eval_every": 200,
            "eval_batches": 40,  # 10 batches read 1.702 where the whole val split gave 1.759
            "compile": compile,
            "sample_prompt": "ROMEO:",
            "sample_tokens": 200,
        },
        resume=resume,
    )
    return result, "ROMEO:"


def chinese(
    data: Path, out: Path, steps: int, batch: int, dropout: float, lr: float, compile: bool, resume: bool
) -> tuple[object, str]:
    corpora = data_files(data, "text/songci.txt", "text/luxun.txt")
    tokenizer = train_tokenizer(corpora, 8000, split_paragraphs=True, show_progress=False)
    prepare_corpus(
        corpora, tokenizer, out / "data", split_paragraphs=True, val_fraction=0.02, show_progress=False
    )
    result = pretrain(
        out / "data",
        arch="tiny-gpt2",
        model_config={"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "dropout": dropout},
        train={
            "out_dir": str(out / "run"),
            "max_steps": steps,
            "micro_batch_size": batch,
            "lr": lr,
            "min_lr": 1e-4,
            "warmup_steps": 100,
            "beta2": 0.99,
            "eval_every": max(1, min(250, steps // 5)),
            "eval_batches": 20,
            "compile": compile,
            "sample_prompt": "东风",
            "sample_tokens": 100,
        },
        resume=resume,
    )
    return result, "东风"


@torch.inference_mode()
def whole_val_loss(llm: LLM, data: Path, block: int = 256, batch: int = 16) -> float:
    """Mean next-token loss over every non-overlapping window of the val split (the in-run figure uses a sample)."""
    shards = TokenShards(data)
    ids = torch.from_numpy(shards.read("val", 0, shards.num_tokens("val")).astype("int64"))
    windows = ids[: (len(ids) - 1) // block * block + 1]
    x = windows[:-1].view(-1, block)
    y = windows[1:].view(-1, block)
    total = 0.0
    for i in range(0, len(x), batch):
        _, loss = llm.model(x[i : i + batch], targets=y[i : i + batch])
        total += float(loss) * len(x[i : i + batch])
    return total / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", choices=["shakespeare", "chinese"])
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dropout", type=float, default=0.0, help="0 beat 0.1 and 0.2 at 2,000-3,000 steps of batch 8"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model (~10 %% faster on CPU)"
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (shakespeare 1.5e-3, chinese 1e-3)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (same settings; minutes count this part only)",
    )
    parser.add_argument(
        "--evaluate",
        metavar="MODEL_FOLDER",
        help="no training: print the whole-split val loss of a saved model, e.g. --out's run/checkpoints/step-N",
    )
    add_data_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/output/{args.corpus}")
    if args.evaluate:
        llm = LLM.load(args.evaluate, dtype="float32", device="cpu")
        print(f"{args.evaluate}: val loss (whole split) {whole_val_loss(llm, out / 'data'):.4f}")
        return
    start = time.perf_counter()
    recipe = shakespeare if args.corpus == "shakespeare" else chinese
    lr = args.lr or (1.5e-3 if args.corpus == "shakespeare" else 1e-3)
    result, prompt = recipe(
        args.data, out, args.steps, args.batch, args.dropout, lr, args.compile, args.resume
    )
    minutes = (time.perf_counter() - start) / 60
    llm = LLM.load(result.model_dir, dtype="float32", device="cpu")
    whole = whole_val_loss(llm, out / "data")
    print(
        "\n| corpus | steps | batch | dropout | minutes | final train loss | final val loss (sample) | val loss (whole split) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.corpus} | {result.steps} | {args.batch} | {args.dropout} | {minutes:.1f} | {result.train_loss:.3f} | "
        f"{result.val_loss:.3f} | {whole:.3f} |"
    )
    print(f"\nloss curve: {result.model_dir.parent / 'loss.png'}\n")
    for seed in range(2):
        text = llm.generate_text(prompt, max_length=200, temperature=0.8, top_k=50, seed=seed)
        print(f"--- sample {seed} ---\n{prompt}{text}\n")


if __name__ == "__main__":
    main()
