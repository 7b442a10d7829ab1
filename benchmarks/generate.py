"""SmolLM2-135M CPU inference speed: lmforge's load paths next to transformers and llama.cpp, one table.

    python benchmarks/generate.py [--threads 2] [--repeats 3] [--new-tokens 128]
                                  [--engines fp32,packed,packed-eager,hf,llamacpp] [--files Q4_1,Q8_0]

Files: the shipped Q4_1 GGUF and an lmforge Q8_0 export of it (``_models.smollm2_files``). Engines:

- ``fp32``         lmforge fp32 eager: ``LLM.load(path, dtype="float32", quant="none", compile=False)``
- ``packed``       lmforge packed + compiled: ``LLM.load(path, quant="auto", compile=True)``
- ``packed-eager`` lmforge packed eager: ``LLM.load(path, quant="auto", compile=False)``
- ``hf``           transformers fp32 through its own GGUF loader (the Q4_1 file only)
- ``llamacpp``     llama-cpp-python (installed by ``llama_cpp_export.ensure_llama_cpp`` when missing)

Per (file, engine) cell: decode tok/s (batch 1, greedy, --new-tokens after a short prompt, EOS ignored),
prefill tok/s (one 512-token prompt, time to the first logits), "first-call s" (the untimed warm-up
generation: for ``packed`` it includes torch.compile) and the peak RSS of the process. Each cell runs in its
own subprocess (``--worker ENGINE FILE``: token ids on its first stdin line, then one command a line, one JSON
line out for each) so that the peak RSS is that engine's alone; every subprocess gets the same thread count.
The workers start and warm up one after another, then the timed runs go in rounds, every cell once a round
(decode, then prefill), so that a machine whose speed drifts over minutes slows every engine alike: tok/s are
medians over --repeats rounds, and the ratio columns (decode, and prefill against llama.cpp) are medians of each
round's own ratio. The parent
tokenizes both prompts once per file, so every engine sees the same token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Only the standard library at module level: a llama.cpp worker must not pay torch's memory in its peak RSS.
# Each engine imports what it needs.

PROMPT = "The history of the printing press begins"
PREFILL_TOKENS = 512
ENGINES = {
    "fp32": "lmforge fp32 eager",
    "packed": "lmforge packed + compiled",
    "packed-eager": "lmforge packed eager",
    "hf": "transformers fp32",
    "llamacpp": "llama.cpp",
}
LMFORGE_OPTIONS = {
    "fp32": {"dtype": "float32", "quant": "none", "compile": False},
    "packed": {"quant": "auto", "compile": True},
    "packed-eager": {"quant": "auto", "compile": False},
}
HF_FILE = "Q4_1"  # transformers dequantizes any GGUF to fp32: one file is enough

Step = Callable[[], None]
Ids = dict[str, list[int]]  # {"prompt": the decode prompt, "long": the 512-token prefill prompt}


# ------------------------------------------------------------------------------------------ engines (worker side)
# Each returns (decode, prefill): decode generates --new-tokens after ids["prompt"], prefill computes the logits
# of the last position of ids["long"].
def set_torch_threads(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def lmforge_steps(engine: str, path: Path, ids: Ids, args: argparse.Namespace):
    torch = set_torch_threads(args.threads)
    from lmforge import LLM, SamplingParams
    from lmforge.generate import generate_tokens

    llm = LLM.load(path, device="cpu", **LMFORGE_OPTIONS[engine])
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_on_eos=False)
    long_ids = torch.tensor([ids["long"]])

    def decode() -> None:
        assert sum(1 for _ in generate_tokens(llm.model, [ids["prompt"]], params)) == args.new_tokens

    @torch.inference_mode()
    def prefill() -> None:
        llm.model(long_ids, last_logits_only=True)

    return decode, prefill


def hf_steps(engine: str, path: Path, ids: Ids, args: argparse.Namespace):
    torch = set_torch_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    prompt_ids, long_ids = torch.tensor([ids["prompt"]]), torch.tensor([ids["long"]])

    @torch.inference_mode()
    def decode() -> None:
        out = model.generate(
            prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        assert out.shape[1] - prompt_ids.shape[1] == args.new_tokens

    @torch.inference_mode()
    def prefill() -> None:
        model(long_ids, logits_to_keep=1)

    return decode, prefill


def llama_cpp_steps(engine: str, path: Path, ids: Ids, args: argparse.Namespace):
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=1024,
        n_batch=512,
        verbose=False,
    )

    def decode() -> None:
        llm.reset()
        llm.eval(ids["prompt"])
        for i in range(args.new_tokens):
            token = llm.sample(temp=0.0)
            if i < args.new_tokens - 1:  # the last token needs no forward pass, as in the other engines
                llm.eval([token])

    def prefill() -> None:
        llm.reset()
        llm.eval(ids["long"])

    return decode, prefill


ENGINE_STEPS = {
    "fp32": lmforge_steps,
    "packed": lmforge_steps,
    "packed-eager": lmforge_steps,
    "hf": hf_steps,
    "llamacpp": llama_cpp_steps,
}


# ------------------------------------------------------------------------------------------ worker
def seconds(step: Step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM).

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries that over fork and exec, so a worker would report
    at least its parent's peak (the parent has torch loaded, and may just have written the Q8_0 export).
    """
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024  # kB


def worker(engine: str, path: Path, args: argparse.Namespace) -> None:
    """Set up, warm up (the first call of each step), answer ``{"first_call_s"}``; then for each command line
    "decode" or "prefill" one timed run (``{"seconds"}``), and for "done" ``{"peak_rss_mib"}``."""
    ids = json.loads(sys.stdin.readline())
    steps = dict(zip(("decode", "prefill"), ENGINE_STEPS[engine](engine, path, ids, args), strict=True))
    first_call = seconds(steps["decode"])
    seconds(steps["prefill"])
    print(json.dumps({"first_call_s": first_call}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "done":
            print(json.dumps({"peak_rss_mib": peak_rss_mib()}), flush=True)
            return
        print(json.dumps({"seconds": seconds(steps[command])}), flush=True)


# ------------------------------------------------------------------------------------------ parent
def prompt_ids(path: Path) -> Ids:
    """The short decode prompt and the 512-token prefill prompt, tokenized with the file's own tokenizer."""
    import torch

    from lmforge.formats.gguf import GGUFFile

    tokenizer = GGUFFile(path).tokenizer()
    text = Path(torch.__file__).read_text(encoding="utf-8") * 4  # any long real text will do
    long = tokenizer.encode(text)[:PREFILL_TOKENS]
    assert len(long) == PREFILL_TOKENS
    return {"prompt": tokenizer.encode(PROMPT), "long": long}


class Cell:
    """One (file, engine) worker process, asked for one timed run at a time."""

    def __init__(self, engine: str, path: Path, ids: Ids, args: argparse.Namespace) -> None:
        self.engine, self.path = engine, path
        options = [f"--threads={args.threads}", f"--new-tokens={args.new_tokens}"]
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", engine, str(path), *options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        self.times: dict[str, list[float]] = {"decode": [], "prefill": []}
        self.first_call_s = self.ask(json.dumps(ids))["first_call_s"]

    def ask(self, line: str) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"{ENGINES[self.engine]} on {self.path.name} failed (its stderr is above)")
        return json.loads(answer)

    def run(self, step: str) -> None:
        self.times[step].append(self.ask(step)["seconds"])

    def finish(self, args: argparse.Namespace) -> dict:
        result = {
            "decode": args.new_tokens / statistics.median(self.times["decode"]),
            "prefill": PREFILL_TOKENS / statistics.median(self.times["prefill"]),
            "decode_runs": [args.new_tokens / s for s in self.times["decode"]],
            "prefill_runs": [PREFILL_TOKENS / s for s in self.times["prefill"]],
            "first_call_s": self.first_call_s,
            "peak_rss_mib": self.ask("done")["peak_rss_mib"],
        }
        self.process.wait()
        print(f"  {ENGINES[self.engine]} on {self.path.name}: {result}", file=sys.stderr, flush=True)
        return result


def machine_line(args: argparse.Namespace) -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    amx = sorted(f for f in flags if f.startswith("amx"))

    def package(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (
        f"SmolLM2-135M-Instruct on {model} (avx512_bf16: {'yes' if 'avx512_bf16' in flags else 'no'}, "
        f"amx: {','.join(amx) or 'no'}), {args.threads} threads, torch {package('torch')}, "
        f"llama_cpp {package('llama-cpp-python')}, transformers {package('transformers')}, "
        f"medians of {args.repeats} rounds, every engine once a round"
    )


def ratio(result: dict, reference: dict | None, step: str = "decode") -> str:
    """The median of the rounds' ratios of ``step`` (each round ran both cells within a minute or so)."""
    if not reference:
        return "–"
    pairs = zip(result[f"{step}_runs"], reference[f"{step}_runs"], strict=True)
    return f"{statistics.median(a / b for a, b in pairs):.2f}x"


def table(results: dict[tuple[str, str], dict | None], args: argparse.Namespace) -> list[str]:
    lines = [
        f"| file | engine | decode tok/s (batch 1, {args.new_tokens} new) | prefill {PREFILL_TOKENS} tok/s "
        "| first-call s | peak RSS MiB | decode vs llama.cpp | decode vs lmforge fp32 eager "
        "| prefill vs llama.cpp |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (label, engine), r in results.items():
        if r is None:
            lines.append(f"| {label} | {ENGINES[engine]} | failed (see above) | | | | | | |")
            continue
        llama_cpp = results.get((label, "llamacpp"))
        lines.append(
            f"| {label} | {ENGINES[engine]} | {r['decode']:.1f} | {r['prefill']:.0f} | {r['first_call_s']:.1f} "
            f"| {r['peak_rss_mib']:.0f} | {ratio(r, llama_cpp)} | {ratio(r, results.get((label, 'fp32')))} "
            f"| {ratio(r, llama_cpp, 'prefill')} |"
        )
    return lines


def parent(args: argparse.Namespace) -> None:
    from _models import smollm2_files

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    labels = [f.strip() for f in args.files.split(",") if f.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        sys.exit(f"unknown engine(s) {unknown}: choose from {', '.join(ENGINES)}")
    if "llamacpp" in engines:
        from llama_cpp_export import ensure_llama_cpp

        ensure_llama_cpp()
    files = smollm2_files()
    if not set(labels) <= set(files):
        sys.exit(f"unknown file(s) {sorted(set(labels) - set(files))}: choose from {', '.join(files)}")

    cells: dict[tuple[str, str], Cell | None] = {}
    for label in labels:
        ids = prompt_ids(files[label])
        for engine in engines:
            if engine == "hf" and label != HF_FILE:
                continue
            try:
                cells[(label, engine)] = Cell(engine, files[label], ids, args)
            except RuntimeError as e:
                print(e, file=sys.stderr, flush=True)
                cells[(label, engine)] = None
    for _ in range(args.repeats):
        for cell in cells.values():
            if cell is not None:
                cell.run("decode")
                cell.run("prefill")
    results = {key: cell.finish(args) if cell else None for key, cell in cells.items()}
    print("\n" + machine_line(args))
    print("\n".join(table(results, args)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    parser.add_argument("--files", default="Q4_1,Q8_0", help="comma list of Q4_1, Q8_0")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        engine, path = args.worker
        worker(engine, Path(path), args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
