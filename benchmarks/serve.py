"""Serving throughput and fairness: aggregate tokens/s at 1, 4 and 8 concurrent streams, and how long a
~2,000-token prompt arriving mid-run holds up the streams already decoding.

    python benchmarks/serve.py [--max-tokens 64] [--rounds 3] [--repeats 3] [--threads N] [--model PATH] [--float32]
                               [--batch-weights auto|packed|packed-bf16|bf16]
                               [--long-prompt-tokens 2000] [--long-streams 4] [--time-limit 1800]

Starts `lmforge serve` on SmolLM2-135M-Instruct in its own process (client and server do not share an
interpreter), loaded the default way: packed weights, compiled decode step (--float32: fp32 weights, eager
steps, for comparison; --batch-weights packed: batch steps in float32, not the bf16 dot products `auto` uses on
CPUs with AVX512-BF16; see `lmforge serve --help`). Before timing, one short round at each level (and at 2 streams) lets the server
compile its decode step for every slot bucket it will use.

Throughput: at each level, that many client streams send chat requests back to back (greedy, EOS ignored so
every answer is --max-tokens long), --rounds requests each; the levels take turns --repeats times. Aggregate
tokens/s is all generated tokens over the level's wall time (the table: its median over the repeats); time to
first token (TTFT) is from sending a request to its first text. Target: 8
streams >= 3x the aggregate of 1 stream.

Long prompt: --long-streams streams decode (English answers: a token ending inside a Chinese character
would reach the client with the next one); once each has produced 16 tokens, one prompt of about
--long-prompt-tokens tokens arrives. The table compares the largest gap between consecutive tokens of the
running streams before it arrived and while it was prefilled (until its first token). Target: < 1 s.

--threads sets the server's intra-op threads (OMP_NUM_THREADS; default: torch's choice, one per core). The
server listens on 127.0.0.1 only and ends itself after --time-limit seconds (SIGALRM), whatever happens here.

    python benchmarks/serve.py --ray [--ray-streams 8] [--replica-threads 1] [--max-tokens 64] [--rounds 3]

--ray: `lmforge serve --ray` with 1, then 2 replicas (a local Ray cluster each time, replicas of
--replica-threads intra-op threads), --ray-streams client streams of --rounds requests each; aggregate
tokens/s per replica count, and how many requests each replica answered (its X-Lmforge-Replica header).
Replicas only add speed where there are cores for them: on a machine whose cores one server already keeps
busy, two replicas share the same cores.
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

from lmforge.config import BATCH_WEIGHTS

LEVELS = (1, 4, 8)
REPLICA_HEADER = "X-Lmforge-Replica"  # lmforge.serve.ray.REPLICA_HEADER (importing it would import ray)
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
# English only where gaps are timed: a token that ends inside a Chinese character is sent with the next one.
ENGLISH = [q for q in QUESTIONS if q.isascii()]
PARAGRAPH = (
    "The printing press changed how knowledge moved through Europe. Before it, books were copied by hand, "
    "slowly and at great cost, and few people owned any. Within fifty years of Gutenberg's first Bible, "
    "presses in more than two hundred cities had printed millions of volumes: grammars, almanacs, sermons, "
    "maps and pamphlets that argued about religion and politics. Readers compared editions, scholars "
    "corrected errors in print, and ideas that once stayed in one monastery now crossed borders in weeks. "
)


def chat_body(question: str, max_tokens: int) -> dict:
    return {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_times(
    http: httpx.AsyncClient,
    path: str,
    body: dict,
    times: list[float] | None = None,
    replicas: list[str] | None = None,
) -> tuple[float, list[float], dict]:
    """Stream one answer; return (time sent, arrival time of every piece of text, usage). The arrival times
    go into ``times`` as they come, when given (the caller can watch them); the replica that answered (Ray
    Serve) into ``replicas``."""
    sent = time.perf_counter()
    times = [] if times is None else times
    usage: dict = {}
    async with http.stream("POST", path, json=body) as response:
        response.raise_for_status()
        if replicas is not None:
            replicas.append(response.headers.get(REPLICA_HEADER, "?"))
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            choice = chunk["choices"][0] if chunk["choices"] else {}
            if choice.get("delta", {}).get("content") or choice.get("text"):
                times.append(time.perf_counter())
            if chunk.get("usage"):
                usage = chunk["usage"]
    return sent, times, usage


async def level(
    base: str, streams: int, rounds: int, max_tokens: int, replicas: list[str] | None = None
) -> tuple[float, list[float]]:
    """Run ``streams`` clients of ``rounds`` requests each; return (aggregate tokens/s, TTFTs). The replica
    that answered each request goes into ``replicas``, when given."""
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:

        async def client(i: int) -> list[tuple[float, int]]:
            results = []
            for r in range(rounds):
                body = chat_body(QUESTIONS[(i + r) % len(QUESTIONS)], max_tokens)
                sent, times, usage = await stream_times(http, "/v1/chat/completions", body, replicas=replicas)
                assert times and usage["completion_tokens"] == max_tokens, usage
                results.append((times[0] - sent, usage["completion_tokens"]))
            return results

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(streams))) for r in rs]
        wall = time.perf_counter() - start
    return sum(tokens for _, tokens in results) / wall, [ttft for ttft, _ in results]


async def long_prompt(base: str, streams: int, prompt_tokens: int) -> dict:
    """``streams`` answers decode; a ~``prompt_tokens`` prompt arrives once each has 16 tokens. Returns the
    largest token gap of the running streams before it and while it was prefilled, and its size and TTFT."""
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        r = await http.post("/v1/completions", json={"prompt": PARAGRAPH, "max_tokens": 1})
        per_paragraph = r.json()["usage"]["prompt_tokens"]
        text = PARAGRAPH * max(1, round(prompt_tokens / per_paragraph))
        arrivals: list[list[float]] = [[] for _ in range(streams)]
        running = [
            asyncio.create_task(
                stream_times(http, "/v1/chat/completions", chat_body(ENGLISH[i % 4], 4000), arrivals[i])
            )
            for i in range(streams)
        ]
        while min(len(times) for times in arrivals) < 16:
            await asyncio.sleep(0.01)
        body = {"prompt": text, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}
        body["stream_options"] = {"include_usage": True}
        sent, times, usage = await stream_times(http, "/v1/completions", body)
        first = times[0]
        await asyncio.sleep(1.0)  # the running streams' tokens after the newcomer joined
        for task in running:
            task.cancel()  # hanging up frees their slots
        await asyncio.gather(*running, return_exceptions=True)
    before, during = [], []
    for times in arrivals:
        for a, b in zip(times, times[1:], strict=False):
            if b <= sent:
                before.append(b - a)
            elif a < first:
                during.append(b - a)
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "ttft": first - sent,
        "gap_before": max(before),
        "gap_during": max(during) if during else float("nan"),
        "median_before": statistics.median(before),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, args: argparse.Namespace, replicas: int | None = None) -> subprocess.Popen:
    """`lmforge serve` on 127.0.0.1:port in a process that ends itself after --time-limit seconds; with
    ``replicas``, `lmforge serve --ray` (SIGALRM then exits through Python, so the Ray cluster is shut down)."""
    argv = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    if args.float32:
        argv += ["--dtype", "float32", "--quant", "none", "--no-compile"]
    argv += ["--batch-weights", args.batch_weights]
    if replicas is not None:
        argv += ["--ray", "--replicas", str(replicas), "--replica-threads", str(args.replica_threads)]
    argv += [args.model] if args.model else []
    # The alarm ends the process; with Ray, through Python (SystemExit), so that the cluster is shut down too.
    exit_by = "signal.signal(signal.SIGALRM, lambda *_: sys.exit(1)); " if replicas is not None else ""
    code = (
        f"import signal, sys; {exit_by}signal.alarm(int(sys.argv[1])); "
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


def describe(model: dict, args: argparse.Namespace, threads: str) -> str:
    info = model["lmforge"]
    copy = info.get("batch_weights_bytes", 0)
    batch = f"bf16 copy for batches ({copy / 2**20:.0f} MiB)" if copy else "packed kernel at every batch size"
    batch += ", batch steps in bf16 dot products" if info.get("bf16_batches") else ", batch steps in float32"
    return (
        f"{model['id']} ({info['dtype']}, {info.get('packing', '?')}, {batch}, "
        f"{'compiled' if info.get('compiled_decode') else 'eager'} steps, {info['device']}, {threads}), "
        f"{args.max_tokens} tokens per answer, {args.rounds} requests per stream"
    )


def ray_main(args: argparse.Namespace) -> None:
    """Aggregate tokens/s of `lmforge serve --ray` with 1 and 2 replicas (see the module docstring)."""
    rows = []
    for replicas in (1, 2):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_server(port, args, replicas=replicas)
        try:
            wait_until_serving(base, server)
            model = httpx.get(base + "/v1/models").json()["data"][0]
            for streams in (1, 2, 4, 8):  # each replica compiles its slot buckets as it meets them
                asyncio.run(level(base, min(streams, args.ray_streams), 1, 8))
            answered: list[str] = []
            rate, ttfts = asyncio.run(level(base, args.ray_streams, args.rounds, args.max_tokens, answered))
            rows.append((replicas, rate, ttfts, sorted(answered.count(r) for r in set(answered))))
        finally:
            server.terminate()  # on SIGTERM the CLI shuts its Ray cluster down
            server.wait()
    print(f"\n{describe(model, args, f'{args.replica_threads} thread(s) per replica')}, on Ray Serve")
    print(
        "| replicas | streams | requests | aggregate tokens/s | vs 1 replica | TTFT p50 (s) | TTFT p99 (s) | "
        "requests per replica |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for replicas, rate, ttfts, per_replica in rows:
        print(
            f"| {replicas} | {args.ray_streams} | {len(ttfts)} | {rate:.1f} | {rate / rows[0][1]:.2f}x | "
            f"{statistics.median(ttfts):.3f} | {percentile(ttfts, 0.99):.3f} | {per_replica} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="requests per stream at each level")
    parser.add_argument("--repeats", type=int, default=3, help="times the levels take turns (medians shown)")
    parser.add_argument("--threads", type=int, help="the server's intra-op threads")
    parser.add_argument("--model", help="model to serve (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--float32", action="store_true", help="fp32 weights and eager steps (the old path)")
    parser.add_argument(
        "--batch-weights",
        default="auto",
        choices=BATCH_WEIGHTS,
        help="`lmforge serve --batch-weights`",
    )
    parser.add_argument("--long-prompt-tokens", type=int, default=2000)
    parser.add_argument("--long-streams", type=int, default=4, help="streams decoding when it arrives")
    parser.add_argument("--time-limit", type=int, default=1800, help="seconds before the server ends itself")
    parser.add_argument("--ray", action="store_true", help="`lmforge serve --ray` with 1 and 2 replicas")
    parser.add_argument("--ray-streams", type=int, default=8, help="with --ray: concurrent client streams")
    parser.add_argument("--replica-threads", type=int, default=1, help="with --ray: threads per replica")
    args = parser.parse_args()
    if args.ray:
        ray_main(args)
        return

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(port, args)
    try:
        wait_until_serving(base, server)
        model = httpx.get(base + "/v1/models").json()["data"][0]
        warm = time.perf_counter()
        for streams in (1, 2, 4, 8):  # compile the decode step for each slot bucket before timing
            asyncio.run(level(base, streams, 1, 8))
        warm = time.perf_counter() - warm
        # The levels take turns, --repeats times: a machine whose speed drifts between minutes (a shared
        # host) then moves every level alike, and the table reports each level's median.
        runs: dict[int, list[tuple[float, list[float]]]] = {streams: [] for streams in LEVELS}
        for _ in range(args.repeats):
            for streams in LEVELS:
                runs[streams].append(asyncio.run(level(base, streams, args.rounds, args.max_tokens)))
        rows = [
            (
                streams,
                statistics.median(rate for rate, _ in runs[streams]),
                [ttft for _, ttfts in runs[streams] for ttft in ttfts],
            )
            for streams in LEVELS
        ]
        long = asyncio.run(long_prompt(base, args.long_streams, args.long_prompt_tokens))
    finally:
        server.terminate()
        server.wait()

    single = rows[0][1]
    threads = f"{args.threads or 'default'} threads"
    print(f"\n{describe(model, args, threads)}; warm-up (compiling) {warm:.0f} s")
    print("| streams | requests | aggregate tokens/s (median) | vs 1 stream | TTFT p50 (s) | TTFT p99 (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for streams, rate, ttfts in rows:
        print(
            f"| {streams} | {len(ttfts)} | {rate:.1f} | {rate / single:.2f}x | "
            f"{statistics.median(ttfts):.3f} | {percentile(ttfts, 0.99):.3f} |"
        )
    ratio = rows[-1][1] / single
    each = ", ".join(f"{eight / one:.2f}x" for (one, _), (eight, _) in zip(runs[1], runs[8], strict=True))
    print(
        f"\n8 streams vs 1: {ratio:.2f}x (target >= 3x: {'met' if ratio >= 3 else 'NOT met'}); by repeat: {each}"
    )
    print(
        f"\nlong prompt: {long['prompt_tokens']} tokens arriving while {args.long_streams} streams decode "
        f"(its first token after {long['ttft']:.2f} s)"
    )
    print("| running streams' gap between tokens | before it | while it was prefilled |")
    print("|---|---:|---:|")
    print(f"| largest (s) | {long['gap_before']:.3f} | {long['gap_during']:.3f} |")
    print(f"| median before (s) | {long['median_before']:.3f} | |")
    verdict = "met" if long["gap_during"] < 1.0 else "NOT met"
    print(f"\nlargest gap while prefilling < 1 s: {verdict}")


if __name__ == "__main__":
    main()
