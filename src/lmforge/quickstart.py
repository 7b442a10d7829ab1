"""``lmforge quickstart``: a first tour that shows the toolkit working on this machine, in English and Chinese.

1. Inference: load the bundled SmolLM2-135M-Instruct and stream answers to an English and a Chinese prompt.
2. Pretraining (about a minute on 2 cores; ``pretraining=False``, ``--no-pretrain``, skips it): train a tokenizer
   and a tiny GPT on text every Python install has (the stdlib's ``pydoc_data.topics``, the Python reference
   manual), watch the loss fall, and generate from it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lmforge.api import LLM
from lmforge.data.text import prepare_corpus
from lmforge.recipes.pretrain import pretrain
from lmforge.tokenizer import train_tokenizer

PROMPTS = [
    "What are three tips for writing clear code? Answer briefly.",
    "把这句话翻译成英文：我喜欢读书。",
]


def run_quickstart(
    max_tokens: int = 64,
    out_dir: str | Path = "runs/quickstart",
    train_steps: int = 300,
    *,
    pretraining: bool = True,
    quant: str = "auto",
    compile: bool | None = None,
) -> None:
    """The tour; ``quant`` and ``compile`` are ``LLM.load``'s, for the pretrained model of part 1; ``pretraining``
    False ends it after part 1."""
    print("lmforge quickstart\n\n== 1. Run a real pretrained model ==\n")
    start = time.perf_counter()
    llm = LLM.load(quant=quant, compile=compile)
    print(f"Loaded {llm!r} in {time.perf_counter() - start:.1f} s\n")
    for prompt in PROMPTS:
        print(f">>> {prompt}")
        start = time.perf_counter()
        pieces = []
        for piece in llm.stream([{"role": "user", "content": prompt}], max_new_tokens=max_tokens):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        seconds = time.perf_counter() - start
        tokens = len(llm.tokenizer.encode("".join(pieces), add_special_tokens=False))
        print(f"\n[{tokens} tokens in {seconds:.1f} s: {tokens / seconds:.1f} tokens/s]\n")
    print(
        "(SmolLM2-135M learned mostly English; `lmforge pretrain MODEL` and `lmforge finetune` teach it more.)\n"
    )
    if pretraining:
        pretrain_demo(Path(out_dir), train_steps)
    print("\nNext: `lmforge chat` to talk to SmolLM2, `lmforge pretrain --help` to train on your own text.")


def pretrain_demo(out_dir: Path, steps: int) -> None:
    from pydoc_data.topics import topics

    print("== 2. Pretrain a tiny GPT from scratch on the Python reference manual (pydoc_data.topics) ==\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "python-reference.txt"
    corpus.write_text("\n\n".join(topics.values()), encoding="utf-8")
    tokenizer = train_tokenizer([corpus], 1024, split_paragraphs=True, show_progress=False)
    print(f"trained a byte-level BPE tokenizer: {tokenizer.vocab_size} tokens")
    meta = prepare_corpus([corpus], tokenizer, out_dir / "data", split_paragraphs=True, show_progress=False)
    print(f"prepared {meta['tokens']['train']:,} training and {meta['tokens']['val']:,} validation tokens\n")
    result = pretrain(
        out_dir / "data",
        arch="tiny-gpt2",
        model_config={"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
        train={
            "out_dir": str(out_dir / "run"),
            "max_steps": steps,
            "micro_batch_size": 16,
            "lr": 3e-3,
            "warmup_steps": 20,
            "eval_every": max(1, steps // 5),
            "eval_batches": 8,
            "sample_prompt": "The ",
            "sample_tokens": 40,
            "keep_last": 1,
        },
    )
    first, last = result.losses[0], result.losses[-1]
    print(f"\nloss fell from {first:.2f} to {last:.2f} (val {result.val_loss:.2f}) in {result.seconds:.0f} s")
    print(f"loss curve: {out_dir / 'run' / 'loss.png'}   model folder: {result.model_dir}")
    tiny = LLM.load(result.model_dir, dtype="float32", device="cpu")
    sample = tiny.generate_text("The ", max_length=40, temperature=0.8, top_k=40, seed=0)
    print(f"sample: The {sample}")
