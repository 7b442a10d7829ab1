"""The main paths on a CUDA GPU, each checked against the same work on the CPU: python benchmarks/cuda_check.py

CI has no GPU, so this is what a session with one runs: inference (GGUF SmolLM2, fp32 and bf16, the compiled
decode step against eager), the server's
continuous batching, pretraining (fp32 losses vs CPU, bf16 + torch.compile, exact resume), LoRA fine-tuning and
merging, embeddings. Prints one table row per check and exits non-zero if any check fails.
"""

from __future__ import annotations

import csv
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from lmforge import LLM
from lmforge.data.text import prepare_corpus
from lmforge.lora import lora_layers, merge_lora
from lmforge.recipes.finetune import finetune
from lmforge.recipes.pretrain import pretrain
from lmforge.tokenizer import train_tokenizer

PROMPTS = ["The capital of France is", "中国的首都是"]
ROWS: list[tuple[str, bool, str]] = []
DEVICE = (
    sys.argv[1] if len(sys.argv) > 1 else "cuda"
)  # "cpu" dry-runs the script itself on a machine without a GPU


def check(name: str) -> Callable[[Callable[[], tuple[bool, str]]], None]:
    def run(body: Callable[[], tuple[bool, str]]) -> None:
        start = time.perf_counter()
        try:
            ok, detail = body()
        except Exception as error:  # a crash is a failed check; the other checks still run
            traceback.print_exc()
            ok, detail = False, f"{type(error).__name__}: {error}"
        ROWS.append((name, ok, f"{detail} ({time.perf_counter() - start:.1f} s)"))
        print(f"{'ok ' if ok else 'FAIL'} {name}: {detail}", flush=True)

    return run


def logits_of(llm: LLM, text: str) -> torch.Tensor:
    ids = torch.tensor([llm.tokenizer.encode(text)], device=llm.model.device)
    with torch.inference_mode():
        logits, _ = llm.model(ids)
    return logits.float().cpu()


def step_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv", encoding="utf-8") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}


def main() -> None:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: this script checks the GPU paths (`cuda_check.py cpu` dry-runs it)")
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="lmforge-cuda-"))
    cpu = LLM.load(dtype="float32", device="cpu")
    gpu = LLM.load(dtype="float32", device=DEVICE)

    @check("SmolLM2 fp32 logits, GPU vs CPU")
    def _() -> tuple[bool, str]:
        worst = max(float((logits_of(gpu, p) - logits_of(cpu, p)).abs().max()) for p in PROMPTS)
        return worst < 1e-3, f"max |diff| {worst:.2e}"

    @check("SmolLM2 fp32 greedy text, GPU == CPU (en, zh)")
    def _() -> tuple[bool, str]:
        same = [gpu.generate_text(p, max_length=32) == cpu.generate_text(p, max_length=32) for p in PROMPTS]
        return all(same), f"{sum(same)}/{len(same)} identical"

    @check("compiled decode step (torch.compile, static KV cache) == eager: greedy text, and tok/s of both")
    def _() -> tuple[bool, str]:
        compiled = LLM.load(dtype="float32", device=DEVICE, compile=True)
        eager = LLM.load(dtype="float32", device=DEVICE, compile=False)
        for llm in (compiled, eager):
            llm.generate_text(PROMPTS[0], max_new_tokens=4)  # compile (and CUDA warm-up) outside the timing
        rates, same = [], []
        for llm in (compiled, eager):
            start = time.perf_counter()
            texts = [llm.generate_text(p, max_new_tokens=64, stop_on_eos=False) for p in PROMPTS]
            rates.append(64 * len(PROMPTS) / (time.perf_counter() - start))
            same.append(texts)
        ok = same[0] == same[1]
        return ok, f"identical: {ok}; decode tok/s compiled {rates[0]:.0f}, eager {rates[1]:.0f}"

    @check("SmolLM2 bf16 (the GPU default): next-token argmax agrees with fp32")
    def _() -> tuple[bool, str]:
        bf16 = LLM.load(device=DEVICE)
        agree = total = 0
        for p in PROMPTS:
            a, b = logits_of(bf16, p).argmax(-1), logits_of(gpu, p).argmax(-1)
            agree, total = agree + int((a == b).sum()), total + a.numel()
        text = bf16.generate_text(PROMPTS[1], max_length=16)
        ok = agree / total >= 0.8 and "\ufffd" not in text and bf16.model.dtype == torch.bfloat16
        return ok, f"{agree}/{total} positions agree; zh answer {text!r}"

    @check("server: 6 concurrent greedy completions equal generate_text")
    def _() -> tuple[bool, str]:
        from fastapi.testclient import TestClient

        from lmforge.serve import create_app

        prompts = [f"{p} {i}" for i in range(3) for p in PROMPTS]
        with TestClient(create_app(gpu), base_url="http://localhost") as client:  # a Host it answers to

            def ask(prompt: str) -> str:
                body = {"model": "m", "prompt": prompt, "max_tokens": 24, "temperature": 0}
                reply = client.post("/v1/completions", json=body)
                reply.raise_for_status()
                return reply.json()["choices"][0]["text"]

            with ThreadPoolExecutor(6) as pool:
                served = list(pool.map(ask, prompts))
        solo = [gpu.generate_text(p, max_length=24) for p in prompts]
        same = sum(s == t for s, t in zip(served, solo, strict=True))
        return same == len(prompts), f"{same}/{len(prompts)} identical"

    @check("embeddings, GPU vs CPU (cosine)")
    def _() -> tuple[bool, str]:
        a, b = gpu.embed(PROMPTS), cpu.embed(PROMPTS)
        worst = float((a * b).sum(-1).min())
        return worst > 0.9999, f"min cosine {worst:.6f}"

    corpus = work / "corpus.txt"
    corpus.write_text(
        ("First Citizen:\nBefore we proceed any further, hear me speak.\n春眠不觉晓，处处闻啼鸟。\n") * 400
    )
    tokenizer = train_tokenizer([corpus], kind="char", show_progress=False)
    prepare_corpus([corpus], tokenizer, work / "data", val_fraction=0.1, show_progress=False)
    tiny = {"vocab_size": tokenizer.vocab_size, "n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 64}

    def train(name: str, device: str, steps: int, resume: bool = False, **extra: object) -> Path:
        settings = {"out_dir": str(work / name), "max_steps": steps, "micro_batch_size": 8, "device": device}
        settings |= {"eval_every": 10, "eval_batches": 2, "save_every": 10, "progress": False, **extra}
        pretrain(work / "data", arch="baby-gpt", model_config=tiny, train=settings, resume=resume)
        return work / name

    @check("pretrain fp32: 30 per-step losses, GPU vs CPU")
    def _() -> tuple[bool, str]:
        g, c = step_losses(train("gpu", DEVICE, 30)), step_losses(train("cpu", "cpu", 30))
        worst = max(abs(g[s] - c[s]) for s in c)
        return len(g) == 30 and worst < 1e-3, f"max |diff| {worst:.2e}; loss {g[1]:.3f} -> {g[30]:.3f}"

    @check("pretrain bf16 autocast + torch.compile on GPU: loss falls")
    def _() -> tuple[bool, str]:
        losses = step_losses(train("bf16", DEVICE, 30, precision="bf16", compile=True))
        return losses[30] < losses[1] - 0.5, f"loss {losses[1]:.3f} -> {losses[30]:.3f}"

    @check("pretrain resume on GPU: steps 11-20 equal an uninterrupted run")
    def _() -> tuple[bool, str]:
        whole = step_losses(train("whole", DEVICE, 20))
        train("split", DEVICE, 10)
        resumed = step_losses(train("split", DEVICE, 20, resume=True))
        worst = max(abs(whole[s] - resumed[s]) for s in range(11, 21))
        return worst <= 1e-6, f"max |diff| {worst:.2e}"

    @check("LoRA fine-tune (classify) on GPU; merged == unmerged; classify_text")
    def _() -> tuple[bool, str]:
        data = work / "spam.jsonl"
        rows = [
            ("WINNER! Claim your free prize now, call 0800", "spam"),
            ("see you at lunch tomorrow", "ham"),
        ]
        rows += [("免费领取大奖，立即回复", "spam"), ("明天中午一起吃饭吧", "ham")]
        data.write_text("".join(f'{{"text": "{t}", "label": "{label}"}}\n' for t, label in rows * 8), "utf-8")
        settings = {"out_dir": str(work / "lora"), "max_steps": 20, "micro_batch_size": 8, "lr": 1e-3}
        settings |= {"eval_every": 0, "progress": False, "warmup_steps": 2}
        result = finetune("default", data, task="classify", method="lora", merge=False, train=settings)
        tuned = LLM.load(result.model_dir, device=DEVICE, dtype="float32")
        unmerged = [logits_of(tuned, p) for p in PROMPTS]
        merge_lora(tuned.model)
        worst = max(
            float((logits_of(tuned, p) - u).abs().max()) for p, u in zip(PROMPTS, unmerged, strict=True)
        )
        labels = [r["label"] for r in tuned.classify_text([t for t, _ in rows])]
        right = sum(a == b for a, (_, b) in zip(labels, rows, strict=True))
        ok = worst <= 1e-4 and right >= 3 and not lora_layers(tuned.model)
        return ok, f"merged vs unmerged max |diff| {worst:.2e}; {right}/4 training texts right"

    print("\n| check | result | detail |\n|---|---|---|")
    for name, ok, detail in ROWS:
        print(f"| {name} | {'ok' if ok else '**FAIL**'} | {detail} |")
    sys.exit(0 if all(ok for _, ok, _ in ROWS) else 1)


if __name__ == "__main__":
    main()
