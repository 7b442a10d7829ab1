"""The model store: dedup, lineage from training runs, rm + gc, integrity on load, names, concurrency, crashes."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import torch

from lmforge import LLM, LmforgeError
from lmforge import store as store_module
from lmforge.cli import main
from lmforge.loading import describe_source, import_model, locate_model
from lmforge.recipes.finetune import finetune
from lmforge.store import Store, parse_ref

from .conftest import SAMPLE_TEXT, tiny_llm

SPAM = ["WINNER! claim your free prize now", "免费领取大奖，立即回复", "URGENT cash prize, call now"]
HAM = ["see you at lunch tomorrow", "明天一起吃午饭吧", "can you send me the notes?"]
TRAIN = {"max_steps": 4, "micro_batch_size": 6, "lr": 3e-3, "warmup_steps": 0, "eval_every": 4}
TRAIN |= {"eval_batches": 1, "progress": False}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own store; the real ~/.lmforge is never touched."""
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer) -> tuple[Path, Path]:
    """Two different tiny models (different weights) with the same tokenizer."""
    root = tmp_path_factory.mktemp("models")
    return tuple(tiny_llm("tiny-llama", tiny_tokenizer, seed=s).save(root / f"m{s}") for s in (0, 1))


def blob_names(home: Path) -> set[str]:
    return {p.name for p in (home / "blobs").iterdir()}


def disk_bytes(folder: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in folder.rglob("*"))


def logits(llm: LLM) -> torch.Tensor:
    with torch.no_grad():
        return llm.model(torch.tensor([[1, 5, 9, 42, 7]]))[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_tags_of_one_model_share_blobs_and_models_share_their_tokenizer(home, models):
    store = Store()
    first = store.put(models[0], "tiny:v1")
    store.cp("tiny:v1", "tiny:v2")
    assert store.tag("tiny:v1", "best")["name"] == "tiny"
    store.put(models[0], "tiny:again")  # the same folder stored twice: nothing new
    assert blob_names(home) == {e["digest"].replace(":", "-") for e in first["files"].values()}
    assert {f"{m['name']}:{m['tag']}" for m in store.list_models()} == {
        "tiny:v1",
        "tiny:v2",
        "tiny:best",
        "tiny:again",
    }
    other = store.put(models[1], "other")
    assert other["tag"] == "latest"
    assert other["files"]["tokenizer.json"] == first["files"]["tokenizer.json"]
    assert other["files"]["model.safetensors"] != first["files"]["model.safetensors"]
    assert len(blob_names(home)) == len(first["files"]) + 2  # only the weights and the card differ
    assert store.verify().ok
    # A namespaced name looks like a hub id; the stored model wins, no download is tried.
    store.cp("other", "team/other")
    assert locate_model("team/other") == ("store", store.open("other:latest"))


def test_load_by_name_gives_the_folder_logits_and_a_local_path_wins(home, models, tmp_path, monkeypatch):
    Store().put(models[0], "tiny")  # tag latest
    folder = LLM.load(models[0], dtype="float32", device="cpu")
    stored = LLM.load("tiny", dtype="float32", device="cpu")
    assert stored.source == "tiny"
    assert torch.equal(logits(stored), logits(folder))
    # Precedence: an existing folder of that name beats the store entry.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(models[1], tmp_path / "tiny")
    local = LLM.load("tiny", dtype="float32", device="cpu")
    assert local.source == "tiny" and not torch.equal(logits(local), logits(folder))
    assert Path(local.source).is_dir()


def test_rm_keeps_files_until_gc_frees_the_ones_no_model_uses(home, models, capsys):
    store = Store()
    a, b = store.put(models[0], "a:v1"), store.put(models[1], "b:v1")
    blobs = blob_names(home)
    assert main(["rm", "a:v1"]) == 0
    assert "removed a:v1" in capsys.readouterr().out
    assert blob_names(home) == blobs and not (home / "manifests" / "a").exists()
    only_a = {e["digest"]: e["size"] for e in a["files"].values()}
    for entry in b["files"].values():
        only_a.pop(entry["digest"], None)
    assert set(only_a) == {a["files"][f]["digest"] for f in ("model.safetensors", "README.md")}
    before = disk_bytes(home)
    report = store.gc()
    assert (report.blobs, report.bytes_freed) == (2, sum(only_a.values()))
    assert before - disk_bytes(home) >= sum(only_a.values())  # measured on disk
    assert store.gc().bytes_freed == 0
    assert LLM.load("b:v1").config.n_layer == 2 and store.verify().ok
    assert main(["rm", "a:v1"]) == 2
    assert "no model 'a:v1'" in capsys.readouterr().err


def test_corrupt_blob_is_a_one_line_error_on_load_and_in_verify(home, models, capsys):
    store = Store()
    digest = store.put(models[0], "good:v1")["files"]["model.safetensors"]["digest"]
    blob = home / "blobs" / digest.replace(":", "-")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped deep in the weights: same size, wrong content
    blob.write_bytes(bytes(data))
    with pytest.raises(LmforgeError) as caught:
        LLM.load("good:v1")
    message = str(caught.value)
    assert "\n" not in message
    assert "good:v1: model.safetensors" in message and "corrupt" in message and "lmforge verify" in message
    err = one_line_error(capsys, main(["info", "good:v1"]))
    assert "model.safetensors" in err
    report = store.verify()
    assert not report.ok and report.corrupt == {digest: ["good:v1"]}
    assert "problem" in one_line_error(capsys, main(["verify"]))
    import_model(models[0], "good:v1", store=store)  # the fix the error names
    assert store.verify().ok and LLM.load("good:v1").config.n_layer == 2


@pytest.mark.parametrize(
    "bad", ["../x", "/etc/passwd", "a:b:c", "", "a:", "x" * 200, "a/b/c", ".hidden", "中文模型"]
)
def test_bad_names_are_refused_before_anything_is_written(bad, home, models, tmp_path, capsys):
    store = Store()
    store.put(models[0], "ok:v1")
    with pytest.raises(LmforgeError, match="invalid model name"):
        store.put(models[0], bad)
    with pytest.raises(LmforgeError, match="invalid model name"):
        store.cp("ok:v1", bad)
    with pytest.raises(LmforgeError, match="invalid model name"):
        parse_ref(bad)
    err = one_line_error(capsys, main(["cp", "ok:v1", bad]))
    assert "invalid model name" in err and "names look like" in err
    one_line_error(capsys, main(["import", str(models[0]), "--name", bad]))
    assert [f"{m['name']}:{m['tag']}" for m in store.list_models()] == ["ok:v1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # nothing escaped the store


def test_training_runs_record_lineage_and_eval_adds_metrics(home, models, tmp_path, capsys):
    # Pretrain (CLI, --save-as) -> fine-tune that stored model (Python, save_as) -> a third generation.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(SAMPLE_TEXT * 30), encoding="utf-8")
    shards = tmp_path / "shards"
    args = ["data", "prepare", str(corpus), "--tokenizer", str(models[0]), "--out", str(shards)]
    assert main([*args, "--val-fraction", "0.1"]) == 0
    args = ["pretrain", "--arch", "tiny-llama", "--data", str(shards), "--out", str(tmp_path / "pre")]
    args += ["--max-steps", "2", "--micro-batch-size", "2", "--block-size", "16", "--eval-every", "0"]
    assert main([*args, "--no-progress", "--save-as", "pre:v1"]) == 0
    assert "stored as pre:v1" in capsys.readouterr().out
    store = Store()
    pre = store.show("pre:v1")
    assert pre["parent"] is None and pre["lineage"] == []
    assert (pre["recipe"]["recipe"], pre["recipe"]["preset"]) == ("pretrain", "tiny-llama")
    assert pre["recipe"]["train"]["block_size"] == 16 and pre["metrics"]["train"]["steps"] == 2
    assert {Path(f["path"]).name for f in pre["data"]["files"]} >= {"meta.json", "tokenizer.json"}

    rows = [{"text": t, "label": "spam"} for t in SPAM] + [{"text": t, "label": "ham"} for t in HAM]
    train, val = write_jsonl(tmp_path / "train.jsonl", rows * 2), write_jsonl(tmp_path / "val.jsonl", rows)
    finetune(
        "pre:v1",
        train,
        val_file=val,
        task="classify",
        method="freeze",
        train_last_blocks=1,
        train={**TRAIN, "out_dir": str(tmp_path / "tune")},
        save_as="spam:v1",
    )
    info = store.show("spam:v1")
    assert info["parent"] == {"ref": "pre:v1", "id": pre["id"]}
    assert [(link["ref"], link["recipe"]) for link in info["lineage"]] == [("pre:v1", "pretrain")]
    recipe = info["recipe"]
    assert (recipe["recipe"], recipe["method"], recipe["task"]) == ("finetune", "freeze", "classify")
    assert recipe["train"]["max_steps"] == 4 and recipe["train_last_blocks"] == 1 and "lora" not in recipe
    data = info["data"]["files"]
    assert [f["sha256"] for f in data] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in (train, val)]
    assert info["metrics"]["train"]["steps"] == 4 and info["metrics"]["train"]["val_loss"] > 0
    assert (
        info["metrics"]["train"]["best_step"] == 4 and 0 <= info["metrics"]["train"]["best_val_macro_f1"] <= 1
    )
    assert recipe["validation"] == {"val_file": str(val)} and recipe["select_by"] == "macro_f1"
    assert info["config"]["labels"] == ["ham", "spam"]
    card = (store.open("spam:v1") / "README.md").read_text(encoding="utf-8")
    assert "1. pre:v1 (pretrain" in card and '"recipe": "finetune"' in card and "train / val_loss" in card

    # `lmforge eval` on a stored model records its scores in the manifest and the model card ...
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(SAMPLE_TEXT), encoding="utf-8")
    args = ["eval", "pre:v1", "--task", "perplexity", "--data", str(text), "--out", str(tmp_path / "report")]
    assert main(args) == 0
    scores = store.get("pre:v1")["metrics"]["perplexity:eval.txt"]
    assert scores["perplexity"] > 1 and scores["data"] == str(text)
    assert "perplexity:eval.txt / perplexity" in (store.open("pre:v1") / "README.md").read_text("utf-8")
    # ... without making it a different model: its children's lineage still matches it.
    store.put(models[1], "child:v1", parent=describe_source("spam:v1"))
    chain = store.show("child:v1")["lineage"]
    assert [(link["ref"], link["recipe"]) for link in chain] == [
        ("spam:v1", "finetune"),
        ("pre:v1", "pretrain"),
    ]
    assert not any(link.get("changed") or link.get("missing") for link in chain)
    capsys.readouterr()
    assert main(["show", "child:v1"]) == 0
    out = capsys.readouterr().out
    assert "<- spam:v1 (finetune" in out and "<- pre:v1 (pretrain" in out
    assert main(["list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["NAME", "SIZE", "PARAMS", "PARENT", "CREATED"]
    assert any(line.startswith("spam:v1") and "pre:v1" in line for line in listing)


def test_chinese_description_recipe_and_metrics_round_trip(home, models, capsys):
    store = Store()
    recipe = {"说明": "用宋词继续预训练", "lr": 1e-3}
    metrics = {"准确率": 0.95, "备注": "中文很好"}
    store.put(models[0], "zh-poetry:v1", description="中文诗词模型 — a Chinese poetry model", recipe=recipe)
    store.add_metrics("zh-poetry:v1", metrics)
    manifest = store.get("zh-poetry:v1")
    assert manifest["recipe"] == recipe and manifest["metrics"] == metrics
    assert manifest["description"] == "中文诗词模型 — a Chinese poetry model"
    raw = (home / "manifests" / "zh-poetry" / "v1.json").read_text(encoding="utf-8")
    assert "用宋词继续预训练" in raw  # stored readable, not \\u-escaped
    assert LLM.load("zh-poetry:v1").source == "zh-poetry:v1"
    card = (store.open("zh-poetry:v1") / "README.md").read_text(encoding="utf-8")
    assert "中文诗词模型" in card and "| 准确率 | 0.95 |" in card
    assert main(["show", "zh-poetry:v1"]) == 0
    assert "中文诗词模型" in capsys.readouterr().out


# Real processes, forked so that they skip re-importing torch (seconds each on a busy machine).
FORK = multiprocessing.get_context("fork")


def cli_import(folder: Path, name: str) -> None:
    sys.exit(main(["import", str(folder), "--name", name]))


def test_concurrent_imports_both_succeed_with_one_blob_set(home, models):
    procs = [FORK.Process(target=cli_import, args=(models[0], name)) for name in ("twin:a", "twin:b")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    store = Store()
    manifests = [store.get("twin:a"), store.get("twin:b")]
    assert manifests[0]["files"] == manifests[1]["files"]
    assert blob_names(home) == {e["digest"].replace(":", "-") for e in manifests[0]["files"].values()}
    report = store.verify()
    assert report.ok and (report.unreferenced, report.temp) == (0, 0)


def slow_import(folder: Path, ready: Connection) -> None:
    """An import that stops, holding the store lock, once its first new file is copied into tmp/ (not yet
    renamed into blobs/), and waits there to be killed."""
    copy = store_module._hash_into

    def stall(src, dst=None):
        result = copy(src, dst)
        if dst is not None:
            ready.send("copying")
            time.sleep(120)
        return result

    store_module._hash_into = stall  # in this child process only
    import_model(folder, "killed:v1")


def test_sigkill_during_import_leaves_no_entry_and_a_clean_store(home, models):
    store = Store()
    store.put(models[1], "other:v1")
    ours, theirs = FORK.Pipe()
    proc = FORK.Process(target=slow_import, args=(models[0], theirs))
    proc.start()
    try:
        assert ours.poll(60) and ours.recv() == "copying"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL
    assert not store.has("killed:v1")
    assert [f"{m['name']}:{m['tag']}" for m in store.list_models()] == ["other:v1"]
    report = store.verify()
    assert report.ok and report.temp == 1  # the half-done copy is a leftover, not an entry
    import_model(models[0], "killed:v1", store=store)  # the dead process's lock is gone
    assert LLM.load("killed:v1").config.n_layer == 2
    cleaned = store.gc()
    assert cleaned.temp == 1 and cleaned.blobs == 0
    assert store.verify().ok and store.verify().temp == 0


# ------------------------------------------------------------------ links and permissions
def test_rm_and_cp_refuse_links_planted_in_manifests_and_touch_nothing_outside(
    home, models, tmp_path, capsys
):
    store = Store()
    store.put(models[0], "ok:v1")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "x.json").write_text("保留 keep me", encoding="utf-8")
    (home / "manifests" / "evil").symlink_to(victim, target_is_directory=True)
    err = one_line_error(capsys, main(["rm", "evil:x"]))
    assert f"{home / 'manifests' / 'evil'} is a symbolic link" in err
    one_line_error(capsys, main(["cp", "ok:v1", "evil:y"]))
    blobs = blob_names(home)
    with pytest.raises(LmforgeError, match="symbolic link"):
        store.put(models[1], "evil:z")
    assert blob_names(home) == blobs  # refused before anything was copied
    assert [p.name for p in victim.iterdir()] == ["x.json"]
    assert (victim / "x.json").read_text(encoding="utf-8") == "保留 keep me"
    # A linked manifest file is refused as well: the link and what it points to stay.
    secret = tmp_path / "secret.json"
    secret.write_text((home / "manifests" / "ok" / "v1.json").read_text(encoding="utf-8"), encoding="utf-8")
    planted = home / "manifests" / "ok" / "v2.json"
    planted.symlink_to(secret)
    assert "is a symbolic link" in one_line_error(capsys, main(["rm", "ok:v2"]))
    assert planted.is_symlink() and secret.is_file()
    with pytest.raises(LmforgeError, match="symbolic link"):
        store.get("ok:v2")
    # verify names both links; list shows the one real entry; gc will not guess what they need.
    report = store.verify()
    assert not report.ok and report.damaged == ["evil:*", "ok:v2"]
    assert [f"{m['name']}:{m['tag']}" for m in store.list_models()] == ["ok:v1"]
    with pytest.raises(LmforgeError, match="damaged"):
        store.gc()
    assert [p.name for p in victim.iterdir()] == ["x.json"] and secret.is_file()


def test_gc_removes_links_planted_in_blobs_snapshots_and_tmp_never_their_targets(home, models, tmp_path):
    store = Store()
    store.put(models[0], "ok:v1")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.bin").write_bytes(b"\x00" * 100)
    for planted in (home / "tmp" / "dir-link", home / "snapshots" / ("0" * 64)):
        planted.symlink_to(victim, target_is_directory=True)
    fake_blob = home / "blobs" / f"sha256-{'1' * 64}"
    fake_blob.symlink_to(victim / "data.bin")
    assert not store.verify().ok  # a linked blob is never read through
    report = store.gc()
    assert (report.blobs, report.snapshots, report.temp) == (1, 1, 1)
    assert (victim / "data.bin").read_bytes() == b"\x00" * 100
    assert not fake_blob.is_symlink() and store.verify().ok
    # A whole store folder replaced by a link is refused before anything is written.
    shutil.rmtree(home / "tmp")
    (home / "tmp").symlink_to(victim, target_is_directory=True)
    with pytest.raises(LmforgeError, match="symbolic link"):
        store.put(models[1], "other:v1")
    assert [p.name for p in victim.iterdir()] == ["data.bin"]


def test_import_refuses_links_in_the_folder_and_keeps_private_files_private(home, models, tmp_path, capsys):
    store = Store()
    folder = Path(shutil.copytree(models[0], tmp_path / "model"))
    outside = tmp_path / "outside.txt"
    outside.write_text("秘密 secret", encoding="utf-8")
    (folder / "notes.txt").symlink_to(outside)
    with pytest.raises(LmforgeError) as caught:
        store.put(folder, "linked")
    assert f"{folder / 'notes.txt'} is a symbolic link (to {outside})" in caught.value.message
    assert "cp -L" in (caught.value.hint or "")
    (folder / "notes.txt").unlink()
    (folder / "extra").symlink_to(tmp_path, target_is_directory=True)  # a linked folder, too
    err = one_line_error(capsys, main(["import", str(folder), "--name", "linked"]))
    assert "extra is a symbolic link" in err
    assert not store.has("linked") and not any(home.rglob("sha256-*"))
    (folder / "extra").unlink()

    old_umask = os.umask(0o022)
    try:
        (folder / "model.safetensors").chmod(0o600)
        manifest = store.put(folder, "private")
        mode = {
            name: (home / "blobs" / e["digest"].replace(":", "-")).stat().st_mode & 0o777
            for name, e in manifest["files"].items()
        }
        assert mode["model.safetensors"] == 0o600 and mode["config.json"] == 0o644
        store.put(models[0], "public")  # the same weights from a readable file: the blob stays private
        assert mode == {
            name: (home / "blobs" / e["digest"].replace(":", "-")).stat().st_mode & 0o777
            for name, e in manifest["files"].items()
        }
        os.umask(0o077)
        (folder / "added.json").write_text('{"说明": "new"}', encoding="utf-8")
        added = store.put(folder, "umask")["files"]["added.json"]["digest"]
        assert (home / "blobs" / added.replace(":", "-")).stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old_umask)
    # A store entry is a folder of links by design: importing it under a new name still works.
    import_model("private", "copy:v1", store=store)
    assert store.get("copy:v1")["files"]["model.safetensors"] == manifest["files"]["model.safetensors"]


def test_verify_checks_snapshot_links_and_loading_repairs_them(home, models, tmp_path, capsys):
    store = Store()
    store.put(models[0], "a:v1")
    other = store.put(models[1], "b:v1")["files"]["model.safetensors"]["digest"].replace(":", "-")
    snapshot = store.open("a:v1")
    link = snapshot / "model.safetensors"
    link.unlink()
    link.symlink_to(
        Path("..", "..", "blobs", other)
    )  # b's weights under a's name: a valid blob, the wrong one
    report = store.verify()
    where = f"snapshots/{snapshot.name}/model.safetensors"
    assert not report.ok and list(report.bad_links) == [where] and not (report.missing or report.corrupt)
    assert "not to its blob sha256-" in report.bad_links[where]
    assert main(["verify"]) == 2
    printed = capsys.readouterr()
    assert f"bad snapshot link: {where} points to ../../blobs/{other}, not to its blob" in printed.out
    assert printed.err.startswith("error: the model store has 1 problem(s)")
    # Loading checks where the links point and rebuilds the snapshot: a's own weights, not b's.
    assert torch.equal(logits(LLM.load("a:v1")), logits(LLM.load(models[0], dtype="float32", device="cpu")))
    assert store.verify().ok
    outside = tmp_path / "model.safetensors"
    shutil.copy(models[0] / "model.safetensors", outside)
    link.unlink()
    link.symlink_to(outside)  # the same bytes, but outside the store
    assert list(store.verify().bad_links) == [where]
    (snapshot / "stray.txt").write_text("不属于这个模型", encoding="utf-8")
    assert set(store.verify().bad_links) == {where, f"snapshots/{snapshot.name}/stray.txt"}
    store.open("a:v1")
    assert store.verify().ok
