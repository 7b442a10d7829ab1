"""Validation by default in fine-tuning: a stratified held-out split, the best evaluation kept, early stopping,
and no test file read during training."""

from __future__ import annotations

import csv
import functools
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, f1_score

from lmforge import LLM, LmforgeError
from lmforge.cli import main
from lmforge.data.labelled import (
    ClassificationObjective,
    classification_scores,
    load_classification,
    split_validation,
)
from lmforge.recipes.finetune import finetune

from .conftest import TEST_DATA, tiny_llm

FAST = {
    "micro_batch_size": 8,
    "warmup_steps": 0,
    "progress": False,
    "save_every": 1000,
}  # no step checkpoints
pytestmark = pytest.mark.filterwarnings("ignore:.*were truncated:UserWarning")  # short blocks, on purpose


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def jsonl_rows(relative: str, limit: int) -> list[dict]:
    lines = (TEST_DATA / relative).read_text(encoding="utf-8").splitlines()[:limit]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def genre_zh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Chinese three-class set of unequal classes built from tests/data: 30 CSL abstracts (摘要), the verses
    of the first 15 宋词 (宋词) and 9 paragraphs of 鲁迅 (小说), shuffled."""
    abstracts = [r["text"] for r in jsonl_rows("summarize_zh/test.jsonl", 30)]
    ci = (TEST_DATA / "text" / "songci.txt").read_text(encoding="utf-8").split("\n\n")[:15]
    verses = ["".join(block.split("\n")[1:]) for block in ci]  # line 1 is the title (tune and author)
    luxun = (TEST_DATA / "text" / "luxun.txt").read_text(encoding="utf-8").splitlines()
    paragraphs = [line.strip() for line in luxun if len(line.strip()) > 40][:9]
    rows = [{"text": t, "label": "摘要"} for t in abstracts] + [{"text": t, "label": "宋词"} for t in verses]
    rows += [{"text": t, "label": "小说"} for t in paragraphs]
    random.Random(0).shuffle(rows)
    return write_jsonl(tmp_path_factory.mktemp("genre") / "genre_zh.jsonl", rows)


def spam_rows(limit: int) -> list[dict]:
    return jsonl_rows("sms_spam/test.jsonl", limit)


# ---------------------------------------------------------------- the split
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.33])
def test_the_split_is_stratified_disjoint_and_fixed_by_seed(fraction: float) -> None:
    labels = [r["label"] for r in spam_rows(200)]  # ham 168 / spam 32
    names = sorted(set(labels))
    classes = [names.index(label) for label in labels]
    kept, held = split_validation(len(classes), fraction, 7, classes=classes)
    assert not set(kept) & set(held) and sorted(kept + held) == list(range(200))
    per_class = Counter(classes[i] for i in held)
    for c, size in Counter(classes).items():
        assert abs(per_class[c] - size * fraction) <= 1, (names[c], per_class[c], size * fraction)
    assert split_validation(len(classes), fraction, 7, classes=classes) == (kept, held)
    other_kept, other_held = split_validation(len(classes), fraction, 8, classes=classes)
    assert other_held != held and Counter(classes[i] for i in other_held) == per_class


def test_many_random_class_layouts_keep_every_class_within_one_example() -> None:
    rng = random.Random(1)
    for _ in range(200):
        sizes = [rng.randint(1, 60) for _ in range(rng.randint(2, 6))]
        classes = [c for c, size in enumerate(sizes) for _ in range(size)]
        rng.shuffle(classes)
        fraction = rng.uniform(0.05, 0.5)
        try:
            kept, held = split_validation(len(classes), fraction, rng.randint(0, 99), classes=classes)
        except LmforgeError:  # only when no class is big enough to give a row
            assert all(size * fraction < 0.5 or size == 1 for size in sizes)
            continue
        per_class, in_train = Counter(classes[i] for i in held), Counter(classes[i] for i in kept)
        for c, size in enumerate(sizes):
            assert abs(per_class[c] - size * fraction) <= 1 and in_train[c] >= 1
        assert sorted(kept + held) == list(range(len(classes)))


def test_finetune_holds_out_a_stratified_chinese_split_and_records_it(genre_zh, tiny_tokenizer, tmp_path):
    run = tmp_path / "run"
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    result = finetune(
        llm, genre_zh, task="classify", method="full", val_split=0.2, block_size=48,
        train={**FAST, "out_dir": str(run), "max_steps": 4, "eval_every": 2},
    )  # fmt: skip
    record = json.loads((run / "validation.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in genre_zh.read_text(encoding="utf-8").splitlines()]
    held = record["split"]["rows"]
    assert record["split"]["stratified"] and record["select_by"] == "macro_f1"  # the default for labels
    assert Counter(rows[i]["label"] for i in held) == {"摘要": 6, "宋词": 3, "小说": 2}  # 30, 15, 9 x 0.2
    assert record["split"]["per_label"] == {"小说": 2, "宋词": 3, "摘要": 6}
    lineage = json.loads((run / "model" / "config.json").read_text())["lmforge"]["lineage"]
    assert lineage["train_examples"] == len(rows) - len(held)
    assert [e["step"] for e in record["curve"]] == [2, 4] == [e["step"] for e in result.evaluations]
    assert set(record["curve"][0]) == {"step", "val_loss", "accuracy", "macro_f1"}
    # the same seed holds out the same rows; the validation metrics are over exactly those rows
    again = finetune(
        tiny_llm("tiny-llama", tiny_tokenizer), genre_zh, task="classify", method="full", val_split=0.2,
        block_size=48, train={**FAST, "out_dir": str(tmp_path / "again"), "max_steps": 4, "eval_every": 2},
    )  # fmt: skip
    assert json.loads((tmp_path / "again" / "validation.json").read_text())["split"]["rows"] == held
    assert again.evaluations == result.evaluations
    # the kept evaluation's accuracy is the saved model's on exactly the held-out rows (texts cut to the
    # training length, as in training), computed here one row at a time
    tuned = LLM.load(run / "model")
    data = load_classification(genre_zh, tiny_tokenizer, 48, labels=tuned.config.labels)
    with torch.no_grad():
        predicted = [int(tuned.model.classify(torch.tensor([data.ids[i]])).argmax()) for i in held]
    truth = [int(data.targets[i]) for i in held]
    assert result.best["step"] in (2, 4) and accuracy_score(truth, predicted) == result.best["accuracy"]


def test_instructions_are_split_at_random_and_selected_by_validation_loss(tiny_tokenizer, tmp_path):
    rows = jsonl_rows("summarize_zh/test.jsonl", 20)
    data = write_jsonl(
        tmp_path / "sum.jsonl", [{"text": r["text"][:80], "summary": r["summary"]} for r in rows]
    )
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    run = tmp_path / "run"
    result = finetune(
        llm, data, task="summarize", method="full", block_size=96,
        train={**FAST, "out_dir": str(run), "max_steps": 2, "eval_every": 1},
    )  # fmt: skip
    record = json.loads((run / "validation.json").read_text())
    assert not record["split"]["stratified"] and len(record["split"]["rows"]) == 2  # 10 % of 20
    assert record["select_by"] == "val_loss" and set(result.evaluations[0]) == {"step", "val_loss"}
    with pytest.raises(LmforgeError, match="--select-by accuracy needs class labels"):
        finetune(llm, data, task="summarize", select_by="accuracy", train={"out_dir": str(tmp_path / "x")})


# ------------------------------------------------ the test file is never read
def test_finetune_never_opens_the_test_file(tiny_tokenizer, tmp_path, capsys):
    """Every file the process opens while `lmforge finetune` runs goes through the "open" audit event."""
    folder = tmp_path / "spam"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", spam_rows(120))
    test = write_jsonl(folder / "test.jsonl", spam_rows(200)[120:])
    model = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "base")
    opened: list[str] = []
    watching = [False]

    def hook(event: str, args: tuple) -> None:
        if watching[0] and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            opened.append(os.path.realpath(os.fsdecode(args[0])))

    sys.addaudithook(hook)  # audit hooks cannot be removed: this one records only while `watching`
    args = ["finetune", str(model), "--data", str(folder / "train.jsonl"), "--task", "classify"]
    args += ["--method", "freeze", "--max-steps", "2", "--eval-every", "1", "--micro-batch-size", "8"]
    args += ["--block-size", "32"]
    args += ["--warmup-steps", "0", "--no-progress", "--out", str(tmp_path / "run")]
    watching[0] = True
    try:
        code = main(args)
    finally:
        watching[0] = False
    out = capsys.readouterr().out
    assert code == 0 and "kept the evaluation at step" in out
    assert os.path.realpath(folder / "train.jsonl") in opened  # the hook sees the files finetune reads
    assert os.path.realpath(test) not in opened
    assert not any(Path(p).name == "test.jsonl" for p in opened)


# ------------------------------------------------- best evaluation, stopping
def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def diverging_run(
    tiny_tokenizer,
    data: Path,
    out: Path,
    select_by="val_loss",
    patience=None,
    resume_run=False,
    method="full",
    override=(),
    average_last=None,
    **train,
):
    """A learning rate far too large: validation loss falls for two steps, then jumps (0.48, 0.36, 3.2, 1.4,
    0.50, 0.84...), so the last step is not the best."""
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    settings = {**FAST, "out_dir": str(out), "lr": 0.03, "decay": "constant", "eval_every": 1, **train}
    return finetune(llm, data, task="classify", method=method, select_by=select_by, patience=patience,
                    average_last=average_last, val_split=0.25, block_size=32, resume=resume_run,
                    override=list(override), train=settings)  # fmt: skip


@pytest.fixture(scope="module")
def spam_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("spam") / "train.jsonl", spam_rows(64))


@pytest.mark.parametrize("method", ["full", "freeze"])  # checkpoints hold only the trained tensors
def test_the_final_model_is_the_best_evaluations_not_the_last_step(
    method, spam_small, tiny_tokenizer, tmp_path
):
    result = diverging_run(tiny_tokenizer, spam_small, tmp_path / "run", max_steps=5, method=method)
    losses = {e["step"]: e["val_loss"] for e in result.evaluations}
    best_step = min(losses, key=losses.get)
    assert result.best["step"] == best_step and best_step < 5, losses  # the case the test is for
    # The same run cut at the best step trains the same weights (a constant rate, batches a function of
    # the step); without evaluations it keeps its last weights: those must be the saved model's.
    cut = diverging_run(
        tiny_tokenizer, spam_small, tmp_path / "cut", max_steps=best_step, eval_every=0, method=method
    )
    assert cut.best is None
    saved, reference = model_weights(result.model_dir), model_weights(cut.model_dir)
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[k], reference[k]) for k in saved)
    # and the last step's weights differ (checkpoints hold the trained tensors: a classifier's LM head is
    # frozen even in "full")
    best, last = (
        load_file(str(tmp_path / "run" / "checkpoints" / name / "trainable.safetensors"))
        for name in ("best", "step-000005")
    )
    assert best.keys() == last.keys() and not all(torch.equal(best[k], last[k]) for k in last)
    selected = json.loads((result.model_dir / "config.json").read_text())["lmforge"]["lineage"]["selected"]
    assert selected["step"] == best_step


def test_accuracy_and_macro_f1_pick_the_best_figure_ties_going_to_the_lower_loss(
    spam_small, tiny_tokenizer, tmp_path
):
    result = diverging_run(tiny_tokenizer, spam_small, tmp_path / "run", select_by="macro_f1", max_steps=5)
    curve = result.evaluations
    want = max(curve, key=lambda e: (e["macro_f1"], -e["val_loss"]))
    assert result.best == want


def test_early_stopping_stops_after_patience_evaluations_without_improvement(
    spam_small, tiny_tokenizer, tmp_path
):
    run = tmp_path / "run"
    result = diverging_run(tiny_tokenizer, spam_small, run, max_steps=30, patience=2)
    curve = result.evaluations
    assert result.stopped_early and result.steps < 30 and curve[-1]["step"] == result.steps
    losses = [e["val_loss"] for e in curve]
    best_at = losses.index(min(losses))
    assert len(curve) - 1 - best_at == 2  # exactly `patience` evaluations after the best one
    # before the end, no stretch of 2 evaluations went by without a new lowest loss
    for i in range(2, len(curve) - 1):
        assert min(losses[: i + 1]) < min(losses[: i - 1])
    with (run / "metrics.csv").open() as f:
        assert int(list(csv.DictReader(f))[-1]["step"]) == result.steps
    assert json.loads((run / "validation.json").read_text())["stopped_early"] is True


def test_average_last_saves_the_mean_of_the_last_evaluations_trained_weights(
    spam_small, tiny_tokenizer, tmp_path
):
    run = tmp_path / "run"
    result = diverging_run(
        tiny_tokenizer,
        spam_small,
        run,
        max_steps=5,
        method="freeze",
        average_last=3,
        save_every=1,
        keep_last=9,
    )
    assert result.averaged["steps"] == [3, 4, 5] and "macro_f1" in result.averaged
    # every step's checkpoint holds what trains at that step (evaluations are at every step here)
    steps = [
        load_file(str(run / "checkpoints" / f"step-{n:06d}" / "trainable.safetensors")) for n in (3, 4, 5)
    ]
    model = LLM.load(result.model_dir, dtype="float32").model.eval()
    saved = model.state_dict()
    for name in steps[0]:
        mean = (steps[0][name].double() + steps[1][name].double() + steps[2][name].double()) / 3
        assert torch.allclose(saved[name].double(), mean, rtol=0, atol=1e-6), name
        assert not torch.equal(saved[name], steps[2][name]), name  # not simply the last step's
    lineage = json.loads((result.model_dir / "config.json").read_text())["lmforge"]["lineage"]
    assert lineage["averaged"]["steps"] == [3, 4, 5]
    assert json.loads((run / "validation.json").read_text())["averaged"] == result.averaged
    # the figures recorded are the saved model's: scored again on the held-out rows, they are the same
    held = json.loads((run / "validation.json").read_text())["split"]["rows"]
    val = load_classification(spam_small, tiny_tokenizer, 32).subset(held)
    objective = ClassificationObjective(val, val, 8)
    with torch.no_grad():
        again = objective.evaluate(model, objective.val_batches(None))
    assert again == pytest.approx({k: v for k, v in result.averaged.items() if k != "steps"}, abs=1e-5)


def test_a_resumed_run_selects_and_stops_as_an_uninterrupted_one(spam_small, tiny_tokenizer, tmp_path):
    run = functools.partial(diverging_run, tiny_tokenizer, spam_small, method="full", patience=2)
    whole = run(tmp_path / "whole", max_steps=30)
    assert whole.stopped_early and 3 < whole.steps < 30  # it stops after the point it is resumed from
    run(tmp_path / "split", max_steps=3)  # then stopped
    resumed = run(tmp_path / "split", max_steps=30, resume_run=True, override=["max_steps"])
    assert resumed.steps == whole.steps and resumed.stopped_early
    assert resumed.evaluations == whole.evaluations and resumed.best == whole.best
    a, b = model_weights(whole.model_dir), model_weights(resumed.model_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------ figures and bad input
def test_accuracy_and_macro_f1_equal_sklearn() -> None:
    gen = torch.Generator().manual_seed(0)
    for classes in (2, 3, 5):
        truth = torch.randint(0, classes, (97,), generator=gen)
        predicted = torch.where(torch.rand(97, generator=gen) < 0.6, truth, torch.randint(0, classes, (97,)))
        predicted[predicted == classes - 1] = 0  # one class never predicted
        ours = classification_scores(truth, predicted, classes + 1)  # and one in neither
        labels = list(range(classes + 1))
        assert ours["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
        f1 = f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)
        assert ours["macro_f1"] == pytest.approx(f1)


def test_no_validation_with_val_split_zero_keeps_the_last_step(spam_small, tiny_tokenizer, tmp_path):
    run = tmp_path / "run"
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    result = finetune(llm, spam_small, task="classify", method="freeze", val_split=0, block_size=32,
                      train={**FAST, "out_dir": str(run), "max_steps": 2, "eval_every": 1})  # fmt: skip
    assert result.evaluations == [] and result.best is None and not (run / "validation.json").exists()
    with (run / "metrics.csv").open() as f:
        assert all(row["val_loss"] == "" for row in csv.DictReader(f))  # never "validated" on training rows


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--val-split", "1.5"], "error: --val-split 1.5 must be at least 0 and below 1"),
        (["--val-split", "0", "--patience", "2"], "error: --patience needs validation data"),
        (["--val-split", "0", "--select-by", "accuracy"], "error: --select-by needs validation data"),
        (["--regression", "--select-by", "macro_f1"], "error: --select-by macro_f1 needs class labels"),
        (["--patience", "0"], "error: --patience 0 must be at least 1"),
        (["--eval-every", "0", "--patience", "3"], "error: --patience needs evaluations"),
        (["--average-last", "1"], "error: --average-last 1 must be at least 2"),
        (["--eval-every", "0", "--average-last", "3"], "error: --average-last needs evaluations"),
        (["--val-split", "0", "--average-last", "2"], "error: --average-last needs validation data"),
        (["--select-by", "f1"], "invalid choice: 'f1'"),
    ],
)
def test_bad_validation_settings_are_one_line_errors(flags, message, spam_small, tmp_path, capsys):
    args = ["finetune", "--data", str(spam_small), *flags, "--out", str(tmp_path / "run")]
    try:
        code = main(args)
    except SystemExit as e:  # argparse refuses a bad choice itself
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(message in line for line in err), err
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "run").exists()


def test_too_few_examples_to_hold_out_is_an_error_naming_the_fix(tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "好", "label": "a"}, {"text": "坏", "label": "b"}])
    assert len(load_classification(data, tiny_tokenizer, 16)) == 2
    with pytest.raises(LmforgeError, match="too few to hold out 10%") as e:
        finetune(tiny_llm("tiny-llama", tiny_tokenizer), data, train={"out_dir": str(tmp_path / "r")})
    assert "--val-split 0" in e.value.hint
