"""Soak test of the server: a mixed workload from a bounded number of clients for --minutes, and whether the
server's memory stays flat (issue 16).

    python benchmarks/soak.py [--minutes 30] [--clients 16] [--model PATH] [--threads 1] [--compile]
                              [--max-tokens 16] [--seed 0]

Starts `lmforge serve` on 127.0.0.1 in its own process: on --model, or by default on a tiny random model
(tiny-llama's shape, a byte-level BPE tokenizer trained here on a few sentences) written to a temporary
folder. --clients clients then send requests back to back until the time is up, each picking at random:

    chat (plain)        25 %   chat (streamed)      20 %   completion         20 %
    embeddings          10 %   cancelled stream      5 %   invalid request    20 %

A cancelled stream is closed by its client after the first chunk. An invalid request is one of: malformed
JSON, a missing field, max_tokens beyond the context, a text/plain body, n beyond the limit, a lone
surrogate, an unknown path; each must get a 4xx other than 429. English and Chinese prompts alternate.
Embeddings are left out when the model does not serve them (the first probe answers 4xx).

Every 10 s the server's resident memory (VmRSS) and the time /health takes are sampled. The table at the end:
requests that succeeded, valid requests that failed (anything but a complete 200 answer: this must be 0),
invalid requests answered with the expected 4xx (and any that were not), p50/p99 latency of plain answers and
time to first token of streams, RSS at 5 minutes (half the run when it is shorter) and at the end, and the
growth between them (must be < 10 %). The exit status is 1 when either criterion fails.

The server ends itself (SIGALRM) a few minutes after --minutes, whatever happens here; the clients stop at
--minutes and the server is then stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from lmforge import LLM
from lmforge.config import Config
from lmforge.model import Transformer
from lmforge.tokenizer import train_tokenizer

PROMPTS = [
    "Tell me about the history of the printing press.",
    "请介绍一下长城的历史。",
    "How do plants turn sunlight into energy?",
    "床前明月光，疑是地上霜。",
    "What should I pack for a week of hiking?",
    "用几句话解释什么是机器学习。",
]
TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。春眠不觉晓，处处闻啼鸟。",
    "Plants turn sunlight into energy; bicycles stay upright; presses printed books in many cities.",
]
SAMPLE_S = 10.0  # RSS and /health sampling period
BASELINE_S = 300.0  # RSS growth is measured from here (or half the run, when it is shorter)
REQUEST_TIMEOUT_S = 120.0


def invalid_requests(context: int) -> list[tuple[str, str, bytes, str]]:
    """(name, path, body, content type) of requests the server must refuse with a 4xx."""
    chat = "/v1/chat/completions"

    def body(payload: dict) -> bytes:
        return json.dumps(payload).encode()

    return [
        ("malformed JSON", chat, b'{"messages": [', "application/json"),
        ("missing messages", chat, body({"max_tokens": 4}), "application/json"),
        (
            "max_tokens beyond the context",
            "/v1/completions",
            body({"prompt": "hello", "max_tokens": context + 1}),
            "application/json",
        ),
        ("text/plain body", chat, body({"messages": [{"role": "user", "content": "hi"}]}), "text/plain"),
        ("n beyond the limit", "/v1/completions", body({"prompt": "hi", "n": 1000}), "application/json"),
        (
            "lone surrogate",
            chat,
            b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
            "application/json",
        ),
        ("unknown path", "/v1/nowhere", body({}), "application/json"),
    ]


@dataclass
class Tally:
    ok: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # valid requests that did not get a complete answer
    refused: int = 0  # invalid requests answered with a 4xx (not 429)
    unexpected: list[str] = field(default_factory=list)  # invalid requests answered otherwise
    latency: list[float] = field(default_factory=list)  # plain (non-streamed) valid answers
    ttft: list[float] = field(default_factory=list)  # streamed answers: time to first chunk
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)
    health: list[float] = field(default_factory=list)  # seconds /health took

    def count(self, kind: str) -> None:
        self.ok[kind] = self.ok.get(kind, 0) + 1


async def chat(http: httpx.AsyncClient, tally: Tally, rng: random.Random, args: argparse.Namespace) -> None:
    body = {
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": args.max_tokens,
        "temperature": rng.choice([0, 0.7, 1.0]),
    }
    started = time.monotonic()
    r = await http.post("/v1/chat/completions", json=body)
    if r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None:
        tally.latency.append(time.monotonic() - started)
        tally.count("chat")
    else:
        tally.failed.append(f"chat: {r.status_code} {r.text[:200]}")


async def completion(
    http: httpx.AsyncClient, tally: Tally, rng: random.Random, args: argparse.Namespace
) -> None:
    body = {"prompt": rng.choice(PROMPTS), "max_tokens": args.max_tokens, "temperature": rng.choice([0, 0.8])}
    started = time.monotonic()
    r = await http.post("/v1/completions", json=body)
    if r.status_code == 200 and isinstance(r.json()["choices"][0]["text"], str):
        tally.latency.append(time.monotonic() - started)
        tally.count("completion")
    else:
        tally.failed.append(f"completion: {r.status_code} {r.text[:200]}")


async def stream(
    http: httpx.AsyncClient, tally: Tally, rng: random.Random, args: argparse.Namespace, *, cancel: bool
) -> None:
    body = {
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": args.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    kind = "cancelled stream" if cancel else "stream"
    started = time.monotonic()
    first: float | None = None
    done = False
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            tally.failed.append(f"{kind}: {r.status_code} {(await r.aread())[:200]!r}")
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if first is None:
                first = time.monotonic() - started
                if cancel:
                    break  # leaving the block closes the connection mid-stream
            if line == "data: [DONE]":
                done = True
            elif '"error"' in line:
                tally.failed.append(f"{kind}: error event {line[:200]}")
                return
    if first is None or not (done or cancel):
        tally.failed.append(f"{kind}: ended without {'[DONE]' if first else 'any chunk'}")
        return
    tally.ttft.append(first)
    tally.count(kind)


async def embeddings(http: httpx.AsyncClient, tally: Tally, rng: random.Random) -> None:
    r = await http.post("/v1/embeddings", json={"input": rng.sample(PROMPTS, 2)})
    if r.status_code == 200 and len(r.json()["data"]) == 2:
        tally.count("embeddings")
    else:
        tally.failed.append(f"embeddings: {r.status_code} {r.text[:200]}")


async def invalid(
    http: httpx.AsyncClient, tally: Tally, rng: random.Random, bad: list[tuple[str, str, bytes, str]]
) -> None:
    name, path, body, kind = rng.choice(bad)
    r = await http.post(path, content=body, headers={"Content-Type": kind})
    if 400 <= r.status_code < 500 and r.status_code != 429:
        tally.refused += 1
    else:
        tally.unexpected.append(f"{name}: {r.status_code} {r.text[:200]}")


async def client(
    number: int, base: str, until: float, tally: Tally, args: argparse.Namespace, serves_embeddings: bool
) -> None:
    rng = random.Random(args.seed * 1000 + number)
    bad = invalid_requests(args.context)
    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT_S) as http:
        while time.monotonic() < until:
            pick = rng.random()
            kind = "invalid"
            try:
                if pick < 0.25:
                    kind = "chat"
                    await chat(http, tally, rng, args)
                elif pick < 0.45:
                    kind = "stream"
                    await stream(http, tally, rng, args, cancel=False)
                elif pick < 0.65:
                    kind = "completion"
                    await completion(http, tally, rng, args)
                elif pick < 0.75:
                    kind = "embeddings"
                    if serves_embeddings:
                        await embeddings(http, tally, rng)
                elif pick < 0.80:
                    kind = "cancelled stream"
                    await stream(http, tally, rng, args, cancel=True)
                else:
                    await invalid(http, tally, rng, bad)
            except httpx.HTTPError as e:
                (tally.unexpected if kind == "invalid" else tally.failed).append(
                    f"{kind}: {type(e).__name__}: {e}"
                )


async def sampler(pid: int, base: str, started: float, until: float, tally: Tally) -> None:
    """Every SAMPLE_S: the server's RSS and the time /health takes; a line per minute."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        while True:
            now = time.monotonic()
            tally.rss.append((now - started, rss_bytes(pid)))
            t0 = time.monotonic()
            r = await http.get("/health")
            tally.health.append(time.monotonic() - t0)
            if r.status_code != 200:
                tally.failed.append(f"health: {r.status_code}")
            elapsed, rss = tally.rss[-1]
            if len(tally.rss) % round(60 / SAMPLE_S) == 1:
                done = sum(tally.ok.values())
                print(
                    f"[{elapsed / 60:5.1f} min] RSS {rss / 2**20:7.1f} MiB, {done} ok, "
                    f"{len(tally.failed)} failed, {tally.refused} refused",
                    flush=True,
                )
            if now >= until:
                return
            await asyncio.sleep(min(SAMPLE_S, max(0.0, until - time.monotonic())))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def write_tiny_model(folder: Path) -> None:
    """A random tiny-llama with a byte-level BPE tokenizer: fast to serve, the server's code paths all the same."""
    tokenizer = train_tokenizer(
        iter(TOKENIZER_TEXT * 20),
        512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    torch.manual_seed(0)
    config = Config.from_name("tiny-llama", eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id)
    LLM(Transformer(config), tokenizer, source="tiny-llama").save(folder)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, model: str, args: argparse.Namespace) -> subprocess.Popen:
    """`lmforge serve` on 127.0.0.1:port in a process that ends itself a few minutes after the run."""
    argv = ["serve", model, "--host", "127.0.0.1", "--port", str(port)]
    argv += [] if args.compile else ["--no-compile"]
    code = (
        "import signal, sys; signal.alarm(int(sys.argv[1])); "
        "from lmforge.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    alarm = int(args.minutes * 60) + 900  # start-up and compilation included
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    return subprocess.Popen([sys.executable, "-c", code, str(alarm), *argv], env=env)


async def run(base: str, pid: int, args: argparse.Namespace) -> Tally:
    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT_S) as http:
        card = (await http.get("/v1/models")).json()["data"][0]
        args.context = card["max_model_len"]
        probe = await http.post("/v1/embeddings", json={"input": "hello"})
        serves_embeddings = probe.status_code == 200
    print(f"model {card['id']}, context {args.context}, embeddings served: {serves_embeddings}", flush=True)
    tally = Tally()
    started = time.monotonic()
    until = started + args.minutes * 60
    await asyncio.gather(
        sampler(pid, base, started, until, tally),
        *(client(i, base, until, tally, args, serves_embeddings) for i in range(args.clients)),
    )
    return tally


def report(tally: Tally, minutes: float) -> bool:
    """Print the table; True when both criteria hold."""
    baseline_s = min(BASELINE_S, minutes * 60 / 2)
    at_baseline = min(tally.rss, key=lambda s: abs(s[0] - baseline_s))
    end = tally.rss[-1]
    growth = 100 * (end[1] - at_baseline[1]) / at_baseline[1]
    ok = sum(tally.ok.values())
    rows = [
        ("requests ok", f"{ok} ({', '.join(f'{k} {v}' for k, v in sorted(tally.ok.items()))})"),
        ("failed (valid requests)", str(len(tally.failed))),
        ("4xx as expected (invalid requests)", str(tally.refused)),
        ("invalid requests not refused", str(len(tally.unexpected))),
        (
            "latency p50 / p99 (plain answers)",
            f"{percentile(tally.latency, 50):.3f} s / {percentile(tally.latency, 99):.3f} s",
        ),
        (
            "TTFT p50 / p99 (streams)",
            f"{percentile(tally.ttft, 50):.3f} s / {percentile(tally.ttft, 99):.3f} s",
        ),
        ("/health max / p99", f"{max(tally.health):.3f} s / {percentile(tally.health, 99):.3f} s"),
        (f"RSS at {at_baseline[0] / 60:.1f} min", f"{at_baseline[1] / 2**20:.1f} MiB"),
        (f"RSS at end ({end[0] / 60:.1f} min)", f"{end[1] / 2**20:.1f} MiB"),
        ("RSS growth", f"{growth:+.1f} %"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for what, items in (("failed", tally.failed), ("not refused", tally.unexpected)):
        for item in items[:10]:
            print(f"  {what}: {item}")
    passed = not tally.failed and not tally.unexpected and growth < 10
    print(
        f"\n{'PASS' if passed else 'FAIL'}: no failed valid request, every invalid one refused, RSS growth < 10 %"
    )
    return passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=16, help="clients sending requests back to back")
    parser.add_argument("--model", help="model to serve (default: a tiny random model written here)")
    parser.add_argument("--threads", type=int, default=1, help="the server's intra-op threads")
    parser.add_argument("--compile", action="store_true", help="serve with the compiled decode step")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.minutes <= 24 * 60 or not 1 <= args.clients <= 256:
        parser.error("--minutes must be in (0, 1440] and --clients in [1, 256]")

    with tempfile.TemporaryDirectory(prefix="lmforge-soak-") as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "tiny")
            write_tiny_model(Path(model))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_server(port, model, args)
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the server did not start")
                time.sleep(0.5)
            tally = asyncio.run(run(base, server.pid, args))
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    sys.exit(0 if report(tally, args.minutes) else 1)


if __name__ == "__main__":
    main()
