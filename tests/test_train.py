"""Tests for the pretraining ``Trainer``: loss parity with transformers, exact resume after SIGKILL, DDP and
FSDP against one process, the metrics files, and clear errors for bad input.

The oracles are code nobody here wrote: transformers' ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` with plain
``torch.optim.AdamW`` for the losses, an uninterrupted run for resume (bitwise), a single process for DDP/FSDP,
and TensorBoard's own ``EventAccumulator`` / matplotlib's PNG reader for the logs.

Processes that get killed, or run under ``torch.distributed.run``, execute ``CHILD`` (written to a temporary
folder). Every test runs torch on one thread: on a busy 2-core machine two OpenMP threads per process are
several times slower for models this small.
"""

from __future__ import annotations

import csv
import errno
import importlib.util
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lmforge.train.checkpoint as checkpoint
from lmforge import Config, LmforgeError, Tokenizer, Transformer, progress
from lmforge.data import TokenShards, prepare_corpus
from lmforge.data.text import LanguageModelingObjective
from lmforge.formats.folder import load_model_folder, save_model_folder
from lmforge.progress import progress_bar, tracked
from lmforge.tokenizer import train_tokenizer
from lmforge.train import TrainConfig, Trainer
from lmforge.train.schedule import learning_rate

from .conftest import TEST_DATA, one_intra_op_thread

BLOCK = 32  # training window; the models' context is 64
DATA_SEED = 7

# A training process for the tests below. Everything it does is a function of its arguments: the seed is
# set before the model is built, and batches are a function of the step. Test-only hooks, by environment:
#   THROTTLE=s          sleep s seconds per micro-batch, so a poller can kill the run mid-way
#   HANG_AT_SAVE=N      once step-N's model files are written, create OUT/HANGING and sleep (killed there)
#   WRITES_LOG=p        append every folder this process saves to p.format(rank=RANK)
#   LOSSES_OUT=p        write TrainResult.losses as JSON to p.format(rank=RANK)
#   NO_PLOT=1           skip drawing loss.png (matplotlib costs seconds per process; tested on its own below)
CHILD = """
import json, os, sys, time
from pathlib import Path

import torch


def build(shards_dir, settings):
    from lmforge import Config, Transformer
    from lmforge.data import TokenShards
    from lmforge.data.text import LanguageModelingObjective
    from lmforge.train import TrainConfig, Trainer

    settings = dict(settings)
    preset, dropout, seed = settings.pop("preset"), settings.pop("dropout", 0.0), settings.pop("data_seed")
    shards = TokenShards(shards_dir)
    tok = shards.tokenizer()
    torch.manual_seed(0)
    config = Config.from_name(
        preset, vocab_size=tok.vocab_size, block_size=64, dropout=dropout,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
    )
    model = Transformer(config)
    train = TrainConfig(**settings)
    task = LanguageModelingObjective(shards, train.micro_batch_size, train.block_size, seed=seed)
    return Trainer(model, tok, task, train)


def main(argv):
    import lmforge.train.loop as loop_mod
    import lmforge.train.checkpoint as ckpt
    from lmforge.data.text import LanguageModelingObjective

    torch.set_num_threads(1)
    shards_dir, settings, resume = argv[0], json.loads(argv[1]), "--resume" in argv
    rank = os.environ.get("RANK", "0")
    if os.environ.get("NO_PLOT"):
        from lmforge.train.metrics import MetricsLogger

        MetricsLogger.plot = lambda self: None
    if os.environ.get("THROTTLE"):
        delay, draw = float(os.environ["THROTTLE"]), LanguageModelingObjective.train_batch

        def slow_draw(self, *args):
            time.sleep(delay)
            return draw(self, *args)

        LanguageModelingObjective.train_batch = slow_draw
    if os.environ.get("HANG_AT_SAVE"):
        prefix, write = f".step-{int(os.environ['HANG_AT_SAVE']):06d}.tmp-", ckpt.write_model_files

        def hanging_write(folder, *args, **kwargs):
            write(folder, *args, **kwargs)
            if folder.name.startswith(prefix):
                Path(settings["out_dir"], "HANGING").write_text(str(folder))
                time.sleep(600)

        ckpt.write_model_files = hanging_write
    if os.environ.get("WRITES_LOG"):
        log = Path(os.environ["WRITES_LOG"].format(rank=rank))

        def logged(atomic):
            def write(target, *args, **kwargs):
                with log.open("a") as f:
                    f.write(str(target) + "\\n")
                return atomic(target, *args, **kwargs)
            return write

        ckpt.atomic_write_folder = logged(ckpt.atomic_write_folder)
        loop_mod.atomic_write_folder = logged(loop_mod.atomic_write_folder)
    result = build(shards_dir, settings).fit(resume=resume)
    if os.environ.get("LOSSES_OUT"):
        Path(os.environ["LOSSES_OUT"].format(rank=rank)).write_text(json.dumps(result.losses))


if __name__ == "__main__":
    main(sys.argv[1:])
"""

# The run that gets killed and resumed: dropout (so the RNG state matters), gradient accumulation, warmup +
# cosine, clipping, evaluation, samples (which must not move the global RNG), and frequent checkpoints.
RESUME_SETTINGS = dict(
    preset="tiny-gpt2",
    data_seed=DATA_SEED,
    dropout=0.1,
    max_steps=24,
    micro_batch_size=4,
    grad_accum=2,
    block_size=BLOCK,
    lr=3e-3,
    warmup_steps=4,
    eval_every=6,
    eval_batches=2,
    save_every=4,
    keep_last=2,
    sample_prompt="ROMEO:",
    sample_tokens=4,
    progress=False,
    device="cpu",
)


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread_for_the_module():
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = (TEST_DATA / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000]
    tok = train_tokenizer(iter([text]), 384, show_progress=False)
    folder = tmp_path_factory.mktemp("shards")
    prepare_corpus(iter([text]), tok, folder, val_fraction=0.1, show_progress=False)
    return folder


@pytest.fixture(scope="module")
def shards(shards_dir: Path) -> TokenShards:
    return TokenShards(shards_dir)


@pytest.fixture(scope="module")
def tok(shards: TokenShards) -> Tokenizer:
    return shards.tokenizer()


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("child") / "train_child.py"
    path.write_text(CHILD)
    return path


def child_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_child", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "NO_PLOT": "1", **extra}


def start_child(
    child: Path, shards_dir: Path, settings: dict, log: Path, resume: bool = False, **env: str
) -> subprocess.Popen:
    args = [sys.executable, str(child), str(shards_dir), json.dumps(settings)] + (
        ["--resume"] if resume else []
    )
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=child_env(**env))


def finish(proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    assert proc.wait(timeout=timeout) == 0, log.read_text(errors="replace")[-3000:]


def csv_rows(run: Path) -> list[dict[str, str]]:
    path = run / "metrics.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def loss_columns(run: Path) -> list[tuple[str, str, str, str]]:
    """What must be bitwise equal after a resume: everything but the timings."""
    return [(r["step"], r["loss"], r["lr"], r["val_loss"]) for r in csv_rows(run)]


def tiny_model(preset: str, tok: Tokenizer, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    options = dict(vocab_size=tok.vocab_size, block_size=64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    return Transformer(Config.from_name(preset, **{**options, **overrides}))


def quick_trainer(out: Path, shards: TokenShards, tok: Tokenizer, **settings) -> Trainer:
    defaults = dict(
        out_dir=str(out),
        max_steps=4,
        micro_batch_size=2,
        block_size=BLOCK,
        lr=1e-3,
        warmup_steps=0,
        eval_every=0,
        save_every=2,
        progress=False,
        device="cpu",
    )
    config = TrainConfig(**{**defaults, **settings})
    task = LanguageModelingObjective(shards, config.micro_batch_size, config.block_size, seed=DATA_SEED)
    return Trainer(tiny_model("tiny-llama", tok), tok, task, config)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_when(condition, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as ``condition()`` holds (polled every few milliseconds)."""
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            ended = proc.poll() is not None
            assert not ended, "the run ended before the kill:\n" + log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "timed out waiting for the run"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


# ------------------------------------------------------------------ 1. loss parity with transformers
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_losses_match_transformers_with_plain_adamw(
    preset: str, shards: TokenShards, tok: Tokenizer, tmp_path: Path
) -> None:
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    steps, lr = 20, 1e-3
    model = tiny_model(preset, tok)
    save_model_folder(tmp_path / "init", model.config, model.state_dict(), tok)
    hf_class = GPT2LMHeadModel if preset == "tiny-gpt2" else LlamaForCausalLM
    hf = hf_class.from_pretrained(tmp_path / "init", torch_dtype=torch.float32)
    assert hf.dtype == torch.float32

    task = LanguageModelingObjective(shards, 4, BLOCK, seed=DATA_SEED)
    config = TrainConfig(
        out_dir=str(tmp_path / "run"),
        max_steps=steps,
        micro_batch_size=4,
        block_size=BLOCK,
        lr=lr,
        decay="constant",
        warmup_steps=0,
        weight_decay=0.0,
        grad_clip=0,
        eval_every=0,
        precision="fp32",
        progress=False,
        device="cpu",
    )
    ours = Trainer(model, tok, task, config).fit().losses

    hf.train()  # no dropout: the configs carry dropout 0
    optimizer = torch.optim.AdamW(
        hf.parameters(), lr=lr, betas=(config.beta1, config.beta2), weight_decay=0.0
    )
    reference = []
    for step in range(steps):
        batch = task.train_batch(step, 0, 1)
        # transformers shifts labels itself: give it the whole (B, T+1) window.
        window = torch.cat([batch["input_ids"], batch["targets"][:, -1:]], dim=1)
        loss = hf(input_ids=window, labels=window).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reference.append(loss.item())

    assert len(ours) == steps
    assert reference[-1] < reference[0] - 0.3  # it learns: the comparison is not between two flat lines
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)
    logged = [float(r["loss"]) for r in csv_rows(tmp_path / "run")]
    assert logged == ours


# ------------------------------------------------------------------ 2. exact resume after SIGKILL
@pytest.fixture(scope="module")
def uninterrupted(child: Path, shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    log = run.parent / "log.txt"
    finish(start_child(child, shards_dir, {**RESUME_SETTINGS, "out_dir": str(run)}, log), log)
    return run


def assert_same_run(run: Path, reference: Path) -> None:
    expected = loss_columns(reference)
    assert [r[0] for r in expected] == [str(s) for s in range(1, RESUME_SETTINGS["max_steps"] + 1)]
    assert loss_columns(run) == expected  # as strings: bitwise
    # The final weights too, byte for byte.
    assert (run / "model" / "model.safetensors").read_bytes() == (
        reference / "model" / "model.safetensors"
    ).read_bytes()


def test_resume_after_sigkill_mid_run_is_exact(
    child: Path, shards_dir: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    settings = {**RESUME_SETTINGS, "out_dir": str(tmp_path / "run")}
    run, log = tmp_path / "run", tmp_path / "log.txt"
    # A step after the first checkpoint, and far enough from the end that the kill lands before it.
    kill_after = random.Random(20240611).randint(settings["save_every"] + 1, settings["max_steps"] - 8)
    proc = start_child(child, shards_dir, settings, log, THROTTLE="0.04")
    kill_when(lambda: len(csv_rows(run)) >= kill_after, proc, log)
    logged = len(csv_rows(run))
    assert kill_after <= logged < settings["max_steps"]
    saved = checkpoint.checkpoints(run)
    assert saved and saved[-1][0] < settings["max_steps"]

    finish(start_child(child, shards_dir, settings, log, resume=True), log)
    assert_same_run(run, uninterrupted)


def test_resume_after_sigkill_during_checkpoint_write_is_exact(
    child: Path, shards_dir: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    settings = {**RESUME_SETTINGS, "out_dir": str(tmp_path / "run")}
    run, log = tmp_path / "run", tmp_path / "log.txt"
    every = settings["save_every"]
    step = random.Random(20240612).choice(range(2 * every, settings["max_steps"], every))
    proc = start_child(child, shards_dir, settings, log, HANG_AT_SAVE=str(step))
    kill_when((run / "HANGING").exists, proc, log)

    folder = run / "checkpoints"
    partial = list(folder.glob(f".step-{step:06d}.tmp-*"))
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
    assert not (folder / f"step-{step:06d}").exists()
    assert checkpoint.checkpoints(run)[-1][0] == step - every

    finish(start_child(child, shards_dir, settings, log, resume=True), log)
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert_same_run(run, uninterrupted)


# ------------------------------------------------------------------ 3. DDP and FSDP against one process
DDP_SETTINGS = dict(
    preset="tiny-gpt2",
    data_seed=DATA_SEED,
    max_steps=10,
    grad_accum=2,
    block_size=BLOCK,
    lr=2e-3,
    warmup_steps=2,
    eval_every=5,
    eval_batches=2,
    save_every=4,
    progress=False,
    device="cpu",
)
MICRO = 2  # per process; the single process takes 2 * MICRO


@pytest.fixture(scope="module")
def single_process(child: Path, shards_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("single") / "run"
    settings = {**DDP_SETTINGS, "micro_batch_size": 2 * MICRO, "out_dir": str(run)}
    result = child_module(child).build(str(shards_dir), settings).fit()
    return result.losses, load_file(str(run / "model" / "model.safetensors"))


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one_process(
    fsdp: bool, child: Path, shards_dir: Path, single_process, tmp_path: Path
) -> None:
    run, log = tmp_path / "run", tmp_path / "log.txt"
    settings = {**DDP_SETTINGS, "micro_batch_size": MICRO, "fsdp": fsdp, "out_dir": str(run)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(child),
        str(shards_dir),
        json.dumps(settings),
    ]
    env = child_env(
        LOSSES_OUT=str(tmp_path / "losses-{rank}.json"), WRITES_LOG=str(tmp_path / "writes-{rank}.txt")
    )
    with log.open("wb") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300)
    assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]

    expected_losses, expected_weights = single_process
    for rank in (0, 1):
        losses = json.loads((tmp_path / f"losses-{rank}.json").read_text())
        np.testing.assert_allclose(losses, expected_losses, rtol=0, atol=1e-5)
    # The model the run saved is the one trained (gathered from the shards under FSDP).
    weights = load_file(str(run / "model" / "model.safetensors"))
    assert sorted(weights) == sorted(expected_weights)
    for name, value in expected_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-4, msg=name)

    # Only rank 0 wrote: its saves are logged, rank 1 saved nothing; one CSV row per step, one event file.
    written = (tmp_path / "writes-0.txt").read_text().split()
    expected_saves = {"step-000004", "step-000008", "step-000010", "best", "model"}
    assert {Path(p).name for p in written} == expected_saves
    assert not (tmp_path / "writes-1.txt").exists()
    assert [r["step"] for r in csv_rows(run)] == [str(s) for s in range(1, 11)]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"step-000008", "step-000010", "best"}


# ------------------------------------------------------------------ 4. metrics files
def test_metrics_csv_tensorboard_and_png(shards: TokenShards, tok: Tokenizer, tmp_path: Path) -> None:
    import matplotlib.image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    result = quick_trainer(run, shards, tok, max_steps=8, eval_every=4, eval_batches=2, save_every=None).fit()

    with (run / "metrics.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        assert {"step", "loss", "lr", "tokens_per_s", "val_loss", "val_ppl"} <= set(reader.fieldnames or [])
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [float(r["loss"]) for r in rows] == result.losses
    assert all(float(r["lr"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows)
    val = {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]}
    assert sorted(val) == [4, 8] and val[8] == result.val_loss
    assert all(
        math.isclose(float(r["val_ppl"]), math.exp(float(r["val_loss"])), rel_tol=1e-9)
        for r in rows
        if r["val_loss"]
    )

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/tokens_per_s", "val/val_loss"} <= set(events.Tags()["scalars"])
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 9))
    np.testing.assert_allclose([e.value for e in losses], result.losses, rtol=1e-6)
    assert [e.step for e in events.Scalars("val/val_loss")] == [4, 8]

    png = run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] >= 100 and pixels.shape[1] >= 100
    assert pixels.std() > 0.01
    colors = np.unique(pixels.reshape(-1, pixels.shape[-1]).round(2), axis=0)
    assert len(colors) > 20  # axes, text, two curves and their anti-aliasing, not a blank canvas


# ------------------------------------------------------------------ 5. bad input
def test_tokenizer_larger_than_model_vocabulary(shards: TokenShards, tok: Tokenizer, tmp_path: Path) -> None:
    model = tiny_model("tiny-llama", tok, vocab_size=tok.vocab_size - 1)
    task = LanguageModelingObjective(shards, 2, BLOCK)
    with pytest.raises(LmforgeError) as err:
        Trainer(model, tok, task, TrainConfig(out_dir=str(tmp_path), block_size=BLOCK))
    assert err.value.message == (
        f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {tok.vocab_size - 1}"
    )
    assert f"vocab_size >= {tok.vocab_size}" in (err.value.hint or "")


def test_block_size_beyond_model_context(shards: TokenShards, tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(LmforgeError) as err:
        quick_trainer(tmp_path, shards, tok, block_size=65)
    assert err.value.message == "block_size 65 is longer than the model's context of 64 tokens"
    assert "block_size <= 64" in (err.value.hint or "")


def assert_checkpoint_loads(folder: Path, step: int) -> None:
    state, optimizer, rng = checkpoint.read_checkpoint(folder)
    assert state["step"] == step and optimizer["state"] and "torch" in rng
    config, weights, tokenizer, _ = load_model_folder(folder)
    assert "wte.weight" in weights and tokenizer.vocab_size == config.vocab_size


# A damaged newest checkpoint: tests/test_train_failures.py (resume falls back to the one before it).


def test_resume_without_checkpoints(shards: TokenShards, tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(LmforgeError) as err:
        quick_trainer(tmp_path / "empty", shards, tok).fit(resume=True)
    assert err.value.message == f"nothing to resume in {tmp_path / 'empty'}: no checkpoints"
    assert "without --resume" in (err.value.hint or "")


def test_new_run_refuses_a_folder_with_checkpoints(
    shards: TokenShards, tok: Tokenizer, tmp_path: Path
) -> None:
    quick_trainer(tmp_path, shards, tok, max_steps=2).fit()
    before = (tmp_path / "metrics.csv").read_bytes()
    with pytest.raises(LmforgeError) as err:
        quick_trainer(tmp_path, shards, tok, max_steps=2).fit()
    assert err.value.message == f"{tmp_path} already holds checkpoints"
    assert "--resume" in (err.value.hint or "")
    assert (tmp_path / "metrics.csv").read_bytes() == before
    assert_checkpoint_loads(tmp_path / "checkpoints" / "step-000002", 2)


def test_failed_save_keeps_the_previous_checkpoint(
    shards: TokenShards, tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root, where a read-only folder does not stop writes: inject the error instead.
    calls = []
    write = checkpoint.write_model_files

    def full_disk(folder: Path, *args, **kwargs) -> None:
        calls.append(folder)
        if len(calls) == 2:
            (folder / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        write(folder, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_model_files", full_disk)
    with pytest.raises(LmforgeError) as err:
        quick_trainer(tmp_path, shards, tok, max_steps=6).fit()
    target = tmp_path / "checkpoints" / "step-000004"
    assert err.value.message == f"could not save to {target}: No space left on device"
    assert "disk space" in str(err.value)
    assert not target.exists()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002"]  # no temporary folder left behind
    assert_checkpoint_loads(folder / "step-000002", 2)


# ------------------------------------------------------------------ 6. learning-rate schedule
def test_learning_rate_schedule() -> None:
    def lr(step: int, decay: str = "cosine", warmup: int = 10, total: int = 110) -> float:
        return learning_rate(step, lr=1e-3, min_lr=1e-4, warmup=warmup, total=total, decay=decay)

    # Linear warmup: step 0 is already 1/warmup of the peak, step warmup-1 the peak itself.
    assert [lr(s) for s in range(10)] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lr(10) == pytest.approx(1e-3)
    # Cosine: halfway between peak and floor at the midpoint, the floor at the end, monotone in between.
    assert lr(60) == pytest.approx(5.5e-4)
    assert lr(109) == pytest.approx(1e-4, rel=1e-2)  # the last step of 110: just above the floor
    assert lr(110) == pytest.approx(1e-4) and lr(500) == pytest.approx(1e-4)
    decayed = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decayed, decayed[1:], strict=False))
    # Linear decay and constant.
    assert lr(60, "linear") == pytest.approx(5.5e-4) and lr(110, "linear") == pytest.approx(1e-4)
    assert [lr(s, "constant") for s in (10, 50, 109)] == [1e-3] * 3
    assert lr(3, "constant") == pytest.approx(4e-4)  # warmup applies to every decay
    assert lr(0, warmup=0) == 1e-3  # no warmup: the peak from the first step


def test_progress_written_to_a_log_file_refreshes_twice_a_minute_not_every_step(
    tmp_path, shards, tok, capsys
):
    bar = progress_bar(total=500, unit="step")  # pytest's captured stderr is a file, as under nohup or CI
    for _ in range(500):
        bar.update()
        time.sleep(0.001)
    bar.close()
    log = capsys.readouterr().err
    assert bar.mininterval == 30 and bar.maxinterval == 30  # tqdm's monitor would redraw every 10 s
    # Plain lines, no redraw debris: start and end (a terminal would have had ~5 refreshes).
    assert "500/500" in log and "\r" not in log and "\x1b" not in log and len(log.splitlines()) <= 3, log
    # The trainer's bar too: its per-step loss and tokens/s must not force a refresh of their own, and the
    # validation loss appears only once there is one (never "val=nan").
    quick_trainer(tmp_path, shards, tok, max_steps=12, save_every=None, progress=True, eval_every=12).fit()
    log = capsys.readouterr().err
    assert "12/12" in log and "\r" not in log and len(log.splitlines()) <= 3, log
    assert "nan" not in log and "val=" in log.splitlines()[-1], log


def test_batch_work_shows_a_bar_only_once_it_has_lasted_a_moment(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_REFRESH_SECONDS", 0.1)  # a log file's 30 s, shortened
    assert list(tracked([1, 2, 3], "quick", delay=0.5)) == [1, 2, 3]
    assert capsys.readouterr().err == ""  # classifying one sentence prints nothing
    for _ in tracked([1, 2, 3], "slow", delay=0.2):
        time.sleep(0.15)
    assert "slow" in capsys.readouterr().err
