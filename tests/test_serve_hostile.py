"""The server against hostile clients (issue 16): oversized prompts and message lists, unbounded stop lists
and sequence counts, clients that go away, half-sent connections, cross-site and rebound requests, and
a server bound beyond localhost without a key. Every server here listens on 127.0.0.1; a tiny model serves."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.exceptions import RequestValidationError

from lmforge import LLM, cli
from lmforge.generate import TextStream
from lmforge.serve import ServerLimits, create_app
from lmforge.serve.app import longest_token_chars
from lmforge.serve.guard import MAX_JSON_CONTAINERS, host_name, json_containers, parse_body
from lmforge.serve.protocol import (
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_STOP,
    MAX_STOP_CHARS,
    APIError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
)

from .conftest import tiny_llm
from .serving import serving, wait_until
from .test_serve import _slow_tiny

POEM = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"


def _timed_get(url: str) -> tuple[int, float]:
    started = time.monotonic()
    status = httpx.get(url, timeout=30).status_code
    return status, time.monotonic() - started


# ------------------------------------------------------------------ 1. one request stalls everyone
def test_a_huge_prompt_is_refused_before_tokenizing_and_health_stays_fast(one_thread, tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    with serving(create_app(llm)) as base, ThreadPoolExecutor(1) as pool:
        huge = {"prompt": POEM * 54_000, "max_tokens": 1}  # 1.3 M characters, 3.9 MB: under the body limit
        body = json.dumps(huge, ensure_ascii=False).encode()
        assert 3_500_000 < len(body) < ServerLimits().max_body_bytes
        started = time.monotonic()
        answer = pool.submit(
            httpx.post,
            base + "/v1/completions",
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        time.sleep(0.3)  # the body is in: the server parses it now
        status, seconds = _timed_get(base + "/health")
        assert status == 200 and seconds < 1.0, seconds
        r = answer.result()
        assert time.monotonic() - started < 5
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        limit = llm.config.block_size * longest_token_chars(llm.tokenizer)
        assert f"more than the {limit}" in r.json()["error"]["message"]

        # Text just past the bound is refused as such; text within it is tokenized, and counted in tokens.
        for text, unit in (("明" * (limit + 1), "characters"), ("a" * limit, "tokens")):
            r = httpx.post(base + "/v1/completions", json={"prompt": text, "max_tokens": 1}, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            assert unit in r.json()["error"]["message"]


def test_a_4mb_body_of_small_items_is_parsed_off_the_event_loop(one_thread, tiny_tokenizer):
    """JSON is parsed and validated in a worker thread, in bounded time: bodies just under the size limit made
    of a million small items (parsed on the event loop before, and validated item by item before being
    counted) leave /health fast. Objects and arrays are counted before parsing, lists before their items."""
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    bodies = [
        ("/v1/completions", {"prompt": [[7]] * 880_000}, 400, "too_many_json_values"),  # as token-id prompts
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "好"}] * 120_000},
            400,
            "too_many_json_values",
        ),
        ("/v1/embeddings", {"input": ["月"] * 600_000}, 422, None),
        ("/v1/completions", {"prompt": [1, *["a"] * 900_000]}, 422, None),
        ("/v1/chat/completions", {"messages": [{"role": "user"}], "stop": ["光"] * 600_000}, 422, None),
        (
            "/v1/completions",
            {"prompt": "ab[{" * 900_000},
            400,
            "context_length_exceeded",
        ),  # brackets in a string
    ]
    with serving(create_app(llm)) as base, ThreadPoolExecutor(1) as pool:
        for path, payload, status, code in bodies:
            body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
            assert 3_500_000 < len(body) < ServerLimits().max_body_bytes
            answer = pool.submit(
                httpx.post,
                base + path,
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=60,
            )
            health = []
            while not answer.done():
                health.append(_timed_get(base + "/health"))
                time.sleep(0.05)
            r = answer.result()
            assert r.status_code == status and r.json()["error"]["code"] == code, r.text
            assert health and all(s == 200 and seconds < 1.0 for s, seconds in health), (path, health)
        # The most objects a valid request can hold (every message with its most parts) are parsed.
        part = {"type": "text", "text": "好"}
        most = {"messages": [{"role": "user", "content": [part] * MAX_CONTENT_PARTS}] * MAX_MESSAGES}
        r = httpx.post(base + "/v1/chat/completions", json=most, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


def test_lone_surrogates_and_bodies_that_are_not_json_are_refused(one_thread, tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    json_type = {"Content-Type": "application/json"}
    with serving(create_app(llm)) as base:
        lone = [
            ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "月\\ud800"}]}'),
            (
                "/v1/chat/completions",
                '{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udc00"]}',
            ),
            ("/v1/completions", '{"prompt": ["ok", "\\ud83d"], "max_tokens": 1}'),
            ("/v1/embeddings", '{"input": "\\udfff好"}'),
            ("/v1/classify", '{"input": "a", "labels": ["x\\ud800", "y"]}'),
            ("/v1/summarize", '{"input": "\\ud800"}'),
        ]
        for path, body in lone:
            r = httpx.post(base + path, content=body.encode(), headers=json_type, timeout=30)
            error = r.json()["error"]
            if '"stop"' in body or '"labels"' in body:  # strings with a length limit: pydantic refuses them
                assert r.status_code == 422 and error["param"].startswith(("stop", "labels")), r.text
            else:
                assert r.status_code == 400 and error["code"] == "invalid_unicode", (path, r.text)
        # A pair is a character (an emoji); an escaped backslash before "ud800" is plain text; an unknown field
        # holding a lone surrogate is ignored like any unknown field.
        for content in ("\\ud83d\\ude00 床前明月光", "\\\\ud800", "hi"):
            body = f'{{"messages": [{{"role": "user", "content": "{content}"}}], "max_tokens": 1, "x": "\\ud800"}}'
            r = httpx.post(
                base + "/v1/chat/completions", content=body.encode(), headers=json_type, timeout=30
            )
            assert r.status_code == 200, (content, r.text)

        for body, detail in (
            (b'{"prompt": "\xed\xa0\x80"}', "not UTF-8"),  # a surrogate encoded in UTF-8 bytes
            (b'{"prompt": "\xff"}', "not UTF-8"),
            (b"[" * 20_000 + b"]" * 20_000, "nested too deeply"),
            (b'{"prompt": "hi",', "line 1 column 17"),
        ):
            r = httpx.post(base + "/v1/completions", content=body, headers=json_type, timeout=30)
            error = r.json()["error"]
            assert r.status_code == 400 and error["code"] == "invalid_json" and detail in error["message"], (
                r.text
            )


def test_lists_are_counted_before_their_items_are_validated():
    """One 'too long' error, in far less time than validating the items (a million of them)."""
    started = time.process_time()
    payloads = [
        (ChatRequest, {"messages": [{"role": "user"}] * 20_000}),
        (ChatRequest, {"messages": [{"role": "user"}], "stop": ["a"] * 1_000_000}),
        (CompletionRequest, {"prompt": [1] + ["a"] * 1_000_000}),
        (CompletionRequest, {"prompt": ["a"] * 1_000_000}),
        (EmbeddingRequest, {"input": ["a"] * 1_000_000}),
        (
            ChatRequest,
            {"messages": [{"role": "user", "content": [{"type": "text"}] * (MAX_CONTENT_PARTS + 1)}]},
        ),
    ]
    for model, payload in payloads:
        with pytest.raises(RequestValidationError) as e:
            parse_body(model, json.dumps(payload).encode())
        assert len(e.value.errors()) <= 4, e.value.errors()[
            :5
        ]  # one per shape a field may have, not per item
        assert any(x["type"] in ("too_long", "int_type") for x in e.value.errors())
    assert time.process_time() - started < 3.0
    # Errors name the field, not pydantic's names for the shapes a prompt may have.
    assert {x["loc"] for x in e.value.errors()} == {("body", "messages", 0, "content")}
    with pytest.raises(RequestValidationError) as e:
        parse_body(CompletionRequest, json.dumps({"prompt": [1, "a"]}).encode())
    assert {x["loc"][:2] for x in e.value.errors()} == {("body", "prompt")}
    assert all(isinstance(part, int) for x in e.value.errors() for part in x["loc"][2:])  # item indices
    ids = parse_body(CompletionRequest, json.dumps({"prompt": list(range(100_000))}).encode())
    assert ids.prompt == list(range(100_000))


def test_bodies_are_validated_strictly():
    """JSON's types as the schema gives them: true is no number, 3.5 no integer, "2" no n (Schemathesis found
    repetition_penalty=true accepted); classify's example pairs are JSON arrays."""
    for extra in ({"repetition_penalty": True}, {"max_tokens": 3.5}, {"n": "2"}, {"stream": 1}):
        body = json.dumps({"messages": [{"role": "user", "content": "你好"}], **extra}).encode()
        with pytest.raises(RequestValidationError) as e:
            parse_body(ChatRequest, body)
        assert e.value.errors()[0]["loc"][:2] == ("body", next(iter(extra))), e.value.errors()
    pairs = parse_body(
        ClassifyRequest, '{"input": "好", "labels": ["a", "b"], "examples": [["月", "a"]]}'.encode()
    )
    assert pairs.examples == [("月", "a")]


def test_objects_and_arrays_are_counted_outside_strings():
    # Past the limit, brackets inside strings (with escaped quotes and backslashes around them) are left out.
    tricky = {
        "a": [1, {"b": "[[[{{"}],
        "c": 'x\\"[[',
        "d": "\\\\[[",
        "e": "\\\\",
        "f": "[" * MAX_JSON_CONTAINERS,
    }
    assert json_containers(json.dumps(tricky).encode()) == 3
    assert json_containers(json.dumps(tricky, ensure_ascii=False, indent=1).encode()) == 3
    many = json.dumps({"prompt": ["[{"] * 40_000}).encode()
    assert json_containers(many) == 2
    assert json_containers(json.dumps([[1]] * 40_000).encode()) == 40_001
    with pytest.raises(APIError, match="40002 JSON objects and arrays"):
        parse_body(CompletionRequest, json.dumps({"prompt": [[1]] * 40_000}).encode())


def test_too_many_chat_messages_or_characters_are_refused_fast(one_thread, tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    limit = llm.config.block_size * longest_token_chars(llm.tokenizer)
    with serving(create_app(llm)) as base:
        messages = [{"role": "user", "content": "好"}] * 120_000
        many = json.dumps({"messages": messages}, ensure_ascii=False, separators=(",", ":")).encode()
        assert len(many) < ServerLimits().max_body_bytes
        started = time.monotonic()
        r = httpx.post(
            base + "/v1/chat/completions",
            content=many,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_json_values"
        assert time.monotonic() - started < 5
        fewer = {"messages": [{"role": "user", "content": "好"}] * (MAX_JSON_CONTAINERS - 2)}
        r = httpx.post(base + "/v1/chat/completions", json=fewer, timeout=60)
        assert r.status_code == 422 and r.json()["error"]["param"] == "messages"
        half = {"role": "user", "content": "月" * (limit // 2 + 1)}  # each fits; together they cannot
        r = httpx.post(base + "/v1/chat/completions", json={"messages": [half, half]}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        most = [{"role": "user", "content": "你好"}] * MAX_MESSAGES
        r = httpx.post(base + "/v1/chat/completions", json={"messages": most, "max_tokens": 1}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"  # in tokens


def test_prompts_are_tokenized_off_the_event_loop(one_thread, tiny_tokenizer):
    """A slow chat template or tokenizer (here: 3 s) holds up only its own request."""
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    entered = threading.Event()
    prompt_ids = llm.prompt_ids

    def slow_prompt_ids(prompt):
        entered.set()
        time.sleep(3)
        return prompt_ids(prompt)

    llm.prompt_ids = slow_prompt_ids
    with serving(create_app(llm)) as base, ThreadPoolExecutor(1) as pool:
        chat = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}
        answer = pool.submit(httpx.post, base + "/v1/chat/completions", json=chat, timeout=60)
        assert entered.wait(30)
        status, seconds = _timed_get(base + "/health")
        assert status == 200 and seconds < 1.0, seconds
        assert answer.result().status_code == 200


# ---------------------------------------------------------------------- 2. unbounded work per request
def test_stop_lists_are_bounded(one_thread, tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    with serving(create_app(llm)) as base:
        body = {"prompt": POEM, "max_tokens": 4, "temperature": 0}
        for stop in (
            ["停"] * (MAX_STOP + 1),
            "止" * (MAX_STOP_CHARS + 1),
            ["ok", "停" * (MAX_STOP_CHARS + 1)],
        ):
            r = httpx.post(base + "/v1/completions", json={**body, "stop": stop}, timeout=30)
            assert r.status_code == 422 and r.json()["error"]["param"].startswith("stop"), stop
        most = [f"{i}" + "停" * (MAX_STOP_CHARS - 2) for i in range(MAX_STOP)]
        r = httpx.post(base + "/v1/completions", json={**body, "stop": most}, timeout=30)
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == llm.generate_text(POEM, max_length=4, stop=most)


def test_stop_matching_costs_a_scan_per_stop_string_not_its_square(tiny_tokenizer):
    """What the Python API still allows: 3,500 stop strings of 1,000 characters (seconds per token before,
    once the text is longer than a few hundred characters)."""
    stops = [f"{i:04d}" + "停" * 996 for i in range(3_500)]
    stream = TextStream(tiny_tokenizer, stops)
    text = (POEM + " The quick brown fox. ") * 25  # 1,200 characters
    pieces, slowest = [], 0.0
    for token in tiny_tokenizer.encode(text):
        started = time.perf_counter()
        pieces.append(stream.push(token))
        slowest = max(slowest, time.perf_counter() - started)
        if slowest > 0.5:
            break
    assert slowest < 0.5
    assert "".join(pieces) + stream.finish() == text
    # The tail that could start a stop string is still held back, Chinese and digits alike.
    stream = TextStream(tiny_tokenizer, ["低头思故乡！", "0042停"])
    shown = "".join(stream.push(t) for t in tiny_tokenizer.encode("举头望明月，低头思故"))
    assert shown == "举头望明月，"
    stream = TextStream(tiny_tokenizer, ["0042停"])
    assert "".join(stream.push(t) for t in tiny_tokenizer.encode("a 004")) == "a "


def test_sequences_per_request_are_bounded_and_the_queue_counts_them(one_thread, tiny_tokenizer):
    llm = _slow_tiny(tiny_tokenizer, 0.05)
    app = create_app(llm, max_batch=2, max_queue=3)
    scheduler = app.state.scheduler
    body = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}
    with serving(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        r = http.post("/v1/completions", json={**body, "prompt": [[1]] * 64, "n": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_sequences"
        assert "128 sequences" in r.json()["error"]["message"]
        long_body = {**body, "prompt": "长", "n": 2, "max_tokens": 60, "stream": True}
        with http.stream("POST", "/v1/completions", json=long_body) as long:
            lines = long.iter_lines()
            next(lines)  # both slots are taken
            # Two prompts x n=2 are four sequences: more than the queue holds, ever.
            r = http.post("/v1/completions", json={**body, "prompt": ["一", "二"], "n": 2})
            assert r.status_code == 400 and "limit is 3 per request" in r.json()["error"]["message"]
            # Two sequences wait; two more would be four, though the queue holds two requests only.
            queued = ThreadPoolExecutor(1).submit(
                http.post, "/v1/completions", json={**body, "prompt": ["一", "二"]}
            )
            wait_until(lambda: scheduler.queue_depth == 2, what="two sequences to wait")
            r = http.post("/v1/completions", json={**body, "prompt": "三", "n": 2})
            assert r.status_code == 429
            assert "2 sequences are waiting (at most 3)" in r.json()["error"]["message"]
            assert scheduler.queue_depth == 2
        assert queued.result(timeout=60).status_code == 200
        wait_until(lambda: scheduler.running == 0, what="the slots to be free")


def test_one_request_with_many_prompts_takes_turns_with_others(one_thread, tiny_tokenizer):
    llm = _slow_tiny(tiny_tokenizer, 0.02)
    app = create_app(llm, max_batch=2)
    finished: dict[str, float] = {}
    with serving(app) as base, ThreadPoolExecutor(1) as pool:

        def post(name: str, body: dict) -> None:
            r = httpx.post(base + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            finished[name] = time.monotonic()

        many = {"prompt": ["春", "夏", "秋", "冬", "风", "雨"], "max_tokens": 25, "ignore_eos": True}
        big = pool.submit(post, "many", many)
        wait_until(lambda: app.state.scheduler.queue_depth == 4, what="the first prompts to run")
        post("small", {"prompt": "花", "max_tokens": 2, "ignore_eos": True})
        big.result()
    # Six prompts on two slots take three turns; the other client waited for one of them at most.
    assert finished["small"] < finished["many"]


def test_a_task_stops_when_its_client_goes_away(one_thread, tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    calls = []

    def slow_forward(module, args) -> None:
        calls.append(1)
        time.sleep(0.1)

    llm.model.register_forward_pre_hook(slow_forward)
    with serving(create_app(llm)) as base:
        texts = [POEM, "I love this film, it is wonderful!"] * 100  # 50 batches: about 5 s
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/classify", json={"input": texts, "labels": ["好", "坏"]}, timeout=0.5)
        time.sleep(2.5)  # the disconnect is noticed within a second, the batch under way ends
        stopped_at = len(calls)
        time.sleep(1.5)
        assert len(calls) == stopped_at and stopped_at < 40, (stopped_at, len(calls))
        assert httpx.get(base + "/health").status_code == 200


# -------------------------------------------------------------------------------- 3. connections
def test_half_sent_connections_are_capped_and_dropped(one_thread, tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    limits = ServerLimits(max_connections=64, read_timeout_s=1.0)
    with serving(create_app(llm, limits=limits)) as base:
        port = int(base.rsplit(":", 1)[1])
        half = []
        try:
            for _ in range(300):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends its headers
                half.append(sock)
            status, seconds = _timed_get(base + "/health")
            assert status == 200 and seconds < 1.0, seconds

            def closed(sock: socket.socket) -> bool:
                sock.settimeout(0.01)
                try:
                    return sock.recv(1) == b""
                except TimeoutError:
                    return False
                except ConnectionResetError:
                    return True

            # At most 64 stay open (the oldest half-sent ones made room) ...
            wait_until(lambda: sum(closed(s) for s in half) >= 300 - 64, timeout=5, what="evictions")
            # ... and those are dropped once they have had read_timeout_s to finish.
            wait_until(lambda: all(closed(s) for s in half), timeout=5, what="the slow clients to be dropped")
        finally:
            for sock in half:
                sock.close()
        assert httpx.get(base + "/health").status_code == 200


# -------------------------------------------------------------------- 4. a keyless server on the web
def test_posts_must_be_json(one_thread, tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    with serving(create_app(llm)) as base:
        body = json.dumps({"prompt": "你好", "max_tokens": 2})
        for kind in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            None,
        ):
            headers = {"Content-Type": kind} if kind else {}
            r = httpx.post(base + "/v1/completions", content=body, headers=headers)
            assert r.status_code == 415, kind
            error = r.json()["error"]
            assert error["code"] == "unsupported_media_type" and set(error) == {
                "message",
                "type",
                "param",
                "code",
            }
        r = httpx.post(
            base + "/v1/completions",
            content=body,
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
        assert r.status_code == 200


def test_host_headers_are_checked_without_a_key(one_thread, tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    port_of = lambda base: base.rsplit(":", 1)[1]  # noqa: E731
    with serving(create_app(llm)) as base:
        port = port_of(base)
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert httpx.get(base + "/v1/models", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil"):
            r = httpx.get(base + "/v1/models", headers={"Host": host})
            assert r.status_code == 421 and r.json()["error"]["code"] == "invalid_host", host
        r = httpx.post(base + "/v1/completions", json={"prompt": "你好"}, headers={"Host": "evil.example"})
        assert r.status_code == 421
    with serving(create_app(llm, allowed_hosts=["lmforge.lan"])) as base:
        assert httpx.get(base + "/health", headers={"Host": "lmforge.lan:80"}).status_code == 200
        assert httpx.get(base + "/health", headers={"Host": "evil.example"}).status_code == 421
    with serving(create_app(llm, api_key="sekret")) as base:  # a key guards the API: any name may be used
        assert httpx.get(base + "/health", headers={"Host": "evil.example"}).status_code == 200
    assert [host_name(h) for h in ("[::1]:80", "Example.COM.", "::1", "a:1")] == [
        "::1",
        "example.com",
        "::1",
        "a",
    ]


def test_models_never_show_a_path(one_thread, tiny_tokenizer, tmp_path):
    folder = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "runs" / "mine" / "model")
    llm = LLM.load(folder)
    with serving(create_app(llm)) as base:
        r = httpx.get(base + "/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "mine"
    assert str(tmp_path) not in r.text and "runs" not in r.text


def test_serving_beyond_localhost_needs_a_key(monkeypatch, capsys):
    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)

    def loaded(args):
        raise RuntimeError("the model would load here")

    monkeypatch.setattr(cli, "_load", loaded)
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to serve on 0.0.0.0 without an API key")
    # past the check, the model loads (--debug: the stand-in's error is raised, not turned into one line)
    with pytest.raises(RuntimeError, match="would load"):
        cli.main(["--debug", "serve", "--host", "0.0.0.0", "--insecure-no-key"])
    with pytest.raises(RuntimeError, match="would load"):
        cli.main(["--debug", "serve", "--host", "0.0.0.0", "--api-key", "sekret"])
    with pytest.raises(RuntimeError, match="would load"):
        cli.main(["--debug", "serve"])  # 127.0.0.1


# --------------------------------------------------------------------------------- 500s found by fuzzing
def test_extreme_sampling_values_are_refused_or_sampled_not_500(one_thread, tiny_tokenizer):
    """seed 2**70 and repetition_penalty NaN are refused (400); temperature 1e-45 and top_p 1e-300 (0 in
    float32) keep only the likeliest token, so the answer is the greedy one."""
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    chat = {"messages": [{"role": "user", "content": "床前明月光"}], "max_tokens": 6, "ignore_eos": True}
    with serving(create_app(llm)) as base:

        def post(**extra) -> httpx.Response:
            body = json.dumps({**chat, **extra})  # NaN is written as NaN, which Python's json reads
            headers = {"Content-Type": "application/json"}
            return httpx.post(base + "/v1/chat/completions", content=body, headers=headers, timeout=60)

        for name, value in (("seed", 2**70), ("seed", -(2**64)), ("repetition_penalty", float("nan"))):
            r = post(**{name: value})
            assert r.status_code == 400 and f"{name}=" in r.json()["error"]["message"], r.text
        greedy = post(temperature=0).json()["choices"][0]["message"]["content"]
        cases = ({"temperature": 1e-45}, {"temperature": 4.8e-307}, {"top_p": 1e-300, "temperature": 1.0})
        for extra in (*cases, {"seed": 2**63 - 1}):
            r = post(**extra, n=2) if "seed" not in extra else post(**extra, temperature=1e-45)
            assert r.status_code == 200, r.text
            assert {c["message"]["content"] for c in r.json()["choices"]} == {greedy}, extra
