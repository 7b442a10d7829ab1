"""``lmforge quickstart``: a first tour that shows the toolkit working on this machine, in English and Chinese."""

from __future__ import annotations

import sys
import time

from lmforge.api import LLM

PROMPTS = [
    "What are three tips for writing clear code? Answer briefly.",
    "用一句话介绍一下长城。",
]


def run_quickstart(max_tokens: int = 64) -> None:
    print("lmforge quickstart\n")
    start = time.perf_counter()
    llm = LLM.load()
    print(f"Loaded {llm!r} in {time.perf_counter() - start:.1f} s\n")
    for prompt in PROMPTS:
        print(f">>> {prompt}")
        start = time.perf_counter()
        pieces = []
        for piece in llm.stream([{"role": "user", "content": prompt}], max_length=max_tokens):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        seconds = time.perf_counter() - start
        tokens = len(llm.tokenizer.encode("".join(pieces), add_special_tokens=False))
        print(f"\n[{tokens} tokens in {seconds:.1f} s: {tokens / seconds:.1f} tokens/s]\n")
    print("Next: `lmforge chat` for an interactive chat, `lmforge info` to inspect a model.")
