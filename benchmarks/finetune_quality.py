"""Fine-tuning quality on the shared labelled sets, through the same recipes users call.

    python benchmarks/finetune_quality.py spam --method freeze            # SMS spam, SmolLM2, last 2 blocks
    python benchmarks/finetune_quality.py spam --method lora
    python benchmarks/finetune_quality.py spam --method zero-shot         # classify_text(labels=...), no training
    python benchmarks/finetune_quality.py sentiment --method lora --train-limit 6000
    python benchmarks/finetune_quality.py instruct --lang zh
    python benchmarks/finetune_quality.py summarize --lang en

Each run prints the test metrics next to the classic baseline (classification) or the untuned model
(instructions, summaries), plus minutes; reports land in benchmarks/output/finetune/<run>/.
Data comes from ../shared/data, or --data DIR laid out the same (benchmarks may read it; the product never needs
it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from _data import add_data_option, data_files
from lmforge import LLM
from lmforge.data.labelled import IGNORE_INDEX, load_sequences, read_records
from lmforge.evaluate import markdown_table
from lmforge.recipes.evaluate import COLUMNS, evaluate_models
from lmforge.recipes.finetune import finetune

OUT = Path(__file__).resolve().parent / "output" / "finetune"

CLASSIFY = {"spam": ("sms_spam", ["ham", "spam"]), "sentiment": ("sentiment_zh", ["negative", "positive"])}
SEQUENCES = {("instruct", "en"): "instruct_en", ("instruct", "zh"): "instruct_zh"}
SEQUENCES |= {("summarize", "en"): "summarize_en", ("summarize", "zh"): "summarize_zh"}


def subset(path: Path, limit: int | None, out: Path, seed: int = 0) -> Path:
    """The first ``limit`` records after a seeded shuffle (all of them, shuffled, without a limit)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    random.Random(seed).shuffle(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines[:limit]) + "\n", encoding="utf-8")
    return out


def steps_for(examples: int, epochs: float, batch: int) -> int:
    return max(1, math.ceil(examples * epochs / batch))


def train_settings(args: argparse.Namespace, run: Path, examples: int) -> dict[str, Any]:
    steps = steps_for(examples, args.epochs, args.batch)
    return {
        "out_dir": str(run),
        "max_steps": steps,
        "micro_batch_size": args.batch,
        "lr": args.lr,
        "min_lr": args.lr / 10,
        "warmup_steps": min(50, steps // 10),
        "weight_decay": 0.0 if args.method == "lora" else 0.1,
        "eval_every": 0,
        "save_every": steps,
        "keep_last": 1,
        "precision": args.precision,
        "seed": args.seed,
    }


def lora_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank, "dropout": 0.0}


def classify(args: argparse.Namespace) -> None:
    folder, labels = CLASSIFY[args.job]
    train_file, test_file = data_files(args.data, f"{folder}/train.jsonl", f"{folder}/test.jsonl")
    name = f"{args.job}-{args.method}" + (f"-{args.train_limit}" if args.train_limit else "")
    run = OUT / (args.name or name)
    start = time.perf_counter()
    if args.method == "zero-shot":
        model = args.model
        train_minutes = 0.0
    else:
        data = subset(train_file, args.train_limit, run / "train.jsonl", args.seed)
        examples = len(read_records(data, ["text", "label"]))
        finetune(
            args.model,
            data,
            task="classify",
            method=args.method,
            train_last_blocks=args.train_last_blocks,
            lora=lora_settings(args),
            block_size=args.block_size,
            val_split=0,  # fixed settings, trained on all of train.jsonl as before (no evaluation to select on)
            train=train_settings(args, run / "run", examples),
        )
        model = str(run / "run" / "model")
        train_minutes = (time.perf_counter() - start) / 60
    report = evaluate_models(
        [model],
        test_file,
        task="classify",
        out_dir=run / "report",
        train_file=train_file,
        labels=labels if args.method == "zero-shot" else None,
    )
    for row in report["rows"]:
        row["train_minutes"] = 0.0 if row["model"].startswith("baseline") else train_minutes
    print(markdown_table(report["rows"], [*COLUMNS["classify"], "train_minutes"]))
    print(f"\n{args.job} {args.method}: trained {train_minutes:.1f} min; report in {run / 'report'}")


@torch.inference_mode()
def held_out_loss(llm: LLM, path: Path, kind: str, limit: int) -> float:
    """Mean answer-token loss over the first ``limit`` held-out examples (prompt positions masked)."""
    records = load_sequences(path, llm.tokenizer, min(512, llm.config.block_size), kind=kind)
    total, count = 0.0, 0
    for ids, targets in list(zip(records.input_ids, records.targets, strict=True))[:limit]:
        x = torch.tensor([ids], device=llm.model.device)
        y = torch.tensor([targets], device=llm.model.device)
        _, loss = llm.model(x, targets=y)
        answer_tokens = int((y != IGNORE_INDEX).sum())
        total, count = total + float(loss) * answer_tokens, count + answer_tokens
    return total / count


def examples_of(records: list[dict[str, Any]], kind: str) -> list[str]:
    if kind == "instruct":
        return [r["instruction"] + (("\n\n" + r["input"]) if r.get("input") else "") for r in records]
    return [str(r["text"]) for r in records]


def sequences(args: argparse.Namespace) -> None:
    kind = args.job
    folder = SEQUENCES[(kind, args.lang)]
    train_file, test_file = data_files(args.data, f"{folder}/train.jsonl", f"{folder}/test.jsonl")
    run = OUT / (args.name or f"{kind}-{args.lang}-{args.method}")
    data = subset(train_file, args.train_limit, run / "train.jsonl", args.seed)
    test = subset(test_file, args.test_limit, run / "test.jsonl", args.seed)
    fields = ["instruction", "output"] if kind == "instruct" else ["text", "summary"]
    examples = len(read_records(data, fields))
    base = LLM.load(args.model, dtype="float32")
    before_loss = held_out_loss(base, test, kind, args.test_limit)
    shown = read_records(test, fields)[:3]
    before = (
        [base.chat(p, max_length=args.max_tokens) for p in examples_of(shown, kind)]
        if kind == "instruct"
        else None
    )
    start = time.perf_counter()
    finetune(
        base,
        data,
        task=kind,
        method=args.method,
        train_last_blocks=args.train_last_blocks,
        lora=lora_settings(args),
        val_split=0,  # as in classify(): all of the training data, no evaluation
        train=train_settings(args, run / "run", examples),
    )
    train_minutes = (time.perf_counter() - start) / 60
    tuned = LLM.load(run / "run" / "model", dtype="float32")
    after_loss = held_out_loss(tuned, test, kind, args.test_limit)
    lines = [
        f"## {kind} {args.lang} ({args.method}, {examples} examples, {train_minutes:.1f} min)",
        "",
        f"held-out answer loss on {args.test_limit} test examples: {before_loss:.3f} -> {after_loss:.3f}",
        "",
    ]
    if kind == "instruct":
        after = [tuned.chat(p, max_length=args.max_tokens) for p in examples_of(shown, kind)]
        for prompt, b, a, r in zip(examples_of(shown, kind), before, after, shown, strict=True):
            lines += [
                f"### prompt\n{prompt}",
                f"**before:** {b}",
                f"**after:** {a}",
                f"**reference:** {r['output']}",
                "",
            ]
    else:
        base_name = f"{args.model} (zero-shot)"
        report = evaluate_models(
            [str(run / "run" / "model"), args.model],
            test,
            task="summarize",
            out_dir=run / "report",
            limit=args.test_limit,
            max_length=args.max_tokens,
        )
        report["rows"][1]["model"] = base_name
        lines += [markdown_table(report["rows"], COLUMNS["summarize"]), ""]
    text = "\n".join(lines)
    (run / "result.md").write_text(text, encoding="utf-8")
    (run / "result.json").write_text(
        json.dumps({"before_loss": before_loss, "after_loss": after_loss, "minutes": train_minutes}), "utf-8"
    )
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=["spam", "sentiment", "instruct", "summarize"])
    parser.add_argument("--method", default="lora", choices=["full", "freeze", "lora", "zero-shot"])
    parser.add_argument("--model", default="default")
    parser.add_argument("--lang", default="en", choices=["en", "zh"])
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--train-last-blocks", type=int, default=2, help="method freeze: blocks that train")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--train-limit", type=int, help="train on this many shuffled examples")
    parser.add_argument("--test-limit", type=int, default=100, help="instruct/summarize: test examples")
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument(
        "--block-size", type=int, help="classify: train on at most this many tokens per text (default 512)"
    )
    parser.add_argument("--seed", type=int, default=0)
    add_data_option(parser)
    parser.add_argument(
        "--name", help="run folder under benchmarks/output/finetune (default: job and method)"
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    classify(args) if args.job in CLASSIFY else sequences(args)


if __name__ == "__main__":
    main()
