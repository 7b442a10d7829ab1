"""Prefix caching: time to first token of requests that share a ~1,000-token system prompt, cache on and off.

    python benchmarks/prefix_cache.py [--requests 10] [--threads N] [--model PATH] [--eager] [--time-limit 1200]

Starts `lmforge serve` (the bundled SmolLM2-135M-Instruct unless --model) on 127.0.0.1 in its own process,
twice: with the default prefix cache, then with `--prefix-cache-mb 0`. Each time, --requests chat requests
go one after another, all with the same system prompt (about 1,000 tokens) and each with its own short
question, streamed (greedy, 8 tokens). Time to first token (TTFT) runs from sending a request to its first
text. The table shows each request's TTFT and the `usage.prompt_tokens_details.cached_tokens` it reported;
the summary compares requests 2..N with the first. Target: with the cache, requests 2..N at least 5x faster
to their first token than request 1; without it, no faster.

--eager skips compiling the decode step (`--no-compile`: prefill, which the cache saves, is eager either
way). --threads sets the server's intra-op threads (OMP_NUM_THREADS; default: torch's choice). The server
ends itself after --time-limit seconds (SIGALRM), whatever happens here.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

SYSTEM_PARAGRAPHS = [
    "You are the help desk assistant of the Riverside Public Library. The library opens at nine in the morning "
    "and closes at eight in the evening from Monday to Friday; on Saturdays it closes at five, and on Sundays "
    "it is closed. Members may borrow up to twelve items at a time: books for three weeks, films and music for "
    "one week, and magazines for one week, except the newest issue, which stays in the reading room.",
    "Renewals can be made twice online, by phone or at the desk, unless another member has reserved the item. "
    "Late returns cost twenty cents a day for books and one dollar a day for films, up to the item's price. "
    "Children's cards never pay late fees. A lost card is replaced for two dollars; the first replacement in "
    "a year is free. Members who move must update their address within a month to keep borrowing.",
    "The building has three floors. The ground floor holds the returns machine, new arrivals, the café and the "
    "children's library with its story corner, where a librarian reads aloud every Wednesday at four. The "
    "first floor holds fiction, languages and the quiet study room, which can be booked for two hours a day. "
    "The second floor holds non-fiction, local history, the map collection and the computers.",
    "Computers can be used for one hour a day, longer when nobody is waiting; printing costs ten cents a page "
    "in black and white and fifty cents in colour. Wireless internet is free and needs no password in the "
    "building. Scanners and a photocopier are on the second floor. Staff can help members fill in forms, "
    "find sources for school work and use the online catalogue, e-books and language courses.",
    "Events: a book club meets on the first Tuesday of every month; a chess club on Thursday evenings; free "
    "English conversation classes on Saturday mornings; and a local history talk on the last Friday of the "
    "month. Rooms for community meetings can be booked a month ahead for free by non-profit groups and for "
    "fifteen dollars an hour by others. Food is allowed in the café only; covered drinks are fine anywhere.",
    "Answer the member's question in one or two friendly sentences, using only these facts. If the answer is "
    "not here, say that you do not know and suggest asking at the desk on the ground floor or calling the "
    "library. Never invent opening hours, prices, names or events, and never promise what staff will do.",
]
SYSTEM_PROMPT = " ".join(SYSTEM_PARAGRAPHS * 2)  # ~1,000 SmolLM2 tokens
QUESTIONS = [
    "When do you open on Saturday?",
    "How many books can I borrow?",
    "我的借书证丢了怎么办？",
    "Is there a chess club?",
    "Where are the maps?",
    "How much does colour printing cost?",
    "周日开门吗？",
    "Can I bring coffee to the study room?",
    "How long can I keep a film?",
    "Do children pay late fees?",
    "Can my group book a room?",
    "有免费的英语课吗？",
]
NEW_TOKENS = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, args: argparse.Namespace, cache_mb: float | None) -> subprocess.Popen:
    argv = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--no-compile"] if args.eager else []
    argv += ["--prefix-cache-mb", str(cache_mb)] if cache_mb is not None else []
    argv += [args.model] if args.model else []
    code = (
        "import signal, sys; signal.alarm(int(sys.argv[1])); "
        "from lmforge.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    return subprocess.Popen([sys.executable, "-c", code, str(args.time_limit), *argv], env=env)


def wait_until_serving(base: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600  # a cold compile cache and a slow machine
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.2)


def first_token(client: httpx.Client, base: str, question: str) -> tuple[float, int, int]:
    """TTFT in seconds, prompt tokens and cached tokens of one streamed request."""
    body = {
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    usage = None
    with client.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    assert ttft is not None and usage is not None, "no text or no usage came back"
    return ttft, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


def run(args: argparse.Namespace, cache_mb: float | None) -> list[tuple[float, int, int]]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(port, args, cache_mb)
    try:
        wait_until_serving(base, server)
        with httpx.Client() as client:
            return [first_token(client, base, QUESTIONS[i % len(QUESTIONS)]) for i in range(args.requests)]
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--threads", type=int, help="the server's intra-op threads (OMP_NUM_THREADS)")
    parser.add_argument("--model", help="a model for `lmforge serve` (default: the bundled SmolLM2)")
    parser.add_argument("--eager", action="store_true", help="serve with --no-compile")
    parser.add_argument("--time-limit", type=int, default=1200, help="seconds each server may live")
    args = parser.parse_args()
    if args.requests < 2:
        parser.error("--requests must be at least 2")
    on = run(args, None)
    off = run(args, 0)
    print(
        f"system prompt + question: {on[0][1]} tokens; {NEW_TOKENS} new tokens per answer, greedy, streamed"
    )
    print(f"{'request':>7}  {'TTFT cache on (s)':>17}  {'cached tokens':>13}  {'TTFT cache off (s)':>18}")
    for i, ((t_on, _, cached), (t_off, _, _)) in enumerate(zip(on, off, strict=True), start=1):
        print(f"{i:>7}  {t_on:>17.3f}  {cached:>13}  {t_off:>18.3f}")
    for name, rows in (("cache on", on), ("cache off", off)):
        later = statistics.mean(t for t, _, _ in rows[1:])
        print(
            f"{name:>9}: request 1 {rows[0][0]:.3f} s, requests 2-{len(rows)} mean {later:.3f} s: "
            f"{rows[0][0] / later:.1f}x lower"
        )
    print("target: requests 2-N at least 5x lower with the cache on")


if __name__ == "__main__":
    main()
