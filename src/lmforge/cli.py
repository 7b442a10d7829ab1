"""``lmforge`` command line: parses arguments, calls the Python API, prints. No logic of its own.

User mistakes (``LmforgeError``) print one line, ``error: what is wrong — how to fix it``, and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence

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


def _add_model(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "model",
        nargs=None if required else "?",
        default=None,
        help="model folder, .gguf file or hub id (default: the bundled SmolLM2-135M-Instruct)",
    )
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
