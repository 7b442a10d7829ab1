"""Training that loses nothing: a full disk mid-checkpoint, a NaN/Inf loss or gradient, a damaged newest
checkpoint. The oracle for each is an uninterrupted run of the same seeded settings: after the failure,
``--resume`` must end on bitwise the same weights.
"""

from __future__ import annotations

import errno
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmforge.train.checkpoint as checkpoint
import lmforge.train.loop as loop
from lmforge import LmforgeError
from lmforge.cli import main
from lmforge.data import TokenShards
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig

from . import test_train as trained
from .test_train import assert_checkpoint_loads, csv_rows, quick_trainer

# test_train's module fixtures, used here too: the token shards, their tokenizer, one torch thread.
shards_dir, shards, tok = trained.shards_dir, trained.shards, trained.tok
one_thread_for_the_module = trained.one_thread_for_the_module

# Checkpoints at steps 2, 4 and 6 (save_every=2). The schedule depends on max_steps, so every run uses 6.
STEPS = 6


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def assert_same_weights(run: Path, reference: dict[str, torch.Tensor]) -> None:
    got = weights(run)
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in reference)  # bitwise


def step_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def reference(shards: TokenShards, tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The final weights of the run every test below interrupts, run without interruption."""
    run = tmp_path_factory.mktemp("reference")
    quick_trainer(run, shards, tok, max_steps=STEPS).fit()
    return weights(run)


class Faulty:
    """The trainer's objective, except that micro-batch ``bad`` gives a NaN loss (``grad=False``) or a finite
    loss with an infinite gradient (``grad=True``): a transient fault, gone when the run is resumed."""

    def __init__(self, inner, bad: int, grad: bool = False) -> None:
        self.inner, self.bad, self.grad, self.index = inner, bad, grad, -1

    def train_batch(self, index: int, rank: int, world_size: int):
        self.index = index
        return self.inner.train_batch(index, rank, world_size)

    def loss(self, model, batch):
        loss = self.inner.loss(model, batch)
        if self.index != self.bad:
            return loss
        return InfiniteGradient.apply(loss) if self.grad else loss * math.nan

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf


def faulty_trainer(run: Path, shards: TokenShards, tok: Tokenizer, bad: int, grad: bool = False, **settings):
    trainer = quick_trainer(run, shards, tok, max_steps=STEPS, **settings)
    trainer.objective = Faulty(trainer.objective, bad, grad)
    return trainer


# ------------------------------------------------------------------ a full disk
def full_disk_at(monkeypatch: pytest.MonkeyPatch, failing_save: int) -> None:
    """Make save number ``failing_save`` run out of space halfway: the model files are written, the optimizer
    file is cut short and its write raises ENOSPC."""
    saves = []
    save_file = checkpoint.save_file

    def write(tensors, path, *args, **kwargs):
        if path.endswith("optimizer.safetensors"):
            saves.append(path)
            if len(saves) == failing_save:
                Path(path).write_bytes(b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
        return save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", write)


def test_disk_full_mid_checkpoint_keeps_the_last_good_one_and_resume_is_bit_identical(
    shards: TokenShards, tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: dict
) -> None:
    full_disk_at(monkeypatch, 2)  # the step-4 checkpoint
    with pytest.raises(LmforgeError) as err:
        quick_trainer(tmp_path, shards, tok, max_steps=STEPS).fit()
    good = tmp_path / "checkpoints" / "step-000002"
    assert (
        err.value.message
        == f"could not save to {tmp_path / 'checkpoints' / 'step-000004'}: No space left on device"
    )
    assert f"`--resume` continues from {good}" in (err.value.hint or "")
    assert step_names(tmp_path) == ["step-000002"]  # no temporary folder, no half checkpoint
    assert_checkpoint_loads(good, 2)
    monkeypatch.undo()  # space freed
    result = quick_trainer(tmp_path, shards, tok, max_steps=STEPS).fit(resume=True)
    assert len(result.losses) == STEPS - 2
    assert_same_weights(tmp_path, reference)


def test_disk_full_is_one_line_at_the_cli_and_resume_finishes_the_run(
    shards_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "运行"  # a Chinese run folder: paths in the messages stay readable
    args = ["pretrain", "--arch", "tiny-llama", "--data", str(shards_dir), "--out", str(run)]
    args += ["--max-steps", "4", "--micro-batch-size", "2", "--block-size", "16", "--eval-every", "0"]
    args += ["--save-every", "2", "--no-progress", "--device", "cpu", "--on-nan", "stop"]
    args += ["--warmup-steps", "2"]  # below --max-steps: no warning line beside the error
    full_disk_at(monkeypatch, 1)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: could not save to {run / 'checkpoints' / 'step-000002'}: No space left")
    assert "no checkpoint was written yet" in err
    assert not (run / "checkpoints").exists() or step_names(run) == []
    monkeypatch.undo()
    shutil.rmtree(run)
    full_disk_at(monkeypatch, 2)  # a fresh run now gets one checkpoint further
    assert main(args) == 2
    assert f"`--resume` continues from {run / 'checkpoints' / 'step-000002'}" in capsys.readouterr().err
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert [r["step"] for r in csv_rows(run)] == ["1", "2", "3", "4"]
    assert_checkpoint_loads(run / "checkpoints" / "step-000004", 4)


def test_disk_full_writing_the_final_model_keeps_the_run_resumable(
    shards: TokenShards, tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: dict
) -> None:
    def full_disk(*args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop, "write_model_files", full_disk)  # the final model/ only, not the checkpoints
    with pytest.raises(LmforgeError) as err:
        quick_trainer(tmp_path, shards, tok, max_steps=STEPS).fit()
    assert err.value.message == f"could not save to {tmp_path / 'model'}: No space left on device"
    last = tmp_path / "checkpoints" / f"step-00000{STEPS}"
    assert f"`--resume` continues from {last}" in (err.value.hint or "")
    assert not (tmp_path / "model").exists()
    monkeypatch.undo()
    assert quick_trainer(tmp_path, shards, tok, max_steps=STEPS).fit(resume=True).losses == []
    assert_same_weights(tmp_path, reference)


# ------------------------------------------------------------------ NaN / Inf
def test_nan_loss_stops_before_the_update_and_resume_is_bit_identical(
    shards: TokenShards, tok: Tokenizer, tmp_path: Path, reference: dict
) -> None:
    with pytest.raises(LmforgeError) as err:
        faulty_trainer(tmp_path, shards, tok, bad=4).fit()  # batch 4 is step 5's (grad_accum 1)
    assert (
        err.value.message == "non-finite loss (nan) in batch 4 at step 5: the run stopped without applying it"
    )
    hint = err.value.hint or ""
    assert f"`--resume` continues from {tmp_path / 'checkpoints' / 'step-000004'}" in hint
    assert "--on-nan skip" in hint
    assert step_names(tmp_path) == ["step-000002", "step-000004"] and not (tmp_path / "model").exists()
    saved = load_file(str(tmp_path / "checkpoints" / "step-000004" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    result = quick_trainer(tmp_path, shards, tok, max_steps=STEPS).fit(resume=True)
    assert len(result.losses) == 2 and result.skipped == []
    assert_same_weights(tmp_path, reference)


def test_skipped_step_changes_neither_weights_nor_optimizer_state(
    shards: TokenShards, tok: Tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Gradient accumulation 2: step 3 reads batches 4 and 5; batch 5 gives an infinite gradient, finite loss.
    settings = dict(grad_accum=2, save_every=1, keep_last=9, on_nan="skip")
    result = faulty_trainer(tmp_path, shards, tok, bad=5, grad=True, **settings).fit()
    assert result.skipped == [3] and math.isfinite(result.losses[2])  # the loss was finite, the gradient not
    warning = capsys.readouterr().err
    # inf, or nan once an infinity meets a zero on the way back through the layers
    assert re.search(
        r"warning: non-finite gradient norm \((inf|nan)\) in batches 4-5 at step 3: step skipped", warning
    )
    folders = tmp_path / "checkpoints"
    for name in ("model.safetensors", "optimizer.safetensors"):
        before, after, next_ = (load_file(str(folders / f"step-00000{s}" / name)) for s in (2, 3, 4))
        assert all(torch.equal(before[k], after[k]) for k in before), name
        assert not all(torch.equal(after[k], next_[k]) for k in after), name  # training went on
    assert [r["loss"] == "" for r in csv_rows(tmp_path)] == [False, False, True, False, False, False]
    assert all(torch.isfinite(t).all() for t in weights(tmp_path).values())


def test_on_nan_is_a_setting_with_one_error_for_a_bad_value(tmp_path: Path, capsys) -> None:
    assert TrainConfig.from_dict({"on_nan": "skip"}).on_nan == "skip"
    with pytest.raises(LmforgeError, match="on_nan='ignore' must be stop or skip"):
        TrainConfig(on_nan="ignore")  # type: ignore[arg-type]
    yaml_file = tmp_path / "跑.yaml"
    yaml_file.write_text("train: {on_nan: ignore}\n", encoding="utf-8")
    assert main(["pretrain", "--config", str(yaml_file), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "on_nan must be one of stop, skip, not 'ignore'" in err, err


# ------------------------------------------------------------------ a damaged newest checkpoint
@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.safetensors", "trainer_state.json"])
def test_resume_falls_back_from_a_truncated_newest_checkpoint_with_a_warning(
    damaged: str, shards: TokenShards, tok: Tokenizer, tmp_path: Path, capsys, reference: dict
) -> None:
    quick_trainer(tmp_path, shards, tok, max_steps=STEPS).fit()
    newest, previous = tmp_path / "checkpoints" / "step-000006", tmp_path / "checkpoints" / "step-000004"
    path = newest / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    shutil.rmtree(tmp_path / "model")  # so the weights compared below are the resumed run's
    capsys.readouterr()
    result = quick_trainer(tmp_path, shards, tok, max_steps=STEPS).fit(resume=True)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert str(newest) in warnings[0] and "damaged" in warnings[0]
    assert warnings[0].endswith(f"resuming from {previous} instead")
    assert len(result.losses) == 2
    assert_same_weights(tmp_path, reference)


def test_resume_with_every_checkpoint_damaged_is_one_error(
    shards: TokenShards, tok: Tokenizer, tmp_path: Path
) -> None:
    quick_trainer(tmp_path, shards, tok, max_steps=4).fit()
    for folder in (tmp_path / "checkpoints").iterdir():
        (folder / "trainer_state.json").write_text("{", encoding="utf-8")
    with pytest.raises(LmforgeError) as err:
        quick_trainer(tmp_path, shards, tok, max_steps=4).fit(resume=True)
    assert err.value.message.startswith(f"every checkpoint in {tmp_path / 'checkpoints'} is damaged")
    assert "step-000004" in err.value.message and "without --resume" in (err.value.hint or "")


def test_resume_puts_back_a_best_checkpoint_a_killed_replace_moved_aside(
    shards: TokenShards, tok: Tokenizer, tmp_path: Path
) -> None:
    quick_trainer(tmp_path, shards, tok, max_steps=4, eval_every=2, eval_batches=1).fit()
    folder = tmp_path / "checkpoints"
    state = (folder / "best" / "trainer_state.json").read_bytes()
    (folder / "best").rename(folder / ".best.old-1234abcd")  # killed between the replace's two renames
    (folder / ".step-000006.tmp-5678abcd").mkdir()  # killed while writing the next one
    checkpoint.remove_partial(tmp_path)  # what --resume does first
    assert sorted(p.name for p in folder.iterdir()) == ["best", "step-000002", "step-000004"]
    assert (folder / "best" / "trainer_state.json").read_bytes() == state
