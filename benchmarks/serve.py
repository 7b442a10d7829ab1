"""Serving throughput: aggregate generated tokens/s and time to first token at 1, 4 and 8 concurrent streams.

    python benchmarks/serve.py [--max-tokens 64] [--rounds 3] [--threads N] [--model PATH]

Starts `lmforge serve` on SmolLM2-135M-Instruct (fp32, CPU) in its own process, so client and server do not
share an interpreter. At each level, that many client streams send chat requests back to back (greedy, EOS
ignored so every answer is --max-tokens long), --rounds requests each. Aggregate tokens/s is all generated
tokens over the level's wall time; time to first token (TTFT) is from sending a request to its first text.
--threads sets the server's intra-op threads (OMP_NUM_THREADS; default: torch's choice, one per core).
Target: 8 streams >= 3x the aggregate of 1 stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

LEVELS = (1, 4, 8)
QUESTIONS = [
    "Tell me about the history of the printing press.",
    "请介绍一下长城的历史。",
    "How do plants turn sunlight into energy?",
    "用几句话解释什么是机器学习。",
    "What should I pack for a week of hiking?",
    "请写一首关于秋天的短诗。",
    "Explain how a bicycle stays upright.",
    "北京有哪些值得参观的地方？",
]


async def one_request(http: httpx.AsyncClient, question: str, max_tokens: int) -> tuple[float, int]:
    """Stream one answer; return (seconds to first text, generated tokens)."""
    body = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - sent
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    assert first is not None and tokens == max_tokens, (first, tokens)
    return first, tokens


async def level(base: str, streams: int, rounds: int, max_tokens: int) -> tuple[float, list[float]]:
    """Run ``streams`` clients of ``rounds`` requests each; return (aggregate tokens/s, TTFTs)."""
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:

        async def client(i: int) -> list[tuple[float, int]]:
            return [
                await one_request(http, QUESTIONS[(i + r) % len(QUESTIONS)], max_tokens)
                for r in range(rounds)
            ]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(streams))) for r in rs]
        wall = time.perf_counter() - start
    return sum(tokens for _, tokens in results) / wall, [ttft for ttft, _ in results]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="requests per stream at each level")
    parser.add_argument("--threads", type=int, help="the server's intra-op threads")
    parser.add_argument("--model", help="model to serve (default: the bundled SmolLM2-135M-Instruct)")
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "lmforge", "serve", "--port", str(port), "--dtype", "float32"]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    server = subprocess.Popen([*command, *([args.model] if args.model else [])], env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        model = httpx.get(base + "/v1/models").json()["data"][0]
        asyncio.run(level(base, 1, 1, 8))  # warm-up
        rows = [
            (streams, *asyncio.run(level(base, streams, args.rounds, args.max_tokens))) for streams in LEVELS
        ]
    finally:
        server.terminate()
        server.wait()

    single = rows[0][1]
    info = model["lmforge"]
    print(
        f"\n{model['id']} ({info['dtype']}, {info['device']}, {args.threads or 'default'} threads), "
        f"{args.max_tokens} tokens per answer, {args.rounds} requests per stream"
    )
    print("| streams | requests | aggregate tokens/s | vs 1 stream | TTFT p50 (s) | TTFT p99 (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for streams, rate, ttfts in rows:
        print(
            f"| {streams} | {len(ttfts)} | {rate:.1f} | {rate / single:.2f}x | "
            f"{statistics.median(ttfts):.3f} | {percentile(ttfts, 0.99):.3f} |"
        )


if __name__ == "__main__":
    main()
