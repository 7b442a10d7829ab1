"""A BART-shaped model pretrained here by denoising, fine-tuned on CSL abstract → title, scored by ROUGE-L.

    python benchmarks/seq2seq_quality.py all          # prepare, pretrain, finetune, evaluate
    python benchmarks/seq2seq_quality.py pretrain     # or one stage at a time (each reads the previous one's)

1. prepare: a character-level tokenizer (with <mask> and <extra_id_0..99>) trained on the CSL training
   abstracts and titles and on Lu Xun (../shared/data/text/luxun.txt); the same texts as token shards.
2. pretrain: ``lmforge pretrain --objective denoise`` (BART's text infilling) of a new BART-shaped model with
   mBART's pre-norm blocks (``tiny-mbart`` sizes overridden: 4 + 4 layers, d = 256, 4 heads), on 96-token windows.
3. finetune: ``lmforge finetune --task summarize --method full`` on the 1,400 training abstract → title pairs
   (5 % held out for validation; abstracts cut to ``--input-tokens``).
4. evaluate: ``lmforge.evaluate_models(task="summarize")`` (character-level ROUGE for Chinese) on the first 100
   test items after the seed-0 shuffle, the same 100 items ``finetune_quality.py summarize --lang zh`` scores
   (its ``subset``), so the figure stands next to SmolLM2-135M's LoRA figure in the README (ROUGE-L 0.390).

Measured (2026-12-01, 2 CPU cores shared with four other jobs, one thread, fp32; minutes are wall-clock):

- prepare: 4,932 characters and specials, 773,963 training tokens.
- pretrain (350 steps of 16 x 96 tokens, lr 1e-3): 14.5 min, val loss 5.261 (a unigram model: about 6.6).
  A first try with BART's post-norm blocks (``tiny-bart``) at the same lr stayed at the unigram loss (6.5-6.6
  from step 40 to step 200, 13 min) and was stopped; the pre-norm blocks learn at that rate.
- finetune, the defaults (lr 1e-3, 160 input tokens, 400 steps): 14.3 min, best val loss 4.850.
  An earlier run (lr 5e-4, 256 input tokens, 250 steps, 17.0 min, best val loss 4.960) scored ROUGE-L 0.065
  greedy.
- evaluate, 100 test items: ROUGE-L 0.045 greedy; 0.109 with 4 beams and no repeated trigram (ROUGE-1 0.120,
  ROUGE-2 0.035). SmolLM2-135M-Instruct LoRA-tuned on 400 abstracts, same items: 0.390 (README).
- the first five titles (4 beams), valid Chinese in the shape of CSL titles, rarely about their abstract: half an
  hour of CPU pretraining does not teach a model to copy from its input::

    一种基于SSSA的一种算法研究进展          (reference: 出口活动、贸易强度与制造业行业生产率——来自我国中部地区的经验数据)
    中国经济发展中的关系研究进展            (reference: 退耕还林工程社会影响比较评价)
    一种基于SSSAR系统的一种算法研究进展     (reference: 无线通信技术在温室测控系统中的应用研究)
    中国经济发展中的思想                    (reference: 关于外资并购我国企业的争论)
    中国经济发展中的历史研究进展            (reference: 关于油气保存单元)
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from _data import add_data_option, data_files
from lmforge import LLM
from lmforge.data.text import prepare_corpus
from lmforge.evaluate import rouge
from lmforge.recipes.evaluate import evaluate_models
from lmforge.recipes.finetune import finetune
from lmforge.recipes.pretrain import pretrain
from lmforge.tokenizer import train_tokenizer

OUT = Path("benchmarks/output/seq2seq_quality")
SPECIALS = ["<|endoftext|>", "<mask>", *(f"<extra_id_{k}>" for k in range(100))]
MODEL = {
    "n_layer": 4,
    "n_decoder_layer": 4,
    "n_embd": 256,
    "n_head": 4,
    "intermediate_size": 1024,
    "block_size": 512,
}


def prepare(args: argparse.Namespace) -> None:
    train_file, luxun = data_files(args.data, "summarize_zh/train.jsonl", "text/luxun.txt")
    rows = [json.loads(line) for line in train_file.read_text(encoding="utf-8").splitlines() if line]
    lines = luxun.read_text(encoding="utf-8").splitlines()
    texts = [r["text"] for r in rows] + [r["summary"] for r in rows] + [p for p in lines if p.strip()]
    tok = train_tokenizer(iter(texts), 8000, kind="char", special_tokens=SPECIALS, show_progress=False)
    meta = prepare_corpus(iter(texts), tok, OUT / "shards", val_fraction=0.02, show_progress=False)
    print(f"vocabulary {tok.vocab_size}, {meta['tokens']['train']:,} training tokens")


def run_pretrain(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    result = pretrain(
        OUT / "shards",
        arch="tiny-mbart",
        model_config=MODEL,
        objective="denoise",
        train={
            "out_dir": str(OUT / "pretrain"),
            "max_steps": args.pretrain_steps,
            "micro_batch_size": 16,
            "block_size": 96,
            "lr": 1e-3,
            "warmup_steps": 50,
            "weight_decay": 0.01,
            "eval_every": 100,
            "eval_batches": 5,
            "progress": False,
        },
    )
    minutes = (time.perf_counter() - start) / 60
    print(f"pretrain: {result.steps} steps, {minutes:.1f} min, val loss {result.val_loss:.3f}")
    (OUT / "pretrain.json").write_text(json.dumps({"minutes": minutes, "val_loss": result.val_loss}))


def test_subset(args: argparse.Namespace) -> Path:
    """finetune_quality.py's ``subset``: the first ``limit`` test lines after a seed-0 shuffle."""
    (test_file,) = data_files(args.data, "summarize_zh/test.jsonl")
    lines = test_file.read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)
    out = OUT / "test.jsonl"
    out.write_text("\n".join(lines[: args.test_limit]) + "\n", encoding="utf-8")
    return out


def run_finetune(args: argparse.Namespace) -> None:
    (train_file,) = data_files(args.data, "summarize_zh/train.jsonl")
    start = time.perf_counter()
    result = finetune(
        OUT / "pretrain" / "model",
        train_file,
        task="summarize",
        method="full",
        block_size=args.input_tokens,
        val_split=0.05,
        train={
            "out_dir": str(OUT / args.run),
            "max_steps": args.finetune_steps,
            "micro_batch_size": 16,
            "lr": args.finetune_lr,
            "warmup_steps": 20,
            "weight_decay": 0.01,
            "eval_every": 50,
            "progress": False,
        },
    )
    minutes = (time.perf_counter() - start) / 60
    print(f"finetune: {result.steps} steps, {minutes:.1f} min, best val loss {result.best_val_loss:.3f}")
    (OUT / f"{args.run}.json").write_text(json.dumps({"minutes": minutes, "best": result.best}))


def run_evaluate(args: argparse.Namespace) -> None:
    test = test_subset(args)
    model = OUT / args.run / "model"
    report = evaluate_models(
        [str(model)], test, task="summarize", out_dir=OUT / f"report-{args.run}", limit=args.test_limit,
        max_length=48,
    )  # fmt: skip
    row = report["rows"][0]
    print("greedy:", {k: row[k] for k in ("rouge1", "rouge2", "rougeL", "examples", "seconds")})
    # Beam search as BART's summaries use it (4 beams, no repeated trigram): the same ROUGE, other decoding.
    llm = LLM.load(model)
    records = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines()]
    titles = llm.summarize([r["text"] for r in records], max_length=48, num_beams=4, no_repeat_ngram_size=3)
    scores = rouge(titles, [r["summary"] for r in records])
    print("4 beams, no_repeat_ngram_size 3:", {k: scores[k] for k in ("rouge1", "rouge2", "rougeL")})
    for record, title in zip(records[:5], titles[:5], strict=True):
        print(f"- {title}\n  (reference: {record['summary']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["all", "prepare", "pretrain", "finetune", "evaluate"])
    parser.add_argument("--pretrain-steps", type=int, default=350)
    parser.add_argument("--finetune-steps", type=int, default=400)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--input-tokens", type=int, default=160, help="abstracts cut to this many tokens")
    parser.add_argument("--run", default="finetune", help="fine-tuning run folder under the output folder")
    parser.add_argument("--test-limit", type=int, default=100)
    add_data_option(parser)
    args = parser.parse_args()
    stages = {
        "prepare": prepare,
        "pretrain": run_pretrain,
        "finetune": run_finetune,
        "evaluate": run_evaluate,
    }
    for name, stage in stages.items():
        if args.stage in ("all", name):
            stage(args)


if __name__ == "__main__":
    main()
