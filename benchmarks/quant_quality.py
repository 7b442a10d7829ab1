"""Packed GGUF weights vs the fp32 reference: perplexity and greedy chat answers, one run (not a test).

    python benchmarks/quant_quality.py [--threads 2] [--windows 40] [--prompts 10] [--data DIR]

For each SmolLM2-135M-Instruct file of ``benchmarks/_models.py`` (the shipped Q4_1 GGUF and a Q8_0 export of
it) lmforge loads the file twice: the fp32 reference path, ``LLM.load(path, dtype="float32", quant="none")``
(dequantized weights), and the packed path, ``LLM.load(path, quant="auto")`` (int4 codes for Q4_1, int8 for
Q8_0; see ``lmforge.quant``). It prints markdown tables:

1. Perplexity on Tiny Shakespeare (``text/tinyshakespeare.txt`` of the data folder): the file's last 10 %, from
   a speech boundary, cut into non-overlapping 512-token windows; the first ``--windows`` of them, the same
   token ids for both paths, scored by ``lmforge.evaluate.perplexity``. Goal: |Δ| ≤ 1 %. (Packed layers of
   both kinds run PyTorch's int4 kernel on bf16 activations; int8 as two 4-bit planes.)
2. Greedy 48-token answers to fixed everyday questions (English and Chinese, alternating), rendered with the
   model's chat template and stopped at EOS: whether the packed path's token ids equal the fp32 path's; where
   they do not, the first differing position and the fp32 model's top-2 logit gap there (logit[top1] -
   logit[top2] on the shared prefix; a small gap means a near-tie flipped) and the fp32 rank of the token the
   other side picked. Goal: identical ≥ 6/10 for Q4_1, ≥ 8/10 for Q8_0. When ``llama_cpp`` imports, llama.cpp's
   own greedy answers on the same file and prompt ids get the same comparison, as context for how often
   quantized arithmetic flips near-ties.

Smoke run: ``OMP_NUM_THREADS=1 python benchmarks/quant_quality.py --threads 1 --windows 3 --prompts 2``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from _data import add_data_option, data_files
from _models import smollm2_files
from lmforge import LLM
from lmforge.evaluate import perplexity

WINDOW = 512
TAIL_FRACTION = 0.10  # the part of the corpus the pretraining benchmarks hold out for validation
NEW_TOKENS = 48
GOALS = {"Q4_1": 0.6, "Q8_0": 0.8}  # fraction of answers identical to the fp32 path's
PPL_GOAL_PERCENT = 1.0
PROMPTS = [  # English and Chinese alternate, so a short --prompts run sees both
    "What is the capital of France?",
    "中国的首都是哪里？",
    "How can I sleep better at night?",
    "怎样才能睡得更好？",
    "Give me three tips for saving money.",
    "给我三个省钱的小建议。",
    "What should I pack for a weekend at the beach?",
    "周末去海边玩应该带些什么？",
    "How do I make a good cup of tea?",
    "怎么泡一杯好茶？",
]


# ------------------------------------------------------------------------------------------ loading
def load_paths(path: Path) -> tuple[LLM, LLM]:
    """(fp32 reference, packed) models of one GGUF file."""
    reference = LLM.load(path, dtype="float32", quant="none", device="cpu")
    packed = LLM.load(path, quant="auto", device="cpu")
    return reference, packed


# ------------------------------------------------------------------------------------------ perplexity
def shakespeare_tail(corpus: Path) -> str:
    """The corpus's last 10 %, starting at the first speech (after a blank line) past the 90 % mark."""
    text = corpus.read_text(encoding="utf-8")
    return text[text.index("\n\n", int(len(text) * (1 - TAIL_FRACTION))) + 2 :]


def window_text(llm: LLM, tail: str, windows: int) -> str:
    """The text of the tail's first ``windows`` * 512 tokens, checked to encode back to exactly those tokens,
    so ``perplexity(..., window=512, stride=512)`` scores the same whole windows on every path."""
    ids = llm.tokenizer.encode(tail, add_special_tokens=False)
    if len(ids) < windows * WINDOW:
        raise SystemExit(f"error: the tail has {len(ids)} tokens, fewer than {windows} windows of {WINDOW}")
    ids = ids[: windows * WINDOW]
    text = llm.tokenizer.decode(ids)
    if llm.tokenizer.encode(text, add_special_tokens=False) != ids:
        raise SystemExit("error: the windows' text does not encode back to the same tokens")
    return text


def perplexity_row(quant: str, reference: LLM, packed: LLM, text: str, windows: int) -> list[str]:
    ref = perplexity(reference, text, window=WINDOW, stride=WINDOW)
    pk = perplexity(packed, text, window=WINDOW, stride=WINDOW)
    delta = 100 * (pk["perplexity"] / ref["perplexity"] - 1)
    verdict = "yes" if abs(delta) <= PPL_GOAL_PERCENT else "**no**"
    scored = f"{windows} × {WINDOW} ({ref['tokens']:,} scored)"
    return [quant, scored, f"{ref['perplexity']:.3f}", f"{pk['perplexity']:.3f}", f"{delta:+.3f} %", verdict]


# ------------------------------------------------------------------------------------------ greedy answers
def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def lmforge_greedy(llm: LLM, question: str) -> list[int]:
    """Greedy token ids of the chat answer (EOS ends it and is not included)."""
    return llm.complete([messages(question)], max_new_tokens=NEW_TOKENS, temperature=0)[0].token_ids


def llama_cpp_greedy(model, prompt_ids: list[int], eos_ids: set[int]) -> list[int]:  # type: ignore[no-untyped-def]
    """Greedy token ids from llama.cpp for the same prompt ids, stopped at EOS (not included) or 48 tokens."""
    answer: list[int] = []
    for token in model.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        if token in eos_ids:
            break
        answer.append(token)
        if len(answer) == NEW_TOKENS:
            break
    return answer


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two answers differ (one ending earlier counts), or None when equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@dataclass
class Divergence:
    position: int
    gap: float  # the fp32 model's logit[top1] - logit[top2] at that position
    other_rank: int  # 1-based fp32 rank of the token the other side picked there
    ref_token: str
    other_token: str


@torch.inference_mode()
def divergence(reference: LLM, prompt_ids: list[int], ref: list[int], other: list[int]) -> Divergence | None:
    position = first_difference(ref, other)
    if position is None:
        return None
    eos = reference.eos_ids[0]
    chunk = torch.tensor([prompt_ids + ref[:position]])
    logits = reference.model(chunk, last_logits_only=True)[0][0, -1].float()
    top2 = logits.topk(2).values
    other_id = other[position] if position < len(other) else eos
    rank = int((logits > logits[other_id]).sum()) + 1
    ref_id = ref[position] if position < len(ref) else eos
    return Divergence(
        position, float(top2[0] - top2[1]), rank, show(reference, ref_id), show(reference, other_id)
    )


def show(llm: LLM, token_id: int) -> str:
    if token_id in llm.eos_ids:
        return "⟨eos⟩"
    return repr(llm.tokenizer.decode([token_id])).replace("|", "\\|")


def answer_cells(found: Divergence | None) -> list[str]:
    """[identical, first difference, fp32 top-2 gap, fp32 rank of the other pick]."""
    if found is None:
        return ["yes", "", "", ""]
    where = f"{found.position}: {found.ref_token} → {found.other_token}"
    return ["no", where, f"{found.gap:.3f}", str(found.other_rank)]


def answer_rows(reference: LLM, packed: LLM, llama, questions: list[str]) -> tuple[list[list[str]], int, int]:  # type: ignore[no-untyped-def]
    """One row per question, and how many packed / llama.cpp answers equal the fp32 path's."""
    rows, same_packed, same_llama = [], 0, 0
    for number, question in enumerate(questions, 1):
        prompt_ids = reference.prompt_ids(messages(question))
        ref = lmforge_greedy(reference, question)
        ours = divergence(reference, prompt_ids, ref, lmforge_greedy(packed, question))
        same_packed += ours is None
        text = reference.tokenizer.decode(ref).rstrip("\ufffd")  # 48 tokens can end inside a character
        text = text.replace("\n", "⏎").replace("|", "\\|")
        row = [str(number), question, text, *answer_cells(ours)]
        if llama is not None:
            eos = {*reference.eos_ids, llama.token_eos()}
            theirs = divergence(reference, prompt_ids, ref, llama_cpp_greedy(llama, prompt_ids, eos))
            same_llama += theirs is None
            row += answer_cells(theirs)
        rows.append(row)
    return rows, same_packed, same_llama


def open_llama_cpp(path: Path, threads: int):  # type: ignore[no-untyped-def]
    """llama.cpp's model of the file, or None when ``llama_cpp`` does not import."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(model_path=str(path), n_ctx=1024, n_threads=threads, verbose=False)


# ------------------------------------------------------------------------------------------ report
def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def answers_header(with_llama: bool) -> list[str]:
    header = ["#", "question", f"fp32 answer ({NEW_TOKENS} tokens max)"]
    header += ["packed = fp32", "first diff: fp32 → packed", "fp32 top-2 gap", "packed pick's fp32 rank"]
    if with_llama:
        header += [
            "llama.cpp = fp32",
            "first diff: fp32 → llama.cpp",
            "fp32 top-2 gap",
            "llama.cpp pick's rank",
        ]
    return header


def summary(quant: str, same_packed: int, same_llama: int, n: int, with_llama: bool) -> str:
    goal = math.ceil(GOALS[quant] * n)
    met = "met" if same_packed >= goal else "**not met**"
    line = f"{quant}: packed path identical {same_packed}/{n} (goal ≥ {goal}/{n}: {met})"
    return line + (f"; llama.cpp identical {same_llama}/{n}" if with_llama else "; llama.cpp not installed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--windows", type=int, default=40, help="512-token perplexity windows")
    parser.add_argument(
        "--prompts", type=int, default=len(PROMPTS), help="questions to answer (a smoke run: 2)"
    )
    add_data_option(parser)
    args = parser.parse_args()
    (corpus,) = data_files(args.data, "text/tinyshakespeare.txt")
    torch.set_num_threads(args.threads)
    tail = shakespeare_tail(corpus)
    questions = PROMPTS[: args.prompts]

    ppl_rows, answer_sections = [], []
    for quant, path in smollm2_files().items():
        reference, packed = load_paths(path)
        text = window_text(reference, tail, args.windows)
        ppl_rows.append(perplexity_row(quant, reference, packed, text, args.windows))
        llama = open_llama_cpp(path, args.threads)
        rows, same_packed, same_llama = answer_rows(reference, packed, llama, questions)
        section = f"### {quant}: greedy answers, {path.name}\n\n" + table(
            answers_header(llama is not None), rows
        )
        answer_sections.append(
            section + "\n\n" + summary(quant, same_packed, same_llama, len(questions), llama is not None)
        )
        if llama is not None:
            llama.close()
        del reference, packed

    print(f"## SmolLM2-135M-Instruct: packed vs fp32 (threads {args.threads})\n")
    print("### Perplexity, Tiny Shakespeare (last 10 %), non-overlapping 512-token windows\n")
    header = ["GGUF", "windows × tokens", "fp32 ppl", "packed ppl", "Δ", f"\\|Δ\\| ≤ {PPL_GOAL_PERCENT:g} %"]
    print(table(header, ppl_rows))
    for section in answer_sections:
        print("\n" + section)


if __name__ == "__main__":
    main()
