"""Every shell command of README.md and README.zh.md runs: exit 0 and no traceback, in a fresh folder with its own
model store; and the two READMEs carry the same commands (shapes: command words and flags) and command table.

A command runs once when both READMEs have it word for word (the Chinese README's commands are the English
one's), in README.md's order, then any only README.zh.md has. The commands run in this process through
``lmforge.cli.main`` (torch is imported once, not thirty times), each with empty stdin; ``torchrun`` lines run
as processes (``python -m torch.distributed.run``, what the ``torchrun`` script runs). What the READMEs write
for a real run is scaled down here, and only that (``scaled`` does it, in these words):

- training: ``--max-steps N`` becomes 2 (added where a command has none), ``--micro-batch-size 16`` becomes 2,
  ``pretrain`` trains on 32-token blocks and validates on one batch (``--block-size 32 --eval-batches 1``);
  a fine-tune of the bundled 135M model (no MODEL, or the store's ``smollm2:q4-1``) tunes ``tiny`` instead, a
  4-layer model with SmolLM2's tokenizer and chat template (tuning 135M parameters writes gigabytes);
- generating: ``--max-tokens 4`` (``summarize``: 8) unless the command says; ``eval`` and ``select`` score 4
  and 2 examples (``--limit``, ``--sample``) and decode eagerly (``--no-compile``; they compile by default);
  ``estimate`` skips its speed measurement (``--no-measure``);
- ``serve`` listens on a free port instead of 8000, without compiling (``--no-compile``, ``--max-batch 1``),
  in a thread, until /health and /v1/models answered;
- ``torchrun``: the multi-machine line runs on this one (``--nnodes=1 --nproc_per_node=1``, a local
  rendezvous on a free port); each line writes its own run folder (``--out``);
- ``serve --ray``: one replica on a local Ray cluster (``--replicas 1``, no ``--ray-address`` or
  ``--replica-gpus``: no cluster or GPU here; tests/test_serve_ray.py runs two and kills one), as a process,
  until /health answers, then Ctrl-C (SIGINT);
- ``pip install 'lmforge[EXTRA]'``: ``make test`` installed the ``dev`` extra, which holds the EXTRA's
  packages; instead of reaching the network, each of the extra's requirements must be installed at a version
  it allows.

A stored model a command names before (or after) the README makes it — ``serve spam:v1`` comes before the
store section, ``select ... spam:v1`` after its ``rm spam:v1`` — is stored from ``runs/spam/model`` first
(``_ensure_stored``). The data the commands name (``data/*.txt``, ``spam/train.jsonl``, ``book.txt``...) is written first, from
tests/data; so are the models they use without making them (``runs/poems/model``, ``runs/x/model``,
``my-model``: the tiny model) and ``run.yaml`` (a tiny pretraining config). ``make demo`` and ``make test`` are
not run: they are what runs this suite.
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import httpx
import tomllib
import torch
import uvicorn
from packaging.requirements import Requirement

import lmforge
from lmforge import LLM, runtime
from lmforge.cli import main
from lmforge.config import Config
from lmforge.loading import import_model
from lmforge.model import Transformer
from lmforge.store import Store

from .conftest import TEST_DATA
from .readme import READMES, shape, shell_commands, table_commands

SRC = Path(lmforge.__file__).resolve().parents[1]
NOT_RUN = {("make", "demo"), ("make", "test")}  # the test runner itself
FINETUNED_BASES = {"smollm2:q4-1"}  # the bundled 135M model under a store name: tuned as `tiny` instead


def test_both_readmes_carry_the_same_commands() -> None:
    en, zh = (shell_commands(READMES[lang]) for lang in ("en", "zh"))
    assert {shape(c) for c in en} == {shape(c) for c in zh}
    assert table_commands(READMES["en"]) == table_commands(READMES["zh"])
    assert len(table_commands(READMES["en"])) >= 10  # the table was found


def _all_commands() -> list[list[str]]:
    en, zh = (shell_commands(READMES[lang]) for lang in ("en", "zh"))
    return [c for c in [*en, *(c for c in zh if c not in en)] if tuple(c) not in NOT_RUN]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced by ``value``, or ``flag value`` added."""
    if flag in argv:
        i = argv.index(flag)
        return [*argv[: i + 1], value, *argv[i + 2 :]]
    return [*argv, flag, value]


def scaled(argv: list[str], work: Path) -> list[str]:
    """The README command ``argv`` as this test runs it (the module docstring says what changes and why)."""
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        if any(a.startswith("--nnodes") for a in argv):
            local = {"--nnodes": "1", "--nproc_per_node": "1", "--rdzv_endpoint": f"127.0.0.1:{_free_port()}"}
            argv = [
                a if a.split("=")[0] not in local else f"{a.split('=')[0]}={local[a.split('=')[0]]}"
                for a in argv
            ]
        return [*argv, "--out", str(work / "runs" / f"torchrun-{_free_port()}")]
    if argv[0] == "pip":
        return argv
    assert argv[0] == "lmforge", argv
    argv = argv[1:]
    command = next(a for a in argv if not a.startswith("-") and not a.isdigit())
    if command in ("pretrain", "finetune"):
        argv = _set(argv, "--max-steps", "2")
        if "--micro-batch-size" in argv:
            argv = _set(argv, "--micro-batch-size", "2")
    if command == "pretrain":  # baby-gpt's 256-token context and 20 validation batches: minutes here
        argv = [*argv, "--block-size", "32", "--eval-batches", "1"]
    if command == "finetune":
        i = argv.index("finetune")
        base = argv[i + 1] if not argv[i + 1].startswith("-") else None
        rest = argv[i + 2 :] if base else argv[i + 1 :]
        if base is None or base in FINETUNED_BASES:
            argv = [*argv[:i], "finetune", str(work / "tiny"), *rest]
    if command in ("generate", "chat") and "--max-tokens" not in argv:
        argv = [*argv, "--max-tokens", "4"]
    if command == "summarize":
        argv = _set(argv, "--max-tokens", "8")
    if command == "eval":
        argv = [*argv, "--limit", "4", "--no-compile"]
    if command == "select":
        argv = [*argv, "--sample", "2", "--no-compile"]
    if command == "estimate":
        argv = [*argv, "--no-measure"]
    if command == "serve":
        argv = [*_set(argv, "--port", str(_free_port())), "--no-compile", "--max-batch", "1"]
    if "--ray" in argv:
        argv = _set(_drop(_drop(argv, "--ray-address"), "--replica-gpus"), "--replicas", "1")
    return argv


def _drop(argv: list[str], flag: str) -> list[str]:
    """argv without ``flag`` and its value."""
    if flag not in argv:
        return argv
    i = argv.index(flag)
    return [*argv[:i], *argv[i + 2 :]]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _rows(relative: str, count: int) -> list[dict]:
    lines = (TEST_DATA / relative).read_text(encoding="utf-8").splitlines()[:count]
    return [json.loads(line) for line in lines]


def _prepare(work: Path) -> None:
    """The files the READMEs' commands read but do not write, and the tiny model (see the module docstring)."""
    (work / "data").mkdir()
    shakespeare = (TEST_DATA / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    (work / "data" / "shakespeare.txt").write_text(shakespeare[:20_000], encoding="utf-8")
    songci = (TEST_DATA / "text" / "songci.txt").read_text(encoding="utf-8")
    (work / "data" / "songci.txt").write_text(songci[:8_000], encoding="utf-8")
    (work / "book.txt").write_text(songci[:1_000], encoding="utf-8")
    (work / "article.txt").write_text(_rows("summarize_zh/test.jsonl", 1)[0]["text"], encoding="utf-8")
    spam = [{"text": r["text"], "label": r["label"]} for r in _rows("sms_spam/test.jsonl", 40)]
    for name in ("spam/train.jsonl", "spam.jsonl", "my.jsonl"):
        _write_jsonl(work / name, spam[:32])
    for name in ("spam/test.jsonl", "test.jsonl"):
        _write_jsonl(work / name, spam[32:])
    _write_jsonl(work / "alpaca.jsonl", _rows("instruct_en/test.jsonl", 8))
    _write_jsonl(work / "dialogs.jsonl", _rows("summarize_zh/test.jsonl", 8))
    smollm2 = LLM.load(dtype="float32", device="cpu", quant="none", compile=False)
    torch.manual_seed(0)
    config = Config.from_name(
        "tiny-llama",
        vocab_size=smollm2.config.vocab_size,
        bos_token_id=smollm2.config.bos_token_id,
        eos_token_id=smollm2.config.eos_token_id,
        pad_token_id=smollm2.config.pad_token_id,
        block_size=1024,  # estimate my-model --context 512
    )
    tiny = LLM(Transformer(config), smollm2.tokenizer, source="tiny").save(work / "tiny")
    for folder in ("runs/poems/model", "runs/x/model", "my-model"):
        shutil.copytree(tiny, work / folder)
    (work / "run.yaml").write_text(
        "arch: tiny-llama\nmodel_config: {n_layer: 1, n_embd: 32, n_head: 2, n_kv_head: 1}\ndata: shards\n"
        "train: {max_steps: 2, micro_batch_size: 2, block_size: 16, eval_every: 0, progress: false}\n",
        encoding="utf-8",
    )


class _Servers(uvicorn.Server):
    """uvicorn's server, remembered, so that a test can stop the one `lmforge serve` started in a thread."""

    running: list[uvicorn.Server] = []

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        _Servers.running.append(self)


def _serve(argv: list[str], monkeypatch) -> tuple[int, str]:
    """Run ``lmforge serve`` in a thread until it answers /health and /v1/models, then stop it."""
    monkeypatch.setattr(uvicorn, "Server", _Servers)
    _Servers.running.clear()
    port = argv[argv.index("--port") + 1]
    key = argv[argv.index("--api-key") + 1] if "--api-key" in argv else None
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(main(argv)), daemon=True)
    thread.start()
    base, answers = f"http://127.0.0.1:{port}", []
    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline and not answers:
        if _Servers.running and _Servers.running[0].started:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            answers = [
                httpx.get(base + "/health").json(),
                httpx.get(base + "/v1/models", headers=headers).json(),
            ]
        time.sleep(0.05)
    for server in _Servers.running:
        server.should_exit = True
    thread.join(timeout=60)
    assert answers, "the server did not answer"
    return (result[0] if result else 1), json.dumps(answers)


def _cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _ensure_stored(argv: list[str], work: Path) -> None:
    for ref in ("spam:v1",):
        if any(ref in a.split(",") for a in argv) and "--save-as" not in argv and argv[-1] != ref:
            if ref not in {f"{m['name']}:{m['tag']}" for m in Store().list_models()}:
                import_model(work / "runs" / "spam" / "model", ref)


def _extra_installed(argv: list[str]) -> tuple[int, str]:
    """``pip install 'lmforge[EXTRA]'``: every requirement pyproject.toml gives the extra is installed at a
    version it allows."""
    (extra,) = re.fullmatch(r"lmforge\[(\w+)\]", argv[-1]).groups()
    extras = tomllib.loads((SRC.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [Requirement(r) for r in extras["optional-dependencies"].get(extra, [])]
    missing = [str(r) for r in wanted if metadata.version(r.name) not in r.specifier]
    return (
        0 if wanted and not missing else 1
    ), f"extra {extra}: {len(wanted)} requirements, missing {missing}"


def _serve_on_ray(argv: list[str]) -> tuple[int, str]:
    """``lmforge serve ... --ray`` as a process until its /health answers, then Ctrl-C."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *sys.path]), "OMP_NUM_THREADS": "1"}
    port = argv[argv.index("--port") + 1]
    with subprocess.Popen(
        [sys.executable, "-m", "lmforge", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as server:
        try:
            deadline, health = time.monotonic() + 240, None
            while server.poll() is None and time.monotonic() < deadline and health is None:
                try:  # Ray's proxy listens before the replica is up: 503s, or no answer, until it is
                    answer = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                    health = answer.json() if answer.status_code == 200 else None
                except httpx.HTTPError:
                    pass
                if health is None:
                    time.sleep(1)
            server.send_signal(signal.SIGINT)
            out = server.communicate(timeout=120)[0].decode(errors="replace")
        finally:
            server.kill()
    code = server.returncode if health is not None else 1
    return (0 if code in (0, 130) else code), out + f"\n/health: {health}"


def _run(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    if argv[0] == "pip":
        return _extra_installed(argv)
    if "--ray" in argv:
        return _serve_on_ray(argv)
    if argv[0] == sys.executable:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *sys.path]), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)
        return done.returncode, done.stdout + done.stderr
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code = _serve(argv, monkeypatch)[0] if "serve" in argv else main(argv)
    out, err = capsys.readouterr()
    return code, out + err


def test_every_readme_command_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv(runtime.HOME_ENV, str(work / "home"))
    monkeypatch.setattr(runtime, "_threads", runtime._threads)
    threads = torch.get_num_threads()
    _prepare(work)
    failures, timings = [], []
    try:
        for command in _all_commands():
            argv = scaled(command, work)
            start, cpu = time.perf_counter(), _cpu_seconds()
            if command[1] not in ("rm", "tag", "show"):
                _ensure_stored(argv, work)
            try:
                code, output = _run(argv, capsys, monkeypatch)
            except Exception as e:  # noqa: BLE001 - reported with the others below
                code, output = -1, f"{type(e).__name__}: {e}"
            timings.append((_cpu_seconds() - cpu, time.perf_counter() - start, " ".join(command)))
            if code != 0 or "Traceback" in output:
                failures.append(
                    f"{' '.join(command)}\n  ran as: {' '.join(argv)}\n  exit {code}: {output[-1500:]}"
                )
    finally:
        torch.set_num_threads(threads)  # `lmforge --threads 2 chat` set it
        # CPU seconds (this process and its children) say what the commands cost on a busy machine too
        lines = [f"{cpu:6.1f} s CPU {wall:6.1f} s  {c}" for cpu, wall, c in sorted(timings, reverse=True)]
        total = f"{sum(t[0] for t in timings):6.1f} s CPU {sum(t[1] for t in timings):6.1f} s  in all"
        print("\n".join([*lines, total]), file=sys.__stderr__)
    assert not failures, "\n\n".join(failures)
