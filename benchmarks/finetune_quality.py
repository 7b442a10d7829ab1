"""Fine-tuning quality on the shared labelled sets, through the same recipes users call.

    python benchmarks/finetune_quality.py spam --stage screen --train-limit 1500 --epochs 1   # recipes on val
    python benchmarks/finetune_quality.py spam --stage final --epochs 2   # the winner, then test once
    python benchmarks/finetune_quality.py sentiment --stage both --train-limit 2000 --block-size 256
    python benchmarks/finetune_quality.py sentiment --stage baseline      # TF-IDF alone: C by CV, then test
    python benchmarks/finetune_quality.py spam --method zero-shot         # classify_text(labels=...), no training
    python benchmarks/finetune_quality.py instruct --lang zh
    python benchmarks/finetune_quality.py summarize --lang en

Classification (spam, sentiment) is chosen honestly: a stratified ``--val-split`` of train.jsonl is held out
(``val.jsonl``; the rest is ``fit.jsonl``). ``--stage screen`` trains each candidate recipe (``CANDIDATES``: one
option changed from the first) on a seeded subset of fit.jsonl and scores it on val.jsonl, with 95 % bootstrap
intervals and paired tests against the first candidate and the TF-IDF baseline, whose C is chosen by 5-fold
cross-validation on train; the table is printed and written as screening.json/.md. ``--stage final`` trains the
validation winner on fit.jsonl, keeps its best checkpoint by validation macro-F1, and only then reads test.jsonl,
once: accuracy and macro-F1 with intervals for it and the baseline, and McNemar's test between them
(result.json/.md). Output: benchmarks/output/finetune/<job>/.
Data comes from ../shared/data, or --data DIR laid out the same (benchmarks may read it; the product never needs
it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from _data import add_data_option, data_files
from lmforge import LLM
from lmforge.data.labelled import IGNORE_INDEX, load_sequences, read_records, split_validation
from lmforge.evaluate import (
    baseline_pipeline,
    baseline_predictions,
    classification_metrics,
    compare_classifiers,
    markdown_table,
)
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


def train_settings(args: argparse.Namespace, run: Path, examples: int, method: str) -> dict[str, Any]:
    steps = steps_for(examples, args.epochs, args.batch)
    return {
        "out_dir": str(run),
        "max_steps": steps,
        "micro_batch_size": args.batch,
        "lr": args.lr,
        "min_lr": args.lr / 10,
        "warmup_steps": min(50, steps // 10),
        "weight_decay": 0.0 if method == "lora" else 0.1,
        "eval_every": 0,
        "save_every": steps,
        "keep_last": 1,
        "precision": args.precision,
        "seed": args.seed,
    }


def lora_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank, "dropout": 0.0}


# Classification recipes are chosen on validation only. Each candidate changes one thing from the first; a
# candidate "wins" when its validation macro-F1 is the highest (ties: the lower validation loss), and it "clearly
# wins" only when the paired tests on validation call it better than the first.
CANDIDATES: dict[str, dict[str, Any]] = {
    "freeze2": {},  # the recipe the README used: last 2 blocks, head on the last token
    "freeze2-mean": {"pooling": "mean"},
    "freeze2-smooth": {"label_smoothing": 0.1},
    "freeze2-balanced": {"balance": "sample"},
    # the mean of the trained weights at the last 4 of 8 evenly spaced points (the second half of the run)
    "freeze2-avg": {"average_last": 4},
    "freeze4": {"train_last_blocks": 4},
    # LoRA backpropagates through every block: about 3x a freeze2 step on CPU
    "lora-qv": {"method": "lora"},
    "lora-all": {"method": "lora", "lora_targets": ["all"]},
}
BASE_RECIPE: dict[str, Any] = {
    "method": "freeze",
    "train_last_blocks": 2,
    "pooling": "last",
    "label_smoothing": 0.0,
    "balance": "none",
    "lora_targets": ["q_proj", "v_proj"],
    "average_last": None,
}
BASELINE_C = (1.0, 3.0, 10.0, 30.0, 100.0)  # the TF-IDF baseline's C, chosen by 5-fold CV on train


def carve_validation(train_file: Path, folder: Path, fraction: float, seed: int) -> tuple[Path, Path]:
    """(fit.jsonl, val.jsonl): a stratified ``fraction`` of the training file held out for choosing recipes,
    by the library's own split (the same rows for the same seed); the test file plays no part."""
    lines = [line for line in train_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = sorted({json.loads(line)["label"] for line in lines})
    classes = [labels.index(json.loads(line)["label"]) for line in lines]
    kept, held = split_validation(len(lines), fraction, seed, classes=classes)
    folder.mkdir(parents=True, exist_ok=True)
    fit, val = folder / "fit.jsonl", folder / "val.jsonl"
    fit.write_text("".join(lines[i] + "\n" for i in kept), encoding="utf-8")
    val.write_text("".join(lines[i] + "\n" for i in held), encoding="utf-8")
    return fit, val


def texts_labels(path: Path) -> tuple[list[str], list[str]]:
    records = read_records(path, ["text", "label"])
    return [str(r["text"]) for r in records], [str(r["label"]) for r in records]


def choose_baseline_c(train_file: Path, seed: int) -> tuple[float, dict[str, float]]:
    """The C of the TF-IDF + logistic-regression baseline with the best 5-fold CV macro-F1 on ``train_file``,
    remembered in OUT/baseline_cv.json by the file's sha256 and the seed (minutes on Chinese reviews)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    cache = OUT / "baseline_cv.json"
    key = f"{hashlib.sha256(train_file.read_bytes()).hexdigest()}-{seed}"
    known = json.loads(cache.read_text("utf-8")) if cache.exists() else {}
    if key in known:
        return known[key]["C"], known[key]["scores"]
    texts, labels = texts_labels(train_file)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    scores = {
        str(c): float(
            cross_val_score(baseline_pipeline(c), texts, labels, cv=folds, scoring="f1_macro").mean()
        )
        for c in BASELINE_C
    }
    best = max(BASELINE_C, key=lambda c: scores[str(c)])
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(known | {key: {"C": best, "scores": scores}}, indent=1), "utf-8")
    return best, scores


def scored(truth: list[str], predicted: list[str], labels: list[str]) -> dict[str, Any]:
    metrics = classification_metrics(truth, predicted, labels)
    return {k: metrics[k] for k in ("accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95")}


def predict(model: str | Path, texts: list[str], truth: list[str] | None = None) -> tuple[list[str], float]:
    """The model's labels for ``texts``, and its mean cross-entropy on ``truth`` (nan without it)."""
    llm = LLM.load(model, dtype="float32")
    results = llm.classify_text(texts)
    losses = [
        -math.log(max(r["probabilities"][t], 1e-12)) for r, t in zip(results, truth or [], strict=False)
    ]
    return [r["label"] for r in results], (sum(losses) / len(losses) if losses else math.nan)


def train_recipe(
    args: argparse.Namespace,
    recipe: dict[str, Any],
    fit: Path,
    val: Path | None,
    run: Path,
    evaluations: int,
    eval_batches: int | None = None,
) -> float:
    """Train ``recipe`` on ``fit``, evaluating on ``val`` (``eval_batches`` of it) ``evaluations`` times and
    keeping the best by validation macro-F1, or with ``average_last`` the mean of the last evaluations' weights
    (without ``val``: the last step's weights); the minutes it took."""
    examples = len(read_records(fit, ["text", "label"]))
    settings = train_settings(args, run, examples, recipe["method"])
    settings["eval_every"] = max(1, settings["max_steps"] // evaluations) if val else 0
    settings["eval_batches"] = eval_batches
    start = time.perf_counter()
    finetune(
        args.model,
        fit,
        task="classify",
        method=recipe["method"],
        train_last_blocks=recipe["train_last_blocks"],
        pooling=recipe["pooling"],
        label_smoothing=recipe["label_smoothing"],
        balance=recipe["balance"],
        lora={**lora_settings(args), "targets": recipe["lora_targets"]},
        average_last=recipe["average_last"],
        block_size=args.block_size,
        **({"val_file": val, "select_by": "macro_f1"} if val else {"val_split": 0}),
        train=settings,
    )
    return (time.perf_counter() - start) / 60


def screen(args: argparse.Namespace, folder: Path, fit: Path, val: Path, labels: list[str]) -> dict[str, Any]:
    """Every candidate on (a seeded subset of) fit.jsonl, scored on val.jsonl; the TF-IDF baseline beside
    them, trained on fit.jsonl with its CV-chosen C. A candidate already screened is read back, not rerun."""
    out = folder / "screen"
    data = subset(fit, args.train_limit, out / "train.jsonl", args.seed)
    val_texts, truth = texts_labels(val)
    c, cv = choose_baseline_c(fit, args.seed)
    baseline = baseline_predictions(*texts_labels(fit), val_texts, c=c)
    rows: dict[str, Any] = {
        "baseline": {"recipe": f"tf-idf + logistic regression, C={c}", **scored(truth, baseline, labels)}
    }
    predictions: dict[str, list[str]] = {}
    for name in args.candidates:
        recipe = BASE_RECIPE | CANDIDATES[name]
        run = out / name
        done = run / "candidate.json"
        if not done.exists():
            k = recipe["average_last"]
            if (
                k
            ):  # averaging needs evaluations: 2k, on one batch of val.jsonl each (they only mark the points)
                minutes = train_recipe(
                    args, recipe, data, val, run / "run", evaluations=2 * k, eval_batches=1
                )
            else:  # one evaluation, after the last step: scored here (the Trainer's would be a second pass)
                minutes = train_recipe(args, recipe, data, None, run / "run", evaluations=1)
            predicted, loss = predict(run / "run" / "model", val_texts, truth)
            record = {"recipe": recipe, "minutes": minutes, "predicted": predicted, "val_loss": loss}
            done.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        record = json.loads(done.read_text("utf-8"))
        predictions[name] = record["predicted"]
        rows[name] = {
            "recipe": record["recipe"],
            "minutes": record["minutes"],
            "val_loss": record["val_loss"],
            **scored(truth, record["predicted"], labels),
        }
    first = args.candidates[0]
    for name in args.candidates[1:]:
        tests = compare_classifiers(truth, predictions[name], predictions[first], labels)
        rows[name]["vs_" + first] = [t.to_dict() for t in tests]
    for name in args.candidates:
        tests = compare_classifiers(truth, predictions[name], baseline, labels)
        rows[name]["vs_baseline"] = [t.to_dict() for t in tests]
    winner = max(args.candidates, key=lambda n: (rows[n]["macro_f1"], -rows[n]["val_loss"]))
    clear = winner != first and all(t["significant"] for t in rows[winner]["vs_" + first])
    result = {
        "job": args.job,
        "fit_examples": len(read_records(data, ["text", "label"])),
        "val_examples": len(truth),
        "epochs": args.epochs,
        "baseline_c": c,
        "baseline_cv_macro_f1": cv,
        "rows": rows,
        "winner": winner,
        "clear_winner": clear,
    }
    (folder / "screening.json").write_text(json.dumps(result, indent=1, ensure_ascii=False), "utf-8")
    table = screening_table(result)
    (folder / "screening.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return result


def interval_text(row: dict[str, Any], key: str) -> str:
    low, high = row[key + "_ci95"]
    return f"{100 * row[key]:.2f} [{100 * low:.2f}, {100 * high:.2f}]"


def verdicts(tests: list[dict[str, Any]]) -> str:
    return "; ".join(f"{t['metric']} {t['verdict']}" for t in tests)


def screening_table(result: dict[str, Any]) -> str:
    first = next(n for n in result["rows"] if n != "baseline")
    lines = [
        f"validation: {result['val_examples']} examples held out of train.jsonl; candidates trained on "
        f"{result['fit_examples']} examples for {result['epochs']:g} epoch(s); baseline C={result['baseline_c']} "
        "by 5-fold CV",
        "",
        f"| candidate | val accuracy % [95 % CI] | val macro-F1 % [95 % CI] | val loss | minutes | vs {first} |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result["rows"].items():
        loss = f"{row['val_loss']:.4f}" if "val_loss" in row else ""
        minutes = f"{row['minutes']:.1f}" if "minutes" in row else ""
        against = verdicts(row.get("vs_" + first, []))
        label = name if name != "baseline" else f"baseline ({row['recipe']})"
        lines.append(
            f"| {label} | {interval_text(row, 'accuracy')} | {interval_text(row, 'macro_f1')} | {loss} | "
            f"{minutes} | {against} |"
        )
    how = "clearly (the paired tests on validation agree)" if result["clear_winner"] else "not clearly"
    lines += ["", f"winner by validation macro-F1: {result['winner']} ({how})"]
    return "\n".join(lines)


def final(
    args: argparse.Namespace, folder: Path, fit: Path, val: Path, test_file: Path, labels: list[str]
) -> None:
    """The screening's winner (or ``--recipe``) trained on fit.jsonl (``--final-limit`` examples of it), its
    checkpoint chosen on val.jsonl, or with ``--from-screen`` the screened model itself; then the test file, read
    here for the first and only time, against the baseline trained on all of train.jsonl with its CV-chosen C."""
    screening = json.loads((folder / "screening.json").read_text("utf-8"))
    name = args.recipe or screening["winner"]
    recipe = BASE_RECIPE | CANDIDATES[name]
    if args.from_screen:  # the screened model itself: chosen on validation already, no second run
        model = folder / "screen" / name / "run" / "model"
        row = screening["rows"][name]
        minutes, examples = row["minutes"], screening["fit_examples"]
        kept = {k: row[k] for k in ("val_loss", "accuracy", "macro_f1")} | {"step": "last"}
    else:
        run = folder / "final"
        data = subset(fit, args.final_limit, run / "train.jsonl", args.seed)
        evaluations = max(args.evaluations, 2 * (recipe["average_last"] or 0))
        minutes = train_recipe(args, recipe, data, val, run / "run", evaluations=evaluations)
        model, examples = run / "run" / "model", len(read_records(data, ["text", "label"]))
        validation = json.loads((run / "run" / "validation.json").read_text("utf-8"))
        kept = validation["best"]
        if validation.get("averaged"):
            kept = validation["averaged"] | {
                "step": "mean of " + "/".join(map(str, validation["averaged"]["steps"]))
            }
    train_file = args.data / CLASSIFY[args.job][0] / "train.jsonl"
    c, cv = choose_baseline_c(train_file, args.seed)
    texts, truth = texts_labels(test_file)
    baseline = baseline_predictions(*texts_labels(train_file), texts, c=c)
    tuned, _ = predict(model, texts)
    tests = compare_classifiers(truth, tuned, baseline, labels)
    result = {
        "job": args.job,
        "recipe_name": name,
        "recipe": recipe,
        "chosen_by": "validation macro-F1 (screening.json)" if not args.recipe else "--recipe",
        "train_examples": examples,
        "epochs": args.epochs,
        "minutes": minutes,
        "validation_kept": kept,
        "test_examples": len(truth),
        "fine_tuned": scored(truth, tuned, labels),
        "baseline": {"C": c, "cv_macro_f1": cv, **scored(truth, baseline, labels)},
        "vs_baseline": [t.to_dict() for t in tests],
    }
    (folder / "result.json").write_text(json.dumps(result, indent=1, ensure_ascii=False), "utf-8")
    text = "\n".join(
        [
            f"{args.job}: {name} ({examples} examples, {args.epochs:g} epoch(s), {minutes:.1f} min; "
            f"step kept: {kept['step']}, validation macro-F1 {100 * kept['macro_f1']:.2f})",
            "",
            "| model | test accuracy % [95 % CI] | test macro-F1 % [95 % CI] |",
            "| --- | --- | --- |",
            f"| SmolLM2-135M, {name} | {interval_text(result['fine_tuned'], 'accuracy')} | "
            f"{interval_text(result['fine_tuned'], 'macro_f1')} |",
            f"| TF-IDF + logistic regression (C={c}) | {interval_text(result['baseline'], 'accuracy')} | "
            f"{interval_text(result['baseline'], 'macro_f1')} |",
            "",
            *(
                f"fine-tuned {'above' if t.difference > 0 else 'below'} baseline by "
                f"{100 * abs(t.difference):.2f} pt, {t.metric} ({t.test}, {t.detail}): {t.verdict()}"
                for t in tests
            ),
        ]
    )
    (folder / "result.md").write_text(text + "\n", encoding="utf-8")
    print(text)


def classify(args: argparse.Namespace) -> None:
    folder_name, labels = CLASSIFY[args.job]
    train_file, test_file = data_files(args.data, f"{folder_name}/train.jsonl", f"{folder_name}/test.jsonl")
    folder = OUT / (args.name or args.job)
    if args.method == "zero-shot":
        texts, truth = texts_labels(test_file)
        llm = LLM.load(args.model, dtype="float32")
        predicted = [r["label"] for r in llm.classify_text(texts, labels=labels)]
        print(json.dumps(scored(truth, predicted, labels), indent=1))
        return
    if args.stage == "baseline":  # the TF-IDF baseline alone: C by 5-fold CV on train, then test once
        c, cv = choose_baseline_c(train_file, args.seed)
        texts, truth = texts_labels(test_file)
        predicted = baseline_predictions(*texts_labels(train_file), texts, c=c)
        result = {"C": c, "cv_macro_f1": cv, **scored(truth, predicted, labels)}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "baseline.json").write_text(json.dumps(result, indent=1), "utf-8")
        print(json.dumps(result, indent=1))
        return
    fit, val = carve_validation(train_file, folder, args.val_split, args.seed)
    if args.stage in ("screen", "both"):
        screen(args, folder, fit, val, labels)
    if args.stage in ("final", "both"):
        final(args, folder, fit, val, test_file, labels)


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
        train=train_settings(args, run / "run", examples, args.method),
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
    parser.add_argument(
        "--method",
        default="lora",
        choices=["full", "freeze", "lora", "zero-shot"],
        help="instruct/summarize: the method; spam/sentiment: zero-shot scores test without training, others are "
        "chosen by --stage screen",
    )
    parser.add_argument(
        "--stage",
        default="both",
        choices=["screen", "final", "both", "baseline"],
        help="spam/sentiment: screen recipes on validation, test the winner, or both; baseline: the TF-IDF one alone",
    )
    parser.add_argument(
        "--candidates",
        nargs="+",
        default=list(CANDIDATES),
        choices=list(CANDIDATES),
        help="recipes to screen (the first is the reference)",
    )
    parser.add_argument("--val-split", type=float, default=0.15, help="share of train.jsonl held out")
    parser.add_argument("--recipe", choices=list(CANDIDATES), help="final: this recipe, not the winner")
    parser.add_argument("--final-limit", type=int, help="final: train on this many examples of fit.jsonl")
    parser.add_argument("--evaluations", type=int, default=4, help="final: validation evaluations per run")
    parser.add_argument(
        "--from-screen",
        action="store_true",
        help="final: test the screened winner itself, without retraining",
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--lang", default="en", choices=["en", "zh"])
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--train-last-blocks", type=int, default=2, help="method freeze: blocks that train")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument(
        "--train-limit", type=int, help="train (spam/sentiment: screen) on this many shuffled examples"
    )
    parser.add_argument("--test-limit", type=int, default=100, help="instruct/summarize: test examples")
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument(
        "--block-size", type=int, help="classify: train on at most this many tokens per text (default 512)"
    )
    parser.add_argument("--seed", type=int, default=0)
    add_data_option(parser)
    parser.add_argument(
        "--name",
        help="run folder under benchmarks/output/finetune (default: the job, with the method for "
        "instruct/summarize)",
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    classify(args) if args.job in CLASSIFY else sequences(args)


if __name__ == "__main__":
    main()
