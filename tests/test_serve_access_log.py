"""``lmforge serve --access-log``: one line per request (method, path, status, tokens, latency), refused and
streamed requests included; and the model id the server answers with: a store name:tag or a run's name."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import httpx
import pytest
import uvicorn

from lmforge import LLM, cli, runtime, serve
from lmforge.loading import import_model
from lmforge.serve import create_app
from lmforge.serve.access_log import MAX_PATH_CHARS, printable

from .conftest import tiny_llm
from .serving import serving

LINE = re.compile(r"^(GET|POST) (\S+) (\d{3}) tokens=(\d+|-) (\d+\.\d) ms$")


def test_every_request_is_one_line_with_status_tokens_and_latency(one_thread, tiny_tokenizer) -> None:
    lines: list[str] = []
    app = create_app(tiny_llm("tiny-llama", tiny_tokenizer), api_key="key", access_log=lines.append)
    auth = {"Authorization": "Bearer key"}
    body = {"prompt": "hello", "max_tokens": 3, "ignore_eos": True, "temperature": 0}
    with serving(app) as base:
        assert httpx.get(base + "/health").status_code == 200
        assert httpx.post(base + "/v1/completions", json=body, headers=auth).status_code == 200
        streamed = httpx.post(base + "/v1/completions", json={**body, "stream": True}, headers=auth)
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
        assert httpx.post(base + "/v1/completions", json=body).status_code == 401  # the guard refuses it
        assert httpx.get(base + "/no%0Afake 200 line").status_code == 404
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [m.group(1, 2, 3, 4) for m in parsed] == [  # type: ignore[union-attr]
        ("GET", "/health", "200", "-"),
        ("POST", "/v1/completions", "200", "3"),
        ("POST", "/v1/completions", "200", "3"),  # counted when the stream ends
        ("POST", "/v1/completions", "401", "-"),
        ("GET", "/no\\nfake%20200%20line", "404", "-"),  # a client cannot write a line of its own
    ]
    assert all(float(m.group(5)) > 0 for m in parsed)  # type: ignore[union-attr]


def test_paths_are_cut_and_escaped() -> None:
    assert printable("/a\tb\x1b[31m c") == "/a\\tb\\x1b[31m%20c"
    assert printable("/长城") == "/长城"
    long = printable("/" + "x" * 1000)
    assert len(long) == MAX_PATH_CHARS + 1 and long.endswith("…")


def test_no_access_log_unless_asked(one_thread, tiny_tokenizer, capsys) -> None:
    with serving(create_app(tiny_llm("tiny-llama", tiny_tokenizer))) as base:
        assert httpx.get(base + "/health").status_code == 200
    assert "/health" not in capsys.readouterr().out


@pytest.mark.parametrize("access_log", [True, False])
def test_the_cli_flag_reaches_the_app(
    monkeypatch, tmp_path: Path, tiny_tokenizer, access_log, capsys
) -> None:
    folder = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "runs" / "poems" / "model")
    seen = {}

    def create(llm, **options):
        seen["log"] = options["access_log"]
        return create_app(llm, **{**options, "warm_up": False})

    class FakeServer:
        def __init__(self, config) -> None:
            pass

        def run(self) -> None:
            pass

    monkeypatch.setattr(serve, "create_app", create)
    monkeypatch.setattr(serve, "uvicorn_config", lambda app, *args, **kwargs: app)
    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    monkeypatch.setattr(runtime, "_threads", runtime._threads)
    with socket.socket() as probe:  # a free port: serve checks it can bind before loading
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["serve", "-m", str(folder), "--no-compile", "--port", str(port)]
    assert cli.main([*argv, "--access-log"] if access_log else argv) == 0
    assert (seen["log"] is not None) == access_log
    if access_log:
        seen["log"]("GET / 200 tokens=- 1.0 ms")
        assert capsys.readouterr().out.endswith("GET / 200 tokens=- 1.0 ms\n")


def test_the_model_id_is_the_store_name_or_the_run_name(
    monkeypatch, tmp_path, one_thread, tiny_tokenizer
) -> None:
    monkeypatch.setenv(runtime.HOME_ENV, str(tmp_path / "home"))
    folder = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "runs" / "poems" / "model")
    import_model(folder, "poems:v2")
    for name, model_id in (("poems:v2", "poems:v2"), (str(folder), "poems")):
        with serving(create_app(LLM.load(name))) as base:
            models = httpx.get(base + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == [model_id], name
