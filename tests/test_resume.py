"""``--resume`` restores the run as it was, and freeze / LoRA runs checkpoint only what trains.

The oracle is an uninterrupted run of the same settings: a run stopped after a checkpoint (its later checkpoints
and final model removed, as a kill leaves it) and resumed with nothing but ``--out --resume`` must end on
bitwise the same weights, with the same learning rate at every step.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge import LmforgeError
from lmforge.cli import main
from lmforge.recipes.pretrain import pretrain
from lmforge.train.schedule import learning_rate

from . import test_finetune as tuned
from . import test_train as trained
from .conftest import tiny_llm

# The other modules' fixtures, used here too: token shards, labelled spam/ham files, one torch thread.
shards_dir, spam_files = trained.shards_dir, tuned.spam_files
one_thread_for_the_module = trained.one_thread_for_the_module

PRETRAIN = ["--arch", "tiny-llama", "--n-layer", "2", "--max-steps", "6", "--micro-batch-size", "2"]
PRETRAIN += ["--block-size", "16", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "0"]
PRETRAIN += ["--save-every", "3", "--no-progress", "--device", "cpu"]


def weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)  # bitwise


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return [{k: r[k] for k in ("step", "loss", "lr")} for r in csv.DictReader(f)]


def stop_after(run: Path, step: int) -> None:
    """Leave ``run`` as a run killed after its step-``step`` checkpoint: later checkpoints, no final model."""
    for folder in (run / "checkpoints").iterdir():
        if folder.name.startswith("step-") and int(folder.name[5:]) > step:
            shutil.rmtree(folder)
    shutil.rmtree(run / "model")


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def pretrained(shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted pretraining run: the reference."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(["pretrain", "--data", str(shards_dir), "--out", str(run), *PRETRAIN]) == 0
    return run


def test_resume_without_model_or_settings_continues_bit_exactly(
    pretrained: Path, shards_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "运行"
    shutil.copytree(pretrained, run)
    stop_after(run, 3)
    # As README writes it: no --arch, no --lr; --max-steps as the run had it.
    assert (
        main(["pretrain", "--data", str(shards_dir), "--out", str(run), "--max-steps", "6", "--resume"]) == 0
    )
    assert_same(weights(run / "model"), weights(pretrained / "model"))
    assert rows(run) == rows(pretrained)  # the losses and the learning rate of every step
    lrs = [float(r["lr"]) for r in rows(run)]
    schedule = dict(lr=3e-3, min_lr=3e-4, warmup=2, total=6, decay="cosine")
    assert lrs == pytest.approx([learning_rate(s, **schedule) for s in range(6)], rel=1e-6)


def test_a_flag_that_differs_from_the_run_is_one_line_naming_it(
    pretrained: Path, shards_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    args = ["pretrain", "--out", str(run), "--resume"]
    assert main([*args, "--lr", "1e-3", "--n-layer", "3", "--max-steps", "8"]) == 2
    err = one_line_error(capsys)
    assert "--resume continues the run as recorded in" in err and "step-000006" in err
    assert "--max-steps 8 (the run's: 6)" in err and "--lr 0.001 (the run's: 0.003)" in err
    assert "--n-layer 3 (the run's: 2)" in err
    assert err.endswith("add --override n-layer,max-steps,lr to change them, or drop them")
    assert main([*args, "--max-steps", "8", "--override", "max-step"]) == 2
    err = one_line_error(capsys)
    assert "--override names no setting: max-step" in err and "did you mean max-steps?" in err
    no_resume = ["pretrain", "--out", str(run), "--max-steps", "8", "--warmup-steps", "2"]
    assert main([*no_resume, "--override", "max-steps"]) == 2
    assert "error: --override only applies with --resume" in one_line_error(capsys)
    # A per-process setting (the device, the progress bar) is not the run's: it may change freely.
    assert main([*args, "--device", "cpu", "--progress", "--keep-last", "3"]) == 0


def test_override_extends_a_run_on_the_longer_schedule(
    pretrained: Path, shards_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    assert (
        main(["pretrain", "--out", str(run), "--resume", "--max-steps", "8", "--override", "max-steps"]) == 0
    )
    lrs = [float(r["lr"]) for r in rows(run)]
    assert len(lrs) == 8 and lrs[:6] == [float(r["lr"]) for r in rows(pretrained)]
    schedule = dict(lr=3e-3, min_lr=3e-4, warmup=2, total=8, decay="cosine")
    assert lrs[6:] == pytest.approx([learning_rate(s, **schedule) for s in (6, 7)], rel=1e-6)
    state = json.loads((run / "checkpoints" / "step-000008" / "trainer_state.json").read_text())
    assert state["settings"]["train"]["max_steps"] == 8 and state["settings"]["train"]["lr"] == 3e-3
    # The record now says 8: resuming with the old 6 is the differing flag.
    assert main(["pretrain", "--out", str(run), "--resume", "--max-steps", "6"]) == 2
    assert "--max-steps 6 (the run's: 8)" in one_line_error(capsys)


def test_python_keywords_resume_like_the_flags(pretrained: Path, shards_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    with pytest.raises(LmforgeError, match=r"--lr 0\.001 \(the run's: 0\.003\)") as err:
        pretrain(shards_dir, resume=True, train={"out_dir": str(run), "lr": 1e-3})
    assert err.value.hint == "add --override lr to change them, or drop them"
    result = pretrain(
        shards_dir, resume=True, override=["max_steps"], train={"out_dir": str(run), "max_steps": 7}
    )
    assert result.steps == 7 and len(result.losses) == 1
    assert [r["step"] for r in rows(run)] == [str(s) for s in range(1, 8)]


# ------------------------------------------------------------------ fine-tuning: small checkpoints
FINETUNE = ["--task", "classify", "--max-steps", "6", "--micro-batch-size", "4", "--lr", "3e-3"]
FINETUNE += [
    "--warmup-steps",
    "1",
    "--eval-every",
    "0",
    "--save-every",
    "3",
    "--no-progress",
    "--device",
    "cpu",
]
METHODS = {
    "freeze": ["--train-last-blocks", "1"],
    "lora": ["--lora-rank", "4", "--lora-targets", "q_proj,v_proj"],
}


@pytest.fixture()
def base(tmp_path: Path, tiny_tokenizer) -> Path:
    return tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "base")


@pytest.mark.parametrize("method", ["freeze", "lora"])
def test_partial_fine_tune_checkpoints_hold_what_trains_and_resume_bit_exactly(
    method: str,
    base: Path,
    spam_files,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    args = [
        "finetune",
        str(base),
        "--data",
        str(spam_files[0]),
        "--method",
        method,
        *METHODS[method],
        *FINETUNE,
    ]
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main([*args, "--out", str(reference)]) == 0
    assert main([*args, "--out", str(run)]) == 0
    step = run / "checkpoints" / "step-000003"
    assert sorted(p.name for p in step.iterdir()) == [
        "optimizer.safetensors",
        "rng_state.safetensors",
        "trainable.safetensors",
        "trainer_state.json",
    ]
    trained_names = set(weights(step, "trainable.safetensors"))
    moments = {k.rsplit("::", 1)[0] for k in weights(step, "optimizer.safetensors")}
    assert trained_names == moments and "score.weight" in trained_names
    if method == "freeze":
        assert trained_names == {n for n in trained_names if n.startswith(("blocks.1.", "norm.", "score."))}
    else:
        assert all("lora" in n or n.startswith("score.") for n in trained_names)
    state = json.loads((step / "trainer_state.json").read_text())
    assert state["base"]["model"] == str(base) and len(state["base"]["sha256"]) == 64

    stop_after(run, 3)
    assert main(["finetune", "--out", str(run), "--resume"]) == 0, capsys.readouterr().err
    assert_same(weights(run / "model"), weights(reference / "model"))
    assert rows(run) == rows(reference)


def test_full_fine_tune_of_an_untied_classifier_resumes_bit_exactly(
    spam_files, tiny_tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Its LM head gets no gradient (the score head answers), so it stays frozen: resuming used to fail on the
    head's missing optimizer state."""
    base = tiny_llm("tiny-llama", tiny_tokenizer, tie_embeddings=False).save(tmp_path / "untied")
    args = ["finetune", str(base), "--data", str(spam_files[0]), "--method", "full", *FINETUNE]
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main([*args, "--out", str(reference)]) == 0
    assert main([*args, "--out", str(run)]) == 0
    trained_names = set(weights(run / "checkpoints" / "step-000003", "trainable.safetensors"))
    assert "lm_head.weight" not in trained_names and "score.weight" in trained_names
    assert "wte.weight" in trained_names  # everything else trains
    stop_after(run, 3)
    assert main(["finetune", "--out", str(run), "--resume"]) == 0, capsys.readouterr().err
    assert_same(weights(run / "model"), weights(reference / "model"))
    assert rows(run) == rows(reference)


def test_resume_on_a_changed_base_is_one_line(
    base: Path,
    spam_files,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    run = tmp_path / "run"
    args = ["finetune", str(base), "--data", str(spam_files[0]), "--method", "freeze", *METHODS["freeze"]]
    assert main([*args, *FINETUNE, "--out", str(run)]) == 0
    stop_after(run, 3)
    tensors = weights(base)
    frozen = next(k for k in tensors if k.startswith("model.layers.0."))
    tensors[frozen] = tensors[frozen] + 1e-3  # someone re-saved the base, a little different
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    assert main(["finetune", "--out", str(run), "--resume"]) == 2
    err = one_line_error(capsys)
    assert f"the base model {base} is not the one {run / 'checkpoints' / 'step-000003'} was trained on" in err


def test_freeze_run_folder_is_small_and_follows_the_umask(
    base: Path,
    spam_files,
    tmp_path: Path,
) -> None:
    """The issue's case: a 10-step freeze fine-tune (default evaluation and checkpoints) under umask 027."""
    run = tmp_path / "run"
    args = ["finetune", str(base), "--data", str(spam_files[0]), "--val-file", str(spam_files[1])]
    args += ["--method", "freeze", "--train-last-blocks", "1", "--max-steps", "10", "--micro-batch-size", "4"]
    old = os.umask(0o027)
    try:
        assert main([*args, "--no-progress", "--device", "cpu", "--out", str(run)]) == 0
    finally:
        os.umask(old)
    trainable = load_file(str(run / "checkpoints" / "step-000010" / "trainable.safetensors"))
    trainable_bytes = sum(t.numel() * t.element_size() for t in trainable.values())
    files = [p for p in run.rglob("*") if p.is_file()]
    model_bytes = sum(p.stat().st_size for p in (run / "model").rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    assert total < 5 * trainable_bytes + model_bytes, (total, trainable_bytes, model_bytes)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step-000010"]
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o640"}
    assert {oct(p.stat().st_mode & 0o777) for p in run.rglob("*") if p.is_dir()} == {"0o750"}
