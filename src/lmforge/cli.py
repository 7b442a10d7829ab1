"""``lmforge`` command line: parses arguments, calls the Python API, prints. No logic of its own.

User mistakes (``LmforgeError``) print one line, ``error: what is wrong — how to fix it``, and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.generate import SamplingParams

EXIT_USER_ERROR = 2


def _add_sampling(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens, help="most new tokens to generate")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top-k", type=int)
    group.add_argument("--top-p", type=float)
    group.add_argument("--min-p", type=float)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--seed", type=int)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_model(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    help_text = "model folder, .gguf file or hub id (default: the bundled SmolLM2-135M-Instruct)"
    if positional:
        parser.add_argument("model", nargs="?", default=None, help=help_text)
    else:  # the command's positional arguments are texts
        parser.add_argument("-m", "--model", default=None, help=help_text)
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")


def _sampling(args: argparse.Namespace) -> dict[str, object]:
    """Sampling options from the flags, checked before any model is loaded."""
    options: dict[str, object] = dict(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )
    SamplingParams.from_kwargs(**options)
    return options


def _load(args: argparse.Namespace):
    from lmforge.api import LLM

    return LLM.load(args.model, dtype=args.dtype, device=args.device)


def _print_stream(pieces) -> tuple[int, float]:
    """Print pieces as they come; return (characters, seconds)."""
    start, chars = time.perf_counter(), 0
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        chars += len(piece)
    sys.stdout.write("\n")
    return chars, time.perf_counter() - start


def _collect(stream: Iterator[str], into: list[str]) -> Iterator[str]:
    for piece in stream:
        into.append(piece)
        yield piece


# ---------------------------------------------------------------- commands
def cmd_generate(args: argparse.Namespace) -> None:
    options = _sampling(args)
    llm = _load(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.chat:
        _print_stream(llm.stream([{"role": "user", "content": prompt}], **options))
    else:
        sys.stdout.write(prompt)
        _print_stream(llm.stream(prompt, **options))


def cmd_chat(args: argparse.Namespace) -> None:
    options = _sampling(args)
    llm = _load(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(f"{llm!r}\nType a message; an empty line or Ctrl-D ends the chat.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        pieces: list[str] = []
        _print_stream(_collect(llm.stream(messages, **options), pieces))
        messages.append({"role": "assistant", "content": "".join(pieces)})


def cmd_info(args: argparse.Namespace) -> None:
    from lmforge.info import model_info

    for key, value in model_info(args.model).items():
        print(f"{key:<16} {value}")


def cmd_quickstart(args: argparse.Namespace) -> None:
    from lmforge.quickstart import run_quickstart

    run_quickstart(max_tokens=args.max_tokens)


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from lmforge.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(
        args.files,
        args.vocab_size,
        kind=args.kind,
        text_field=args.text_field,
        split_paragraphs=args.split_paragraphs,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    print(f"saved a {args.kind} tokenizer with {tokenizer.vocab_size} tokens to {out / 'tokenizer.json'}")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from lmforge.data.text import prepare_corpus

    tokenizer = _tokenizer_from(args.tokenizer)
    meta = prepare_corpus(
        args.inputs,
        tokenizer,
        args.out,
        text_field=args.text_field,
        split_paragraphs=args.split_paragraphs,
        val_fraction=args.val_fraction,
        workers=args.workers,
        seed=args.seed,
    )
    tokens = meta["tokens"]
    print(
        f"wrote {args.out}: train {tokens['train']:,} tokens, val {tokens['val']:,} tokens ({meta['dtype']})"
    )


def _tokenizer_from(source: str):
    """A tokenizer from a folder, a tokenizer.json file, or any model lmforge can load."""
    from lmforge.tokenizer import Tokenizer

    path = Path(source)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return Tokenizer.load(path)
    if path.name == "tokenizer.json" and path.is_file():
        return Tokenizer.load(path.parent)
    from lmforge.api import LLM

    return LLM.load(source).tokenizer


def _train_settings(args: argparse.Namespace, from_yaml: dict | None) -> dict:
    """The YAML file's train: section, with every TrainConfig flag the user gave laid over it."""
    from lmforge.train import TrainConfig

    train = dict(from_yaml or {})
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    return train


def cmd_pretrain(args: argparse.Namespace) -> None:
    from lmforge.recipes.pretrain import load_recipe, pretrain

    recipe = load_recipe(args.config) if args.config else {}
    train = _train_settings(args, recipe.get("train"))
    model_config = dict(recipe.get("model_config") or {})
    model_config.update({k: v for k, v in vars(args).items() if k in _MODEL_FIELDS and v is not None})
    data = args.data or recipe.get("data")
    if not data:
        raise LmforgeError(
            "no training data given", hint="pass --data FOLDER (made by `lmforge data prepare`)"
        )
    result = pretrain(
        data,
        model=args.model or recipe.get("model"),
        model_config=model_config,
        init=args.init or recipe.get("init"),
        tokenizer=args.tokenizer or recipe.get("tokenizer"),
        train=train,
        resume=args.resume or bool(recipe.get("resume")),
    )
    if result.model_dir.exists():
        print(
            f"done: {result.steps} steps in {result.seconds / 60:.1f} min, train loss {result.train_loss:.4f}",
            end="",
        )
        print(f", val loss {result.val_loss:.4f}" if result.val_loss is not None else "")
        print(f"model: {result.model_dir}   loss curve: {result.model_dir.parent / 'loss.png'}")


_MODEL_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "dropout")


def _presets() -> list[str]:
    from lmforge.config import Config

    return Config.presets()


def _add_train_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (``--max-steps``, ``--lr``...), so the CLI never lags the Python API."""
    from lmforge.train import TrainConfig

    group = parser.add_argument_group("training (override the YAML file's train: section)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {int: int, float: float}.get(type(default), str)
            if f.name in ("block_size", "save_every"):
                kind = int
            if f.name == "min_lr":
                kind = float
            group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper())


def cmd_finetune(args: argparse.Namespace) -> None:
    from lmforge.recipes.finetune import finetune
    from lmforge.recipes.pretrain import load_yaml

    recipe = load_yaml(args.config) if args.config else {}
    train = _train_settings(args, recipe.pop("train", None))
    train.setdefault("device", args.device)
    lora = {
        k: v
        for k, v in (("rank", args.lora_rank), ("alpha", args.lora_alpha), ("dropout", args.lora_dropout))
        if v is not None
    }
    if args.lora_targets:
        lora["targets"] = args.lora_targets.split(",")
    options = {**recipe, **{k: getattr(args, k) for k in _FINETUNE_OPTIONS if getattr(args, k) is not None}}
    if lora or "lora" in recipe:
        options["lora"] = {**dict(recipe.get("lora") or {}), **lora}
    model = options.pop("model", None) or args.model
    data = options.pop("data", None) or args.data
    if not data:
        raise LmforgeError("no training data given", hint="pass --data FILE.jsonl (or .csv)")
    result = finetune(model, data, train=train, resume=args.resume, **options)
    print(
        f"done: {result.steps} steps in {result.seconds / 60:.1f} min, train loss {result.train_loss:.4f}",
        end="",
    )
    print(f", val loss {result.val_loss:.4f}" if result.val_loss is not None else "")
    print(f"model: {result.model_dir}")


_FINETUNE_OPTIONS = (
    "task",
    "method",
    "val_file",
    "freeze_last",
    "merge",
    "text_field",
    "label_field",
    "summary_field",
    "balance",
    "regression",
    "include_prompt",
    "packing",
    "group_by_length",
    "block_size",
)


def cmd_classify(args: argparse.Namespace) -> None:
    llm = _load(args)
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    labels = args.labels.split(",") if args.labels else None
    for text, result in zip(texts, llm.classify_text(texts, labels=labels), strict=True):
        probs = " ".join(f"{k}={v:.3f}" for k, v in result.get("probabilities", {}).items())
        print(f"{result['label']}\t{probs}\t{text}")


def cmd_summarize(args: argparse.Namespace) -> None:
    llm = _load(args)
    text = Path(args.file).read_text(encoding="utf-8") if args.file else sys.stdin.read()
    print(llm.summarize(text, max_length=args.max_tokens))


def cmd_embed(args: argparse.Namespace) -> None:
    import json as json_module

    llm = _load(args)
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for text, vector in zip(texts, llm.embed(texts), strict=True):
        print(
            json_module.dumps(
                {"text": text, "embedding": [round(float(x), 6) for x in vector]}, ensure_ascii=False
            )
        )


def cmd_eval(args: argparse.Namespace) -> None:
    from lmforge.evaluate import markdown_table
    from lmforge.recipes.evaluate import COLUMNS, evaluate_models

    report = evaluate_models(
        args.models or ["default"],
        args.data,
        task=args.task,
        out_dir=args.out,
        train_file=args.train_file,
        labels=args.labels.split(",") if args.labels else None,
        text_field=args.text_field,
        label_field=args.label_field,
        summary_field=args.summary_field,
        limit=args.limit,
        window=args.window,
        stride=args.stride,
    )
    print(markdown_table(report["rows"], COLUMNS[args.task]))
    print(f"\nreport: {', '.join(report['files'])}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="continue a prompt (streams the text)")
    _add_model(p)
    p.add_argument("-p", "--prompt", help="the prompt (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_sampling(p, max_tokens=100)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with streaming answers")
    _add_model(p)
    p.add_argument("--system", help="system prompt")
    _add_sampling(p, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="architecture, parameters, dtype, context and chat template of a model")
    _add_model(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tokenizer", help="train a tokenizer")
    tok_sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tok_sub.add_parser("train", help="train a byte-level BPE (or character) tokenizer on text files")
    t.add_argument("files", nargs="+", help=".txt / .jsonl files, folders or globs")
    t.add_argument("--vocab-size", type=int, help="number of tokens (required for bpe)")
    t.add_argument("--kind", choices=["bpe", "char"], default="bpe")
    t.add_argument("--text-field", default="text", help="field holding the text in .jsonl files")
    t.add_argument("--split-paragraphs", action="store_true", help="treat blank-line paragraphs as documents")
    t.add_argument("--out", required=True, help="folder to write tokenizer.json into")
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("data", help="prepare training data")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    d = data_sub.add_parser("prepare", help="tokenize a corpus into train/val token shards")
    d.add_argument("inputs", nargs="+", help=".txt / .jsonl files, folders or globs")
    d.add_argument("--tokenizer", required=True, help="tokenizer folder / tokenizer.json / model")
    d.add_argument("--out", required=True, help="output folder for the shards and meta.json")
    d.add_argument("--text-field", default="text")
    d.add_argument("--split-paragraphs", action="store_true")
    d.add_argument("--val-fraction", type=float, default=0.005)
    d.add_argument("--workers", type=int, default=1)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("pretrain", help="pretrain (or continue pretraining) a model on prepared token shards")
    p.add_argument("--config", help="YAML file with model / data / train settings (flags override it)")
    p.add_argument("--data", help="token shard folder from `lmforge data prepare`")
    p.add_argument(
        "--model", help=f"model preset, e.g. baby-gpt, tiny-llama, gpt2 ({len(_presets())} presets)"
    )
    p.add_argument("--init", help="continue pretraining this model (folder, .gguf or hub id)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the one saved with the data)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out-dir from its newest checkpoint"
    )
    model_group = p.add_argument_group("model sizes (override the preset)")
    for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size"):
        model_group.add_argument("--" + name.replace("_", "-"), dest=name, type=int)
    model_group.add_argument("--dropout", type=float)
    _add_train_flags(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "finetune", help="fine-tune a model: classify | instruct | summarize, full | freeze | lora"
    )
    _add_model(p)
    p.add_argument("--config", help="YAML file (keys: model, data, task, method, lora, train, ...)")
    p.add_argument("--data", help="training data (.jsonl or .csv)")
    p.add_argument("--val-file", dest="val_file")
    p.add_argument("--task", choices=["classify", "instruct", "summarize"])
    p.add_argument("--method", choices=["full", "freeze", "lora"])
    p.add_argument("--freeze-last", dest="freeze_last", type=int, help="freeze: train the last N blocks")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-targets", help="comma-separated, e.g. q_proj,v_proj")
    p.add_argument(
        "--merge", action=argparse.BooleanOptionalAction, default=None, help="fold LoRA into weights"
    )
    p.add_argument("--text-field", dest="text_field")
    p.add_argument("--label-field", dest="label_field")
    p.add_argument("--summary-field", dest="summary_field")
    p.add_argument("--balance", choices=["none", "weights", "sample"], help="imbalanced classes")
    p.add_argument("--regression", action="store_true", default=None, help="predict a number (MSE)")
    p.add_argument("--include-prompt", dest="include_prompt", action="store_true", default=None)
    p.add_argument("--packing", action="store_true", default=None)
    p.add_argument(
        "--group-by-length",
        dest="group_by_length",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="batch examples of similar length together (default: on; less padding, same data)",
    )
    p.add_argument("--block-size", dest="block_size", type=int)
    p.add_argument("--resume", action="store_true")
    _add_train_flags(p, skip=("block_size", "device"))
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("classify", help="classify texts (fine-tuned head, or zero-shot with --labels)")
    _add_model(p, positional=False)
    p.add_argument("text", nargs="*", help="texts (default: one per line on stdin)")
    p.add_argument("--labels", help="comma-separated candidate labels for zero-shot classification")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("summarize", help="summarize a text file (or stdin)")
    _add_model(p)
    p.add_argument("--file")
    p.add_argument("--max-tokens", type=int, default=80)
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("embed", help="embed texts: one JSON line per text")
    _add_model(p, positional=False)
    p.add_argument("text", nargs="*")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "eval", help="evaluate models side by side: perplexity | classify | summarize | choice"
    )
    p.add_argument("models", nargs="*", help="models to compare (default: the bundled model)")
    p.add_argument("--task", required=True, choices=["perplexity", "classify", "summarize", "choice"])
    p.add_argument("--data", required=True, help="text file (perplexity) or .jsonl/.csv test set")
    p.add_argument("--train-file", help="classification: training data for the TF-IDF baseline row")
    p.add_argument("--labels", help="classification: candidate labels for zero-shot models")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--summary-field", default="summary")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--window", type=int, help="perplexity: tokens of context per window")
    p.add_argument("--stride", type=int, help="perplexity: tokens between windows")
    p.add_argument("--out", default="reports/eval", help="folder for report.json, report.md and PNGs")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quickstart", help="a tour: load the default model and answer in English and Chinese")
    p.add_argument("--max-tokens", type=int, default=64)
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
