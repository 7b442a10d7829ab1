"""Hosted models (``LLM.load("openai:...")``) against a live ``lmforge serve`` of the bundled SmolLM2 and MiniLM:
the same answers as the local models, retries against a scripted fake endpoint, one-line errors, and the key
written nowhere."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from lmforge import LLM, hosted
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.hosted import HostedLLM
from lmforge.loading import EMBEDDING_MODEL, resolve
from lmforge.serve import create_app
from lmforge.sizing import memory

from .conftest import tiny_llm
from .serving import serving

KEY = "sk-lmforge-test-6f1d0c9a"  # the secret that must appear in no file
LABELS = ["spam", "ham"]
TEXTS = ["WINNER!! Claim your free prize now, call 0900", "这个周末我们一起去公园散步吧"]
ARTICLE = (
    "The city council voted on Tuesday to build a new library downtown. Construction starts next spring "
    "and will cost 20 million dollars."
)


@pytest.fixture(scope="module")
def smol_url(smollm2: LLM) -> Iterator[str]:
    """The bundled SmolLM2 behind `lmforge serve`'s app, guarded by the key."""
    with serving(create_app(smollm2, api_key=KEY, max_batch=4, batch_weights="packed")) as base:
        yield base + "/v1"


@pytest.fixture(scope="module")
def hosted_smol(smol_url: str) -> HostedLLM:
    return LLM.load("openai:default", base_url=smol_url, api_key=KEY)


def test_hosted_smollm2_answers_as_the_local_model(smollm2: LLM, hosted_smol: HostedLLM, one_thread) -> None:
    assert hosted_smol.source == "openai:SmolLM2-135M-Instruct.Q4_1"  # openai:default: the first model listed
    # Label scoring: /completions with echo scores the prompt the local model scores, token for token.
    remote = hosted_smol.classify_text(TEXTS, labels=LABELS)
    local = smollm2.classify_text(TEXTS, labels=LABELS)
    for r, loc in zip(remote, local, strict=True):
        assert r["label"] == loc["label"]
        for label in LABELS:
            assert r["probabilities"][label] == pytest.approx(loc["probabilities"][label], abs=1e-4)
    # The same summarization prompt, greedy: the same words.
    assert hosted_smol.summarize(ARTICLE, max_length=12) == smollm2.summarize(ARTICLE, max_length=12)
    assert hosted_smol.generate_text("The capital of France is", 4) == smollm2.generate_text(
        "The capital of France is", 4
    )
    assert hosted_smol.chat("你好", 4) == smollm2.chat("你好", 4)
    assert "".join(hosted_smol.stream("Once upon a time", 4)) == smollm2.generate_text("Once upon a time", 4)
    assert hosted_smol.usage["completion_tokens"] > 0 and KEY not in repr(hosted_smol)


def test_echo_scores_a_prompt_as_the_model_does(smollm2: LLM, smol_url: str, one_thread) -> None:
    import httpx

    from lmforge.inference import sequence_logprobs

    prompt = "The capital of France is Paris"
    answer = httpx.post(
        smol_url + "/completions",
        json={"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()
    logprobs = answer["choices"][0]["logprobs"]
    ids = smollm2.tokenizer.encode(prompt)
    assert answer["choices"][0]["text"] == prompt and len(logprobs["tokens"]) == len(ids)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = sequence_logprobs(smollm2, [ids[:1]], [ids[1:]])[0]
    assert sum(logprobs["token_logprobs"][1:]) == pytest.approx(expected, abs=1e-3)
    assert all(len(top) == 1 for top in logprobs["top_logprobs"][1:])
    refused = httpx.post(
        smol_url + "/completions",
        json={"prompt": prompt, "max_tokens": 3, "echo": True},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert refused.status_code == 400 and "max_tokens=0" in refused.json()["error"]["message"]


def test_hosted_embeddings_match_the_local_encoder(one_thread) -> None:
    local = LLM.load(EMBEDDING_MODEL, dtype="float32", device="cpu")
    texts = ["A cat sits on the mat.", "一只猫坐在垫子上。", "Stock markets fell sharply today."]
    with serving(create_app(local)) as base:
        remote = LLM.load("openai:default", base_url=base + "/v1")
        vectors = remote.embed(texts)
        assert vectors.shape == (3, local.config.n_embd)
        np.testing.assert_allclose(vectors, local.embed(texts), atol=1e-5)
        assert remote.similarity(texts[0], texts[1]) == pytest.approx(
            local.similarity(texts[0], texts[1]), abs=1e-5
        )


def test_the_name_resolves_to_a_hosted_model_with_nothing_to_load() -> None:
    assert resolve("openai:gpt-4o-mini").kind == "hosted"
    with pytest.raises(LmforgeError, match="hosted model"):
        LLM.load("openai:x", base_url="http://127.0.0.1:9/v1", quant="int4")
    with pytest.raises(LmforgeError, match="for hosted models"):
        LLM.load("default", base_url="http://127.0.0.1:9/v1")


# ----------------------------------------------------------------- a fake endpoint
class _Script:
    """Answers to give, in order: (status, headers, JSON body); the requests seen."""

    def __init__(self, answers: list[tuple[int, dict[str, str], dict]]) -> None:
        self.answers = answers
        self.seen: list[dict] = []


@pytest.fixture
def fake() -> Iterator[tuple[_Script, str]]:
    script = _Script([])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            length = int(self.headers.get("Content-Length", 0))
            script.seen.append(
                {"auth": self.headers.get("Authorization"), **json.loads(self.rfile.read(length))}
            )
            status, headers, body = script.answers.pop(0)
            data = json.dumps(body).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **headers}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield script, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _completion(text: str) -> dict:
    return {"choices": [{"index": 0, "text": text}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


def _error(message: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": "x", "param": None, "code": code}}


@pytest.mark.parametrize(
    "first",
    [
        (429, {"Retry-After": "0.05"}, _error("slow down")),
        (500, {}, _error("boom")),
        (503, {}, _error("busy")),
    ],
)
def test_429_and_5xx_are_retried(fake, first, monkeypatch) -> None:
    monkeypatch.setattr(hosted, "BACKOFF_S", 0.01)
    script, url = fake
    script.answers = [first, first, (200, {}, _completion(" Paris"))]
    llm = LLM.load("openai:m", base_url=url, api_key=KEY)
    assert llm.generate_text("The capital of France is", 2) == " Paris"
    assert len(script.seen) == 3 and all(s["auth"] == f"Bearer {KEY}" for s in script.seen)
    assert script.seen[0]["temperature"] == 0.0 and script.seen[0]["max_tokens"] == 2  # greedy, as LLM
    assert llm.usage == {"prompt_tokens": 3, "completion_tokens": 2, "requests": 1}


def test_retries_are_bounded_and_errors_are_one_line_without_the_key(fake, monkeypatch) -> None:
    monkeypatch.setattr(hosted, "BACKOFF_S", 0.01)
    script, url = fake
    llm = LLM.load("openai:m", base_url=url, api_key=KEY)
    script.answers = [(500, {}, _error("boom"))] * hosted.MAX_ATTEMPTS
    with pytest.raises(LmforgeError, match=f"HTTP 500: boom \\(after {hosted.MAX_ATTEMPTS} tries") as e:
        llm.generate_text("x", 2)
    assert script.answers == [] and "\n" not in str(e.value)
    # A Retry-After beyond the total wait fails at once; a 401 is not retried, and its echo of the key is redacted.
    script.answers = [(429, {"Retry-After": "3600"}, _error("quota"))]
    with pytest.raises(LmforgeError, match="HTTP 429: quota \\(after 1 tries"):
        llm.generate_text("x", 2)
    script.answers = [(401, {}, _error(f"Incorrect API key provided: {KEY}"))]
    with pytest.raises(LmforgeError, match="HTTP 401") as e:
        llm.chat("x", 2)
    assert KEY not in str(e.value) and "[key]" in str(e.value) and "API key" in str(e.value)


def test_an_endpoint_that_is_down_is_one_line_naming_the_url() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(LmforgeError) as e:
        LLM.load("openai:default", base_url=url)
    text = str(e.value)
    assert text.startswith(f"cannot reach {url}/models") and "lmforge serve" in text and "\n" not in text


def test_select_and_eval_rank_a_local_and_a_hosted_model_and_write_no_key(
    smol_url: str, tiny_tokenizer, tmp_path: Path, monkeypatch, capsys, one_thread
) -> None:
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LMFORGE_TEST_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    # Sizing is test_select's subject: a fixed runtime baseline spares this test its fresh-process measurement.
    monkeypatch.setattr(memory, "runtime_baseline", lambda: {"infer": 300 * 2**20, "train": 400 * 2**20})
    local = str(tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "tiny"))
    data = tmp_path / "spam.jsonl"
    rows = [("中奖了！立即领取", "spam"), ("See you at lunch", "ham"), ("Free entry! Win cash now", "spam")]
    data.write_text("".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in rows))
    hosted_flags = [
        "--base-url",
        smol_url,
        "--api-key-env",
        "LMFORGE_TEST_KEY",
        "--price",
        "openai:default=0.15,0.6",
    ]
    argv = ["select", "--task", "classify", "--data", str(data), "--candidates", f"{local},openai:default"]
    assert main([*argv, "--sample", "2", *hosted_flags]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| rank"))
    assert "tokens (in+out)" in header and "cost (USD)" in header
    found = {
        line.split("|")[2].strip(): line
        for line in table.splitlines()
        if line.startswith("| 1") or line.startswith("| 2")
    }
    assert set(found) == {local, "openai:SmolLM2-135M-Instruct.Q4_1"}, table
    hosted_row = [c.strip() for c in found["openai:SmolLM2-135M-Instruct.Q4_1"].split("|")]
    tokens_in, tokens_out = map(int, hosted_row[header.split("|").index(" tokens (in+out) ")].split("+"))
    assert tokens_in > 100 and tokens_out == 0  # label scoring generates nothing
    assert float(hosted_row[header.split("|").index(" cost (USD) ")]) == pytest.approx(
        tokens_in / 1000 * 0.15, abs=1e-4
    )
    argv = [
        "eval",
        local,
        "openai:default",
        "--task",
        "classify",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "report"),
        "--limit",
        "2",
    ]
    assert main([*argv, *hosted_flags]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == [
        f"{local} (zero-shot)",
        "openai:SmolLM2-135M-Instruct.Q4_1 (zero-shot)",
    ]
    assert report["rows"][1]["examples"] == 2 and "+" in report["rows"][1]["tokens"]
    assert "ms/example" in report["columns"] and report["comparisons"]
    printed = capsys.readouterr()
    # The key went over HTTP only: no file lmforge wrote (reports, store, caches) and nothing printed holds it.
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 3 and not [p for p in written if KEY.encode() in p.read_bytes()]
    assert KEY not in printed.out + printed.err
    # Without the variable the key is named by, one line says so.
    monkeypatch.delenv("LMFORGE_TEST_KEY")
    assert main([*argv[:1], *argv[2:], *hosted_flags]) == 2  # the hosted model alone
    assert "LMFORGE_TEST_KEY holds no API key" in capsys.readouterr().err


def _chat(content: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def test_an_endpoint_that_cannot_score_is_asked_to_choose(fake) -> None:
    script, url = fake
    llm = LLM.load("openai:m", base_url=url, api_key=KEY)
    llm._mode = "plain"  # a model without a chat template: labels are scored on /completions first
    script.answers = [(400, {}, _error("echo is not supported")), (200, {}, _chat('{"label": "spam"}'))]
    assert llm.classify_text("WIN CASH", labels=LABELS) == {
        "label": "spam",
        "probabilities": {"spam": 1.0, "ham": 0.0},
    }
    scoring, choosing = script.seen
    assert scoring["echo"] is True and scoring["max_tokens"] == 0 and scoring["prompt"][1].endswith("\n spam")
    schema = choosing["response_format"]["json_schema"]["schema"]
    assert (
        schema["properties"]["label"]["enum"] == LABELS and "WIN CASH" in choosing["messages"][0]["content"]
    )
    llm._mode = "chat"  # no rendering endpoint: straight to the choice; a server without formats answers text
    script.answers = [
        (200, {}, _chat("Ham.")),
        (200, {}, _chat("我觉得是 spam")),
        (200, {}, _chat("no idea")),
    ]
    found = llm.classify_text(["see you", "中奖了", "?"], labels=LABELS)
    assert [f["label"] for f in found] == ["ham", "spam", None]


def test_a_text_beyond_the_context_is_summarized_in_halves_and_merged(fake) -> None:
    script, url = fake
    llm = LLM.load("openai:m", base_url=url, api_key=KEY)
    llm._mode = "chat"
    too_long = (400, {}, _error("prompt of 900 tokens exceeds the context", code="context_length_exceeded"))
    script.answers = [
        too_long,
        (200, {}, _chat("First part.")),
        (200, {}, _chat("Second.")),
        (200, {}, _chat("Both.")),
    ]
    text = "word " * 400
    with pytest.warns(UserWarning, match="two halves"):
        assert llm.summarize(text, max_length=8) == "Both."
    prompts = [s["messages"][0]["content"] for s in script.seen]
    assert "First part.\nSecond." in prompts[3] and all(s["stop"] == ["\n\n"] for s in script.seen)
    assert len(prompts[1]) < len(prompts[0]) and len(prompts[2]) < len(prompts[0])
