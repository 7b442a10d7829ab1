"""SmolLM2-135M inference speed: lmforge (fp32, bf16) next to Hugging Face transformers (fp32), one run.

    python benchmarks/generate.py [--threads 2] [--repeats 3]

Decode: batch 1, greedy, 128 new tokens after a short prompt (EOS ignored). Prefill: one 512-token prompt.
Both engines load the same GGUF (transformers through its own GGUF loader). Medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lmforge import LLM, SamplingParams
from lmforge.generate import generate_tokens
from lmforge.loading import bundled_model_path

PROMPT = "The history of the printing press begins"
NEW_TOKENS = 128
PREFILL_TOKENS = 512


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_lmforge(
    llm: LLM, prompt_ids: list[int], long_ids: torch.Tensor, repeats: int
) -> tuple[float, float]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_on_eos=False)

    def decode() -> None:
        assert sum(1 for _ in generate_tokens(llm.model, [prompt_ids], params)) == NEW_TOKENS

    @torch.inference_mode()
    def prefill() -> None:
        llm.model(long_ids, last_logits_only=True)

    return NEW_TOKENS / median_time(decode, repeats), PREFILL_TOKENS / median_time(prefill, repeats)


def bench_hf(model, prompt_ids: list[int], long_ids: torch.Tensor, repeats: int) -> tuple[float, float]:
    ids = torch.tensor([prompt_ids])

    @torch.inference_mode()
    def decode() -> None:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
        assert out.shape[1] - ids.shape[1] == NEW_TOKENS

    @torch.inference_mode()
    def prefill() -> None:
        model(long_ids, logits_to_keep=1)

    return NEW_TOKENS / median_time(decode, repeats), PREFILL_TOKENS / median_time(prefill, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path: Path = bundled_model_path()

    ours32 = LLM.load(path, dtype="float32", device="cpu")
    prompt_ids = ours32.tokenizer.encode(PROMPT)
    text = Path(torch.__file__).read_text(encoding="utf-8") * 4  # any long real text will do
    long_ids = torch.tensor([ours32.tokenizer.encode(text)[:PREFILL_TOKENS]])

    rows = []
    rows.append(("lmforge", "fp32", *bench_lmforge(ours32, prompt_ids, long_ids, args.repeats)))
    ours16 = LLM.load(path, dtype="bfloat16", device="cpu")
    rows.append(("lmforge", "bf16", *bench_lmforge(ours16, prompt_ids, long_ids, args.repeats)))
    del ours16
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    rows.append(("transformers", "fp32", *bench_hf(hf, prompt_ids, long_ids, args.repeats)))

    hf_decode = rows[-1][2]
    print(
        f"\nSmolLM2-135M-Instruct, {args.threads} threads, torch {torch.__version__}, medians of {args.repeats}"
    )
    print(
        f"| engine | weights | decode tok/s (batch 1, {NEW_TOKENS} new) | prefill {PREFILL_TOKENS} tok/s | decode vs HF fp32 |"
    )
    print("|---|---|---:|---:|---:|")
    for engine, dtype, decode, prefill in rows:
        print(f"| {engine} | {dtype} | {decode:.1f} | {prefill:.0f} | {decode / hf_decode:.2f}x |")


if __name__ == "__main__":
    main()
