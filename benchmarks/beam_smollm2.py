"""Beam search on the real SmolLM2-135M-Instruct against transformers' beam search: same tokens or not.

    python benchmarks/beam_smollm2.py [--beams 4] [--new-tokens 32]

lmforge loads the bundled GGUF in fp32 (dequantized, eager); transformers loads the same file through its own
GGUF loader (as tests/test_smollm2.py does). Each of the 5 English and 5 Chinese prompts is searched alone on
both sides, then all ten as one left-padded lmforge batch; prints one line per prompt and the totals. Exit 1
when any prompt differs. A correctness check, not a speed one: the seconds are printed only as a note.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from lmforge import LLM
from lmforge.loading import bundled_model_path

ENGLISH = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "To make a good cup of tea, you should",
    "def fibonacci(n):",
    "The three primary colors are",
]
CHINESE = ["中国的首都是", "床前明月光，", "今天天气很好，我们一起去", "人工智能是", "学习编程的第一步是"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beams", type=int, default=4, help="beams per prompt (default: 4)")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens at most (default: 32)")
    args = parser.parse_args()
    path = bundled_model_path()
    llm = LLM.load(path, dtype="float32", device="cpu", compile=False)
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    options = {"num_beams": args.beams, "max_new_tokens": args.new_tokens}
    start = time.perf_counter()
    batched = llm.complete(ENGLISH + CHINESE, **options)
    batch_s = time.perf_counter() - start
    same = 0
    ours_s = theirs_s = 0.0
    for prompt, in_batch in zip(ENGLISH + CHINESE, batched, strict=True):
        start = time.perf_counter()
        alone = llm.complete([prompt], **options)[0]
        ours_s += time.perf_counter() - start
        ids = torch.tensor([llm.tokenizer.encode(prompt)])
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                num_beams=args.beams,
                max_new_tokens=args.new_tokens,
                eos_token_id=llm.eos_ids,
                pad_token_id=llm.tokenizer.pad_id,
            )
        theirs_s += time.perf_counter() - start
        theirs = out[0, ids.shape[1] :].tolist()
        ours = alone.token_ids + ([llm.tokenizer.eos_id] if alone.finish_reason == "stop" else [])
        ours += [llm.tokenizer.pad_id] * (len(theirs) - len(ours))
        match = ours == theirs and in_batch.token_ids == alone.token_ids
        same += match
        print(f"{'same' if match else 'DIFFERENT'}  {prompt!r} -> {alone.text!r}")
    print(
        f"{same}/{len(batched)} prompts identical to transformers ({args.beams} beams, {args.new_tokens} tokens); "
        f"lmforge {ours_s:.1f} s one by one, {batch_s:.1f} s as one batch; transformers {theirs_s:.1f} s"
    )
    return 0 if same == len(batched) else 1


if __name__ == "__main__":
    sys.exit(main())
