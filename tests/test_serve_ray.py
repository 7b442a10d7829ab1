"""`lmforge serve --ray`: the server as a Ray Serve deployment on a local Ray cluster, against one plain server.

Ray is a dev dependency, so this runs in CI: starting the cluster, Serve and two replicas takes ~30 s."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import ray

import lmforge
from lmforge import LLM, runtime
from lmforge.cli import build_parser, main
from lmforge.errors import LmforgeError
from lmforge.serve import create_app
from lmforge.serve import ray as on_ray

from .conftest import SAMPLE_TEXT, one_intra_op_thread, tiny_llm
from .serving import serving, wait_until

# English and Chinese prompts, 32 different ones, each answered greedily.
PROMPTS = [f"{text[: 6 + i % 7]} {i}" for i, text in enumerate(SAMPLE_TEXT * 7)][:32]
MAX_TOKENS = 8
TOTAL_LIMIT_S = 90  # the whole test: cluster, Serve, replicas, requests and shutdown


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _complete(base: str, prompt: str) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=60)


def _answers(base: str, prompts: list[str]) -> list[tuple[str, str | None]]:
    """(text, replica id) for each prompt, all sent at once."""

    def one(prompt: str) -> tuple[str, str | None]:
        response = _complete(base, prompt)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"], response.headers.get(on_ray.REPLICA_HEADER)

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_two_replicas_share_requests_answer_like_one_server_and_survive_a_killed_replica(
    tmp_path, tiny_tokenizer, monkeypatch
):
    home = tmp_path / "home"  # the replicas inherit it: where they keep the shipped model
    monkeypatch.setenv(runtime.HOME_ENV, str(home))
    folder = tmp_path / "tiny"
    tiny_llm("tiny-llama", tiny_tokenizer).save(folder)
    # The single server runs on one intra-op thread, as each replica does: the same sums in the same order.
    with one_intra_op_thread(), serving(create_app(LLM.load(folder, compile=False))) as single:
        expected = [_complete(single, p).json()["choices"][0]["text"] for p in PROMPTS]
    assert any(any("\u4e00" <= c <= "\u9fff" for c in p) for p in PROMPTS)  # Chinese among the prompts

    started = time.monotonic()
    spec = on_ray.ReplicaSpec(model=str(folder), compile=False, warm_up=False)
    # ship: the folder travels through Ray's object store, as it does to the nodes of a cluster joined
    server = on_ray.start(spec, replicas=2, port=_free_port(), ship=True)  # stops what it started if it fails
    try:
        base = server.url
        answers = _answers(base, PROMPTS)
        assert [text for text, _ in answers] == expected
        (copy,) = (home / "ray-models").glob("*/tiny")  # one copy for the node, its files as they were
        assert {p.name: p.read_bytes() for p in copy.iterdir()} == {
            p.name: p.read_bytes() for p in folder.iterdir()
        }
        assert httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"] == "tiny"  # its own name
        served: dict[str | None, int] = {}
        for _, replica in answers:
            served[replica] = served.get(replica, 0) + 1
        assert len(served) == 2 and None not in served, served  # both replicas answered some requests

        health = httpx.get(f"{base}/health", timeout=30)
        assert health.status_code == 200 and health.headers[on_ray.REPLICA_HEADER] in served

        victim = answers[0][1]
        assert victim is not None
        actor = on_ray.replica_actor(victim)
        pid = ray.get(actor.__ray_call__.remote(lambda replica: os.getpid()), timeout=30)
        os.kill(pid, signal.SIGKILL)  # the replica's process dies as a crash would end it
        wait_until(lambda: _gone(pid), timeout=30, what="the killed replica's process to end")

        after = _answers(base, PROMPTS[:16])
        assert [text for text, _ in after] == expected[:16]  # every request sent afterwards is answered
        assert victim not in {replica for _, replica in after}
    finally:
        server.stop()
    assert time.monotonic() - started < TOTAL_LIMIT_S
    assert not ray.is_initialized()


def test_replica_counts_and_builder_arguments_are_checked_before_ray_starts():
    with pytest.raises(LmforgeError, match="replicas=0 is outside 1 to 64"):
        on_ray.application(on_ray.ReplicaSpec(), replicas=0)
    with pytest.raises(LmforgeError, match="replicas=65"):
        on_ray.build({"replicas": "65"})
    with pytest.raises(LmforgeError, match="0 threads per replica is outside 1 to 256"):
        on_ray.application(on_ray.ReplicaSpec(threads=0), replicas=2)
    with pytest.raises(LmforgeError, match="unknown argument.*modle"):
        on_ray.build({"modle": "x"})
    with pytest.raises(LmforgeError, match="compile='yes' is not true or false"):
        on_ray.build({"compile": "yes"})
    with pytest.raises(LmforgeError, match="max_batch='eight' is not a whole number"):
        on_ray.build({"max_batch": "eight"})
    with pytest.raises(LmforgeError, match="17 GPUs per replica is outside 0 to 16"):
        on_ray.build({"gpus": 17})
    with pytest.raises(LmforgeError, match="gpus='half' is not a number"):
        on_ray.build({"gpus": "half"})
    assert not ray.is_initialized()


def test_builder_arguments_become_the_replicas_spec():
    app: Any = on_ray.build(
        {"model": "runs/x/model", "replicas": "3", "compile": "false", "cors_origins": "a,b"}
    )
    deployment = app._bound_deployment
    assert deployment.num_replicas == 3
    assert deployment.ray_actor_options == {"num_cpus": 1, "num_gpus": 0.0}  # one thread, no GPU by default
    spec, shipped = app._bound_deployment.init_args
    assert shipped is None  # a config file's model is resolved on each node
    assert spec == on_ray.ReplicaSpec(model="runs/x/model", compile=False, cors_origins=("a", "b"))
    # A RayService's YAML args arrive as numbers and booleans
    yaml_args: Any = on_ray.build(
        {"model": "runs/x/model", "replicas": 3, "compile": False, "cors_origins": "a,b"}
    )
    assert (
        yaml_args._bound_deployment.init_args == (spec, None)
        and yaml_args._bound_deployment.num_replicas == 3
    )
    shared_gpu: Any = on_ray.build({"gpus": "0.5", "threads": 2})
    assert shared_gpu._bound_deployment.ray_actor_options == {"num_cpus": 2, "num_gpus": 0.5}


def test_cli_ray_flags_parse_with_one_replica_of_one_thread_by_default():
    args = build_parser().parse_args(["serve", "--ray"])
    assert (args.ray, args.replicas, args.replica_threads, args.ray_address) == (True, 1, 1, None)
    args = build_parser().parse_args(["serve", "--ray", "--replicas", "2", "--ray-address", "auto"])
    assert (args.replicas, args.ray_address) == (2, "auto")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--ray", "--replicas", "0"], "error: --replicas 0 is outside 1 to 64 — use 1 to 64 replicas"),
        (["--ray", "--replicas", "65"], "error: --replicas 65 is outside 1 to 64"),
        (
            ["--ray", "--replica-threads", "0"],
            "error: 0 threads per replica is outside 1 to 256 — use e.g. 1",
        ),
        (["--replicas", "2"], "error: --replicas applies to Ray Serve only — add --ray"),
        (["--ray-address", "auto"], "error: --ray-address applies to Ray Serve only"),
        (["--ray", "--replica-gpus", "-1"], "error: -1 GPUs per replica is outside 0 to 16"),
        (["--ray", "no/such-folder/"], "error: no model found at 'no/such-folder/'"),
    ],
)
def test_cli_ray_mistakes_are_one_line_before_anything_starts(argv, expected, capsys):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(["serve", "--port", str(_free_port()), *argv]) == 2
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # as they were
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith(expected), (
        captured
    )
    assert not ray.is_initialized()


def test_plain_serve_does_not_import_ray():
    code = (
        "import sys; import lmforge.cli, lmforge.serve; lmforge.cli.build_parser().parse_args(['serve']); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(lmforge.__file__).parents[1]), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]
