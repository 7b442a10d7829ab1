"""``lmforge`` command line: parses arguments, calls the Python API, prints. No logic of its own.

One grammar in every command: the model is the positional ``MODEL`` or ``-m/--model`` (``_add_model``; in
``classify``, ``embed`` and ``summarize``, whose positional arguments are texts, only the flag), a new model's
architecture is ``pretrain --arch``, and where a command writes is ``--out``. Old spellings keep working for one
release, after one deprecation line on stderr (``_deprecated``). Every flag's help says its default.

User mistakes (``LmforgeError``, and a missing or unreadable input file) print one line, ``error: what is wrong —
how to fix it``, naming flags as typed (``--top-p 2.0``, not ``top_p=2.0``), and exit with code 2. Anything else
is a bug: one line saying what failed and where to report it, exit code 1; ``--debug`` shows the traceback.

Why one module of ~1,200 lines: it is a table of commands (a parser builder and a few-line ``cmd_*`` per command),
read one command at a time. Each command imports what it needs inside its function, the one place in lmforge
where that is the rule: ``lmforge --help``, ``--version`` and the store commands (``STORE_COMMANDS``) start without
importing torch, and so do the parser's ``pretrain`` and ``finetune`` flags unless one of them runs (their
settings dataclasses live in modules that import torch).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lmforge.config import BATCH_WEIGHTS, QUANT_CHOICES
from lmforge.errors import LmforgeError
from lmforge.limits import DEFAULT_PREFIX_CACHE_MB, check_prefix_cache_mb

EXIT_BUG = 1
EXIT_USER_ERROR = 2
# Commands that only read or change the model store: they never import torch, so --threads does not apply.
STORE_COMMANDS = frozenset({"list", "show", "rm", "cp", "tag", "verify", "gc"})
# Commands whose flags come from a settings dataclass in a module that imports torch (see build_parser).
RECIPE_COMMANDS = frozenset({"pretrain", "finetune"})
# Other names the Python API gives a flag's value in its errors (SamplingParams, summarize), by the flag's dest.
_API_NAMES = {"max_tokens": ("max_new_tokens", "max_length")}
REPORT_TO = "the lmforge issue tracker"
MAX_TEXT_BYTES = 16 << 20  # a --file or stdin text: far beyond any context, small enough to read at once
_FILE_HELP = (
    f"UTF-8 text file, up to {MAX_TEXT_BYTES >> 20} MiB: {{what}} (default: stdin when no texts are given)"
)


def _add_sampling(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens, help="most new tokens to generate")
    group.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    group.add_argument(
        "--top-k", type=int, help="sample among the K likeliest tokens only (default: none, all tokens)"
    )
    group.add_argument(
        "--top-p",
        type=float,
        help="sample among the likeliest tokens holding P of the probability (default: 1)",
    )
    group.add_argument(
        "--min-p", type=float, help="drop tokens below P times the likeliest one's probability (default: 0)"
    )
    group.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="divide repeated tokens' scores by this"
    )
    group.add_argument("--seed", type=int, help="seed of the sampling (default: random)")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable; default: none)")
    group.add_argument("--quiet", action="store_true", help="do not print tokens/s to stderr")


def _add_beams(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("beam search")
    group.add_argument(
        "--num-beams",
        type=int,
        default=1,
        help="keep the N likeliest continuations and print the best (default: 1, no beam search; with N > 1 "
        "the text comes at the end, not streamed)",
    )
    group.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="beam scores are divided by length ** this: > 0 favours longer texts (default: 1.0)",
    )
    group.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=0,
        help="beams never repeat an n-gram of this many tokens (default: 0, off)",
    )


MODEL_HELP = (
    "model folder, .gguf file, stored NAME[:TAG] or hub id (default: the bundled SmolLM2-135M-Instruct)"
)


def _add_model(
    parser: argparse.ArgumentParser,
    *,
    positional: bool = True,
    flag: bool = True,
    into: str = "model",
    help: str = MODEL_HELP,
) -> None:
    """MODEL, the same argument in every command that loads one: positional (unless the command's positional
    arguments are texts) and ``-m/--model``. They land in ``args.<into>`` (``_merge_model``), where a value the
    command set otherwise (finetune's own positional, ``pretrain --init``) is a third way to name it."""
    if positional:
        parser.add_argument("model_positional", nargs="?", metavar="MODEL", help=help)
    if flag:
        parser.add_argument("-m", "--model", dest="model_flag", metavar="MODEL", help=help)
    parser.set_defaults(model_into=into)


def _merge_model(args: argparse.Namespace) -> None:
    """Put the model named positionally or with -m/--model into ``args.<model_into>``; naming two is an error."""
    into = vars(args).pop("model_into", None)
    named = [vars(args).pop(key, None) for key in ("model_positional", "model_flag")]
    if into is None:
        return
    named = [value for value in (getattr(args, into, None), *named) if value is not None]
    if len(set(named)) > 1:
        raise LmforgeError(
            f"two models given: {' and '.join(map(repr, dict.fromkeys(named)))}",
            hint="name the model once, positionally or with -m/--model",
        )
    setattr(args, into, named[0] if named else None)


def _deprecated(
    parser: argparse.ArgumentParser, old: str, new: str, why: str | None = None, **options: Any
) -> None:
    """``old``, a flag renamed to ``new``, kept for one release: it stores like ``new`` (give its ``dest``,
    type, nargs...) after one line on stderr, and ``--help`` no longer shows it."""
    from lmforge.recipes.settings import renamed_flag

    parser.add_argument(old, help=argparse.SUPPRESS, action=renamed_flag(old, new, why), **options)


def _add_loading(parser: argparse.ArgumentParser, *, compile_default: bool | None = False) -> None:
    """How a model is loaded for inference: --dtype, --device, --quant, --compile."""
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    _add_speed(parser, compile_default=compile_default)


def _add_hosted(parser: argparse.ArgumentParser) -> None:
    """--base-url, --api-key-env, --price: where ``openai:MODEL`` candidates are answered, and what they cost.
    The key is named by its environment variable, never given as a flag (shell history, ``ps`` show flags)."""
    hosted = parser.add_argument_group("hosted models (openai:MODEL)")
    hosted.add_argument(
        "--base-url",
        help="the OpenAI-compatible API of the openai:MODEL models, e.g. http://127.0.0.1:8000/v1 "
        "(default: $OPENAI_BASE_URL, else OpenAI's)",
    )
    hosted.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding their API key (default: OPENAI_API_KEY when set)",
    )
    hosted.add_argument(
        "--price",
        action="append",
        metavar="MODEL=IN,OUT",
        help="USD per 1k prompt and completion tokens of a hosted model, for the cost column "
        "(repeatable; e.g. openai:gpt-4o-mini=0.15,0.60; default: no cost shown)",
    )


def _hosted_settings(args: argparse.Namespace) -> dict[str, Any]:
    from lmforge.hosted import Endpoint, parse_prices

    return {
        "endpoint": Endpoint(base_url=args.base_url, api_key_env=args.api_key_env),
        "prices": parse_prices(args.price or []),
    }


def _add_speed(
    parser: argparse.ArgumentParser, *, compile_default: bool | None = False, old_file_types: bool = False
) -> None:
    """--quant and --compile/--no-compile: how a model is loaded for inference (``LLM.load``'s quant, compile).

    ``compile_default``: False (eager) for commands that answer once and exit: on SmolLM2 Q4_1, 2 cores,
    ``generate --max-tokens 128`` took 6.9 s and 452 MiB eager against 22.9 s and 683 MiB compiled with a warm
    cache (importing the compiler and loading its code cost more than 128 faster tokens save; it breaks even
    after about 1,200 tokens). None (``LLM.load``'s default: compile unless $LMFORGE_COMPILE=0) for those that
    run long: serve, eval, select. ``old_file_types``: --quant also takes a GGUF type name (estimate's old
    meaning, deprecated; the API checks it and says what it means)."""
    checked: dict[str, Any] = {"choices": QUANT_CHOICES}
    if old_file_types:
        checked = {"type": str.lower, "metavar": "{" + ",".join(QUANT_CHOICES) + "}"}
    parser.add_argument(
        "--quant",
        default="auto",
        **checked,
        help="packed weights: auto keeps a GGUF's Q4/Q8 layers packed on the CPU (default), none loads floats, "
        "int8/int4 pack any model's linear layers (CPU)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="decode with the torch.compile'd step: faster tokens after a wait for the compiler (default: "
        + ("on unless $LMFORGE_COMPILE=0" if compile_default is None else "off, eager")
        + ")",
    )
    # The default set here, not in the action: argparse would append a second "(default: False)" to the help.
    parser.set_defaults(compile=compile_default)


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
    from lmforge.beam import check_beam_sampling, split_beam_options
    from lmforge.generate import SamplingParams

    if getattr(args, "num_beams", 1) != 1:
        options.update(
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
        )
    sampling, beams = split_beam_options(options)
    check_beam_sampling(SamplingParams.from_kwargs(**sampling), beams)
    return options


def _load(args: argparse.Namespace):
    from lmforge.api import LLM

    return LLM.load(args.model, dtype=args.dtype, device=args.device, quant=args.quant, compile=args.compile)


def _print_stream(llm, pieces: Iterator[str], *, quiet: bool) -> str:
    """Print pieces as they come and return the answer; then its tokens/s on stderr, unless ``quiet``. An
    empty answer is said on stderr: an empty line alone looks like a hang or a bug."""
    start, answer = time.perf_counter(), []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        answer.append(piece)
    seconds = time.perf_counter() - start  # from the request, so the prompt's prefill counts
    sys.stdout.write("\n")
    text = "".join(answer)
    if not text:
        _note_empty_answer()
    elif not quiet:
        sys.stdout.flush()  # the answer before the figure, where both go to one terminal
        tokens = len(llm.tokenizer.encode(text, add_special_tokens=False))
        rate = tokens / max(seconds, 1e-9)
        print(f"[{tokens} tokens in {seconds:.1f} s: {rate:.1f} tokens/s]", file=sys.stderr)
    return text


def _note_empty_answer() -> None:
    sys.stdout.flush()
    print(
        "note: the model's answer is empty (it ended at once: end of text or a stop string); "
        "try another prompt, --temperature 0.7 or another model",
        file=sys.stderr,
    )


def _read_text(file: str | None, what: str) -> str:
    """``file``'s text (stdin when None), at most MAX_TEXT_BYTES; a missing, unreadable or empty input is a
    one-line error."""
    source = file if file is not None else "stdin"
    try:
        if file is None:
            data = sys.stdin.buffer.read(MAX_TEXT_BYTES + 1)
        else:
            with open(file, "rb") as f:
                data = f.read(MAX_TEXT_BYTES + 1)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise LmforgeError(f"{source}: no such file", hint="check the path given to --file") from None
    except IsADirectoryError:
        raise LmforgeError(f"{source}: is a folder, not a file", hint="give a text file to --file") from None
    except OSError as e:
        raise LmforgeError(f"{source}: cannot read it ({e.strerror})", hint="check the file") from None
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{source}: not UTF-8 text (byte {e.start})", hint="save it as UTF-8") from None
    if len(data) > MAX_TEXT_BYTES:
        raise LmforgeError(
            f"{source}: more than {MAX_TEXT_BYTES >> 20} MiB of text", hint="split it into smaller files"
        )
    if not text.strip():
        raise LmforgeError(f"{source}: no text to {what}", hint="give a file or stdin with some text")
    return text


def _texts(args: argparse.Namespace, what: str, *, whole: bool = False) -> list[str]:
    """The command's texts: its arguments, or those of --file, else of stdin: the whole text when ``whole``
    (summarize), else one per non-blank line. None, or a blank one, is an error; so are texts and --file."""
    if args.text and args.file is not None:
        raise LmforgeError(
            f"texts given both as arguments and with --file {args.file}", hint="give the texts one way"
        )
    if args.text:
        texts = args.text
    else:
        text = _read_text(args.file, what)
        texts = [text] if whole else [line for line in text.splitlines() if line.strip()]
    if any(not text.strip() for text in texts):
        raise LmforgeError(f"an empty text to {what}", hint="give every text some characters")
    return texts


# ---------------------------------------------------------------- commands
def cmd_generate(args: argparse.Namespace) -> None:
    options = _sampling(args)
    prompt = args.prompt if args.prompt is not None else _read_text(None, "continue")
    if not prompt.strip():
        raise LmforgeError("empty prompt", hint="give some text with -p/--prompt or on stdin")
    if args.out and not args.logit_lens:
        raise LmforgeError("--out is where --logit-lens draws its PNG", hint="add --logit-lens or drop --out")
    llm = _load(args)
    if args.explain or args.logit_lens:
        _explain_generation(llm, args, prompt, options)
        return
    if args.chat:
        _print_stream(llm, llm.stream([{"role": "user", "content": prompt}], **options), quiet=args.quiet)
    else:
        echo = not llm.config.is_seq2seq  # a decoder continues the prompt; an encoder–decoder answers it
        if echo:
            sys.stdout.write(prompt)
        try:
            _print_stream(llm, llm.stream(prompt, **options), quiet=args.quiet)
        except LmforgeError:
            if echo:  # e.g. beams over the memory estimate: the error starts its own line, not the prompt's
                sys.stdout.write("\n")
            raise


def _explain_generation(llm, args: argparse.Namespace, prompt: str, options: dict[str, object]) -> None:
    from lmforge.explain import render

    if args.logit_lens:
        lens = llm.logit_lens(prompt)
        print(render.lens_table(lens))
        if args.out:
            print(f"logit lens: {render.lens_png(lens, args.out)}", file=sys.stderr)
    if args.explain:
        messages = [{"role": "user", "content": prompt}] if args.chat else prompt
        explanation = llm.explain_generation(messages, **options)
        print(render.tokens_terminal(explanation, colour=render.use_colour(sys.stdout)))


def cmd_chat(args: argparse.Namespace) -> None:
    options = _sampling(args)
    llm = _load(args)
    llm.check_chat()  # a model that cannot chat says so before the banner and the first prompt
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
        answer = _print_stream(llm, llm.stream(messages, **options), quiet=args.quiet)
        messages.append({"role": "assistant", "content": answer})


def cmd_info(args: argparse.Namespace) -> None:
    from lmforge.info import model_info
    from lmforge.quant import packing_summary

    for key, value in model_info(args.model).items():
        print(f"{key:<16} {value}")
    sys.stdout.flush()  # the headers first: the packing line loads the weights
    print(f"{'packing':<16} {packing_summary(_load(args).model)}")


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    import uvicorn

    from lmforge.serve import create_app, uvicorn_config
    from lmforge.serve.guard import LOCAL_HOSTS

    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY")
    if args.host not in LOCAL_HOSTS and not api_key and not args.insecure_no_key:
        raise LmforgeError(
            f"refusing to serve on {args.host} without an API key: anyone who can reach it could use it",
            hint="pass --api-key KEY (or set LMFORGE_API_KEY), or --insecure-no-key if that is what you want",
        )
    if args.prefix_cache_mb is not None:
        check_prefix_cache_mb(args.prefix_cache_mb)  # before the model loads (it is set once it has)
    if args.ray and args.prefix_cache_mb is not None:
        raise LmforgeError(
            "--prefix-cache-mb applies to a single server",
            hint="leave it out with --ray (replicas use the default)",
        )
    if args.ray:
        _serve_on_ray(args, api_key)
        return
    ray_only = {"--replicas": args.replicas != 1, "--replica-threads": args.replica_threads != 1}
    ray_only["--replica-gpus"] = args.replica_gpus != 0
    ray_only["--ray-address"] = args.ray_address is not None
    if any(ray_only.values()):
        flag = next(name for name, given in ray_only.items() if given)
        raise LmforgeError(f"{flag} applies to Ray Serve only", hint=f"add --ray, or leave {flag} out")
    _check_bindable(args.host, args.port)  # before the model loads (seconds) and before any URL is printed
    llm = _load(args)
    if args.prefix_cache_mb is not None:
        llm.set_prefix_cache(args.prefix_cache_mb)
    app = create_app(
        llm,
        api_key=api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_context=args.max_context,
        cors_origins=args.cors,
        # The bound name is one clients use; without a key, only it and the loopback names are answered.
        allowed_hosts=[args.host, *args.allowed_host] if args.allowed_host or not api_key else None,
        warm_up=True,  # a server runs for long: compile every batch size's step before the first request
        access_log=_log_line if args.access_log else None,
        batch_weights=args.batch_weights,
    )
    url = f"http://{args.host}:{args.port}"
    print(f"serving {llm!r} (threads: {args.threads})\n  playground: {url}/   API: {url}/v1")
    uvicorn.Server(uvicorn_config(app, args.host, args.port, log_level="warning")).run()


def _serve_on_ray(args: argparse.Namespace, api_key: str | None) -> None:
    """``serve --ray``: the same server as N Ray Serve replicas (``lmforge.serve.ray``); only here is ray imported."""
    try:
        from lmforge.serve import ray as on_ray
    except ImportError as e:
        raise LmforgeError(
            f"--ray needs Ray Serve, which is not installed ({e.msg})", hint="pip install 'lmforge[ray]'"
        ) from None

    on_ray.check_replicas(args.replicas, args.replica_threads, args.replica_gpus)
    if args.ray_address is None:  # a local cluster: its proxy binds here
        _check_bindable(args.host, args.port)
    spec = on_ray.ReplicaSpec(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        quant=args.quant,
        compile=args.compile,
        threads=args.replica_threads,
        gpus=args.replica_gpus,
        api_key=api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_context=args.max_context,
        cors_origins=tuple(args.cors or ()),
        allowed_hosts=(args.host, *args.allowed_host) if args.allowed_host or not api_key else None,
        batch_weights=args.batch_weights,
    )

    def ready(url: str) -> None:
        print(
            f"serving {args.model or 'the bundled model'} on Ray: {args.replicas} replica(s), "
            f"{args.replica_threads} thread(s) each\n  playground: {url}/   API: {url}/v1   (Ctrl-C stops)"
        )

    on_ray.serve_until_interrupted(
        spec, replicas=args.replicas, host=args.host, port=args.port, address=args.ray_address, on_ready=ready
    )


def _log_line(line: str) -> None:
    print(line, flush=True)


def _check_bindable(host: str, port: int) -> None:
    """Bind ``host:port`` once and let it go: a busy port or a host that is not this machine's is then a one-line
    error instead of uvicorn's log lines after the URL was printed. The address family and SO_REUSEADDR as
    uvicorn picks them (IPv6 only for a host with a ':'), so what passes here binds there too."""
    if not 1 <= port <= 65535:
        raise LmforgeError(f"--port {port} is not a port", hint="use a number from 1 to 65535, e.g. 8000")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        reason = e.strerror or str(e)
        if getattr(e, "errno", None) == errno.EADDRINUSE:
            raise LmforgeError(
                f"cannot serve on {host}:{port}: the port is in use",
                hint="stop the program using it, or pick another with --port",
            ) from None
        raise LmforgeError(
            f"cannot serve on --host {host}: {reason}",
            hint="use an address of this machine: 127.0.0.1 (default), ::1, or 0.0.0.0 for every interface",
        ) from None


def cmd_estimate(args: argparse.Namespace) -> None:
    from lmforge.sizing import estimate

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        result = estimate(
            args.model,
            context=args.context,
            batch=args.batch,
            mode=args.mode,
            dtype=args.dtype,
            quant=args.quant,
            compile=args.compile,
            measure=args.measure,
            task=args.task,
            lora_rank=args.lora_rank,
            train_last_blocks=args.train_last_blocks,
            activation_checkpointing=args.activation_checkpointing,
        )
    for warning in caught:  # --quant q8_0, the old meaning: one line, then the estimate
        print(f"warning: {warning.message}", file=sys.stderr)
    print(result.table())


def cmd_select(args: argparse.Namespace) -> None:
    from lmforge.sizing import select

    result = select(
        args.task,
        args.data,
        candidates=args.candidates,
        max_ram=args.max_ram,
        max_latency_ms=args.max_latency_ms,
        sample=args.sample,
        shots=args.shots,
        text_field=args.text_field,
        label_field=args.label_field,
        summary_field=args.summary_field,
        quant=args.quant,
        compile=args.compile,
        **_hosted_settings(args),
    )
    print(result.table())


def cmd_quickstart(args: argparse.Namespace) -> None:
    from lmforge.quickstart import run_quickstart

    run_quickstart(
        max_tokens=args.max_tokens, pretraining=args.pretrain, quant=args.quant, compile=args.compile
    )


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


def _settings(args: argparse.Namespace, cls: type) -> tuple[Any, frozenset[str]]:
    """The command's settings dataclass (its --config YAML file with the flags the user gave laid over it),
    and the names of the settings the user gave, which ``--resume`` compares with the run's."""
    from lmforge.recipes.settings import given_settings, load_yaml, settings_from
    from lmforge.train.schedule import warmup_note

    values = load_yaml(args.config) if args.config else {}
    settings = settings_from(args, values, cls, source=args.config or "settings", warn=_warn)
    note = None if settings.resume else warmup_note(settings.train.warmup_steps, settings.train.max_steps)
    if note:  # a resumed run's settings are the recorded ones, checked when it started
        _warn(_as_typed(note, build_parser(), args.command))
    return settings, given_settings(args, values, cls)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _print_done(result) -> None:
    print(
        f"done: {result.steps} steps in {result.seconds / 60:.1f} min, train loss {result.train_loss:.4f}",
        end="",
    )
    print(f", val loss {result.val_loss:.4f}" if result.val_loss is not None else "")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from lmforge.recipes.pretrain import PretrainSettings, run_pretrain

    settings, given = _settings(args, PretrainSettings)
    result = run_pretrain(settings, given=given)
    if result.model_dir.exists():  # on rank 0 of a distributed run only
        _print_done(result)
        print(f"model: {result.model_dir}   loss curve: {result.model_dir.parent / 'loss.png'}")
        _print_stored(settings.save_as)


def cmd_finetune(args: argparse.Namespace) -> None:
    from lmforge.recipes.finetune import FinetuneSettings, run_finetune

    settings, given = _settings(args, FinetuneSettings)
    result = run_finetune(settings, given=given)
    _print_done(result)
    if result.best is not None:  # fine-tuning with validation data keeps its best evaluation
        figures = ", ".join(f"{k} {v:.4f}" for k, v in result.best.items() if k != "step")
        early = f"; stopped early at step {result.steps}" if result.stopped_early else ""
        record = result.model_dir.parent / "validation.json"
        print(f"kept the evaluation at step {result.best['step']} ({figures}){early}   record: {record}")
    print(f"model: {result.model_dir}")
    _print_stored(settings.save_as)


def _print_stored(save_as: str | None) -> None:
    if save_as:
        print(f"stored as {save_as} (`lmforge show {save_as}`)")


def cmd_classify(args: argparse.Namespace) -> None:
    texts = _texts(args, "classify")
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    if args.out and not args.explain:
        raise LmforgeError(
            "--out is where --explain writes its shaded texts", hint="add --explain or drop --out"
        )
    if args.out and not args.out.endswith((".html", ".png")):
        raise LmforgeError(
            f"--out {args.out}: not an .html or .png file", hint="name a file ending .html or .png"
        )
    llm = _load(args)
    results = llm.classify_text(texts, labels=labels, zero_shot=args.zero_shot)
    if args.explain:
        from lmforge.explain import render
    explained = []
    for text, result in zip(texts, results, strict=True):
        probs = " ".join(f"{k}={v:.3f}" for k, v in result.get("probabilities", {}).items())
        print(f"{result['label']}\t{probs}\t{text}")
        if args.explain:
            attribution = llm.explain_classification(
                text, labels, method=args.explain_method, label=result["label"], zero_shot=args.zero_shot
            )
            explained.append(attribution)
            print(render.attribution_terminal(attribution, colour=render.use_colour(sys.stdout)))
    if args.out:
        if args.out.endswith(".png"):
            render.attribution_png(explained, args.out)
        else:
            Path(args.out).write_text(render.attribution_html(explained), encoding="utf-8")
        print(f"explanations: {args.out}", file=sys.stderr)


def cmd_summarize(args: argparse.Namespace) -> None:
    _old_summarize_model(args)
    texts = _texts(args, "summarize", whole=True)
    llm = _load(args)
    for i, text in enumerate(texts):
        summary = llm.summarize(text, max_length=args.max_tokens)
        print(("\n" if i else "") + summary)  # a blank line between the summaries of several texts
        if not summary:
            _note_empty_answer()


def _old_summarize_model(args: argparse.Namespace) -> None:
    """``summarize MODEL --file F`` and ``summarize PATH < F``, the spellings before texts were positional:
    a lone argument beside --file, or naming a model that exists here, is still the model for one release."""
    if args.model is not None or len(args.text) != 1:
        return
    (first,) = args.text
    if args.file is not None or first == "default" or Path(first).exists():
        print(
            f"warning: summarize MODEL is deprecated, use summarize -m {first} (its arguments are texts now)",
            file=sys.stderr,
        )
        args.model, args.text = first, []


def cmd_embed(args: argparse.Namespace) -> None:
    import json as json_module

    texts = _texts(args, "embed")
    llm = _load(args)
    for text, vector in zip(texts, llm.embed(texts), strict=True):
        print(
            json_module.dumps(
                {"text": text, "embedding": [round(float(x), 6) for x in vector]}, ensure_ascii=False
            )
        )


def cmd_eval(args: argparse.Namespace) -> None:
    from lmforge.evaluate import comparison_lines, markdown_table
    from lmforge.recipes.evaluate import evaluate_models

    report = evaluate_models(
        [*args.models, *(args.model_flags or [])] or ["default"],
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
        quant=args.quant,
        compile=args.compile,
        **_hosted_settings(args),
        explain=args.explain,
    )
    print(markdown_table(report["rows"], report["columns"]))
    print("\n[low, high]: 95 % bootstrap interval")
    if report["comparisons"]:
        print("paired tests on the same examples (p < 0.05 is significant):")
        print("\n".join(f"  {line}" for line in comparison_lines(report["comparisons"])))
    print(f"\nreport: {', '.join(report['files'])}")


# ------------------------------------------------------------- model store
def _print_table(rows: list[dict[str, str]], columns: Sequence[str]) -> None:
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in columns}
    for row in [{c: c.upper() for c in columns}, *rows]:
        print("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())


def cmd_list(args: argparse.Namespace) -> None:
    from lmforge.store import Store, describe_parent, human_bytes

    def clip(text: str, width: int = 48) -> str:  # long parent paths keep their informative end
        return text if len(text) <= width else "…" + text[-width + 1 :]

    store = Store()
    rows = [
        {
            "name": f"{m['name']}:{m['tag']}",
            "size": human_bytes(m["size"]),
            "params": f"{m['config']['parameters'] / 1e6:.1f}M",
            "parent": clip(describe_parent(m["parent"])) if m.get("parent") else "-",
            "created": m["created"][:16].replace("T", " "),
        }
        for m in store.list_models()
    ]
    if not rows:
        print(f"no models in {store.root} yet: add one with `lmforge import` or `--save-as NAME:TAG`")
        return
    _print_table(rows, ["name", "size", "params", "parent", "created"])


def cmd_show(args: argparse.Namespace) -> None:
    import json as json_module

    from lmforge.store import Store, describe_parent, human_bytes

    info = Store().show(args.name)
    if args.json:
        print(json_module.dumps(info, indent=2, ensure_ascii=False))
        return
    config = info["config"]
    size = human_bytes(info["size"])
    print(f"{info['name']}:{info['tag']}  id {info['id'][7:19]}  {size}  created {info['created']}")
    if info.get("description"):
        print(info["description"])
    model = f"{config['model_type']}, {config['parameters']:,} parameters, context {config['context']}"
    print(f"model: {model}" + (f", labels {config['labels']}" if config.get("labels") else ""))
    print("files:")
    for name, entry in info["files"].items():
        print(f"  {name:<32} {human_bytes(entry['size']):>10}  {entry['digest'][:19]}")
    print("lineage:" + ("" if info["lineage"] else " (none recorded)"))
    for link in info["lineage"]:
        print(f"  <- {describe_parent(link)}")
    for key in ("recipe", "data", "metrics"):
        if info.get(key):
            print(f"{key}: {json_module.dumps(info[key], indent=2, ensure_ascii=False)}")


def cmd_rm(args: argparse.Namespace) -> None:
    from lmforge.store import Store

    store = Store()
    for name in args.names:
        print(f"removed {store.rm(name)}")
    print("their files stay until `lmforge gc` (other models may share them)")


def cmd_cp(args: argparse.Namespace) -> None:
    from lmforge.store import Store

    manifest = Store().cp(args.src, args.dst)
    print(f"{args.src} -> {manifest['name']}:{manifest['tag']} (same files, nothing copied)")


def cmd_tag(args: argparse.Namespace) -> None:
    from lmforge.store import Store

    manifest = Store().tag(args.src, args.tag)
    print(f"{args.src} -> {manifest['name']}:{manifest['tag']}")


def cmd_import(args: argparse.Namespace) -> None:
    from lmforge.loading import import_model
    from lmforge.store import human_bytes

    m = import_model(args.source, args.name, description=args.description)
    print(f"stored {m['name']}:{m['tag']}: {len(m['files'])} files, {human_bytes(m['size'])}")


def cmd_verify(args: argparse.Namespace) -> None:
    from lmforge.store import Store, human_bytes

    store = Store()
    report = store.verify()
    print(
        f"{store.root}: {report.entries} models, {report.blobs} blobs ({human_bytes(report.bytes)}) checked; "
        f"{report.unreferenced} unused blobs and {report.temp} temp leftovers (`lmforge gc` removes them)"
    )
    for label, problems in (("missing", report.missing), ("corrupt", report.corrupt)):
        for digest, refs in problems.items():
            print(f"{label}: {digest[:19]}… used by {', '.join(refs) or 'no model'}")
    for ref in report.damaged:
        print(f"damaged manifest: {ref}")
    for link, problem in report.bad_links.items():
        print(f"bad snapshot link: {link} {problem}")
    if not report.ok:
        problems = len(report.missing) + len(report.corrupt) + len(report.damaged) + len(report.bad_links)
        raise LmforgeError(
            f"the model store has {problems} problem(s)",
            hint="re-import the models named above (`lmforge import SOURCE --name NAME:TAG`) or rm them; "
            "loading a model rebuilds its snapshot links",
        )
    print("ok")


def cmd_gc(args: argparse.Namespace) -> None:
    from lmforge.store import Store, human_bytes

    r = Store().gc()
    print(
        f"removed {r.blobs} unused blobs, {r.snapshots} snapshots and {r.temp} temp leftovers: "
        f"{human_bytes(r.bytes_freed)} freed"
    )


def cmd_export(args: argparse.Namespace) -> None:
    from lmforge.export import export_model

    if args.out is None:
        raise LmforgeError("no output given", hint="pass --out FOLDER (hf, adapter) or --out FILE.gguf")
    path = export_model(
        args.model, args.out, format=args.format, dtype=args.dtype, quant=args.quant, merge_lora=args.merge
    )
    print(f"wrote {path}")


def _version() -> str:
    """The installed distribution's version; the package's own when run from a source tree not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmforge")
    except PackageNotFoundError:
        from lmforge import __version__

        return __version__


class _HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default: "(default: X)" is added where the help does not say it in its
    own words; a switch (off unless given) needs none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.nargs == 0:
            return text
        if action.default is None or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def _parsers_under(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every (sub)command's parser."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                yield from _parsers_under(subparser)


class _VersionAction(argparse.Action):
    """``--version``: looks the version up only when asked (importlib.metadata is not free at start-up)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"lmforge {_version()}")
        parser.exit()


def build_parser(recipes: bool = True) -> argparse.ArgumentParser:
    """The whole command line. ``recipes=False`` leaves out the ``pretrain`` and ``finetune`` flags, whose
    settings dataclasses live in modules that import torch: ``main`` builds them only when one of those runs."""
    from lmforge.recipes.settings import renamed_flag

    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_VersionAction, help="print lmforge's version and exit")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback when a command fails with an unexpected error",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="intra-op threads for every command that runs a model "
        "(default: $LMFORGE_THREADS, else one per physical core)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="continue a prompt (streams the text)")
    _add_model(p)
    _add_loading(p)
    p.add_argument("-p", "--prompt", help="the prompt (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument(
        "--explain",
        action="store_true",
        help="show every generated token's probability, rank, entropy and alternatives (coloured in a terminal)",
    )
    p.add_argument(
        "--logit-lens",
        action="store_true",
        help="show the top token the prompt's residual stream predicts after every block",
    )
    p.add_argument("--out", help="with --logit-lens: also draw it into this PNG file (default: none)")
    _add_sampling(p, max_tokens=100)
    _add_beams(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with streaming answers")
    _add_model(p)
    _add_loading(p)
    p.add_argument("--system", help="system prompt (default: none, the chat template's own)")
    _add_sampling(p, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "info",
        help="architecture, parameters, dtype, context, chat template and packing (loads it) of a model",
    )
    _add_model(p)
    _add_loading(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tokenizer", help="train a tokenizer")
    tok_sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tok_sub.add_parser("train", help="train a byte-level BPE (or character) tokenizer on text files")
    t.add_argument("files", nargs="+", help=".txt / .jsonl files, folders or globs")
    t.add_argument("--vocab-size", type=int, help="number of tokens (required for bpe; default: none)")
    t.add_argument(
        "--kind", choices=["bpe", "char"], default="bpe", help="byte-level BPE, or one per character"
    )
    t.add_argument("--text-field", default="text", help="field holding the text in .jsonl files")
    t.add_argument("--split-paragraphs", action="store_true", help="treat blank-line paragraphs as documents")
    t.add_argument("--out", required=True, help="folder to write tokenizer.json into (required)")
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("data", help="prepare training data")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    d = data_sub.add_parser("prepare", help="tokenize a corpus into train/val token shards")
    d.add_argument("inputs", nargs="+", help=".txt / .jsonl files, folders or globs")
    d.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer folder / tokenizer.json / model ('default': its own; required)",
    )
    d.add_argument("--out", required=True, help="output folder for the shards and meta.json (required)")
    d.add_argument("--text-field", default="text", help="field holding the text in .jsonl files")
    d.add_argument("--split-paragraphs", action="store_true", help="treat blank-line paragraphs as documents")
    d.add_argument(
        "--val-fraction", type=float, default=0.005, help="share of documents held out for validation"
    )
    d.add_argument("--workers", type=int, default=1, help="processes tokenizing in parallel (same shards)")
    d.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    d.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser(
        "pretrain",
        help="pretrain (or continue pretraining) a model on prepared token shards",
        add_help=recipes,  # without its flags, its --help waits for the full parser
    )
    if recipes:
        from lmforge.recipes.pretrain import PretrainSettings
        from lmforge.recipes.settings import add_flags

        p.add_argument(
            "--config",
            help="YAML file: the settings below as keys (data: shards), model sizes under model_config:, "
            "training settings under train:; flags override it (default: none)",
        )
        _add_model(
            p,
            flag=False,  # --model is still the old name of --arch, for one release
            into="init",
            help="continue pretraining this model (folder, .gguf, stored NAME[:TAG] or hub id), like --init "
            "(default: a new model, see --arch)",
        )
        add_flags(p, PretrainSettings)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "finetune",
        help="fine-tune a model: classify | instruct | summarize, full | freeze | lora",
        add_help=recipes,
    )
    if recipes:
        from lmforge.recipes.finetune import FinetuneSettings
        from lmforge.recipes.settings import add_flags

        p.add_argument(
            "--config",
            help="YAML file: the settings below as keys (task: classify), LoRA ones under lora: (rank: 16), "
            "training ones under train:; flags override it (default: none)",
        )
        add_flags(p, FinetuneSettings)
        _add_model(p, positional=False)  # its positional MODEL is the settings' own
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("classify", help="classify texts (the fine-tuned head, or zero-shot with --labels)")
    _add_model(p, positional=False)
    _add_loading(p)
    p.add_argument("text", nargs="*", help="texts (default: --file's, else stdin's, one per line)")
    p.add_argument("--file", help=_FILE_HELP.format(what="one text per line"))
    p.add_argument(
        "--labels",
        help="comma-separated candidate labels: zero-shot on a model without a classification head; "
        "with a head they must be the head's labels (default: the head's)",
    )
    p.add_argument(
        "--zero-shot",
        action="store_true",
        help="score --labels by likelihood even when the model has a fine-tuned head",
    )
    p.add_argument(
        "--explain", action="store_true", help="shade every text's tokens by how much they pushed its label"
    )
    p.add_argument(
        "--explain-method",
        default="integrated_gradients",
        choices=["integrated_gradients", "gradient_x_input", "occlusion", "attention_rollout"],
        help="how --explain attributes (default: integrated_gradients, its completeness error shown)",
    )
    p.add_argument(
        "--out", help="with --explain: write the shaded texts to this .html or .png file (default: none)"
    )
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("summarize", help="summarize texts, a text file or stdin")
    _add_model(p, positional=False)
    _add_loading(p)
    p.add_argument("text", nargs="*", help="texts, each summarized (default: --file's text, else stdin's)")
    p.add_argument("--file", help=_FILE_HELP.format(what="one text"))
    p.add_argument("--max-tokens", type=int, default=80, help="most tokens in a summary")
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("embed", help="embed texts: one JSON line per text")
    _add_model(p, positional=False)
    _add_loading(p)
    p.add_argument("text", nargs="*", help="texts (default: --file's, else stdin's, one per line)")
    p.add_argument("--file", help=_FILE_HELP.format(what="one text per line"))
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "eval", help="evaluate models side by side: perplexity | classify | summarize | choice"
    )
    p.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help="models to compare, openai:MODEL for a hosted one (default: the bundled model)",
    )
    p.add_argument(
        "-m",
        "--model",
        dest="model_flags",
        action="append",
        metavar="MODEL",
        help="a model to compare (repeatable; default: none beyond MODEL)",
    )
    p.add_argument(
        "--task",
        required=True,
        choices=["perplexity", "classify", "summarize", "choice"],
        help="what to score (required)",
    )
    p.add_argument("--data", required=True, help="text file (perplexity) or .jsonl/.csv test set (required)")
    p.add_argument(
        "--train-file",
        help="classification: training data for the TF-IDF baseline row (default: no baseline)",
    )
    p.add_argument(
        "--labels", help="classification: candidate labels for zero-shot models (default: the test set's)"
    )
    p.add_argument("--text-field", default="text", help="field holding the text")
    p.add_argument("--label-field", default="label", help="classification: field holding the label")
    p.add_argument("--summary-field", default="summary", help="summarization: field holding the reference")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples (default: all)")
    p.add_argument(
        "--window", type=int, help="perplexity: tokens of context per window (default: the model's context)"
    )
    p.add_argument("--stride", type=int, help="perplexity: tokens between windows (default: half a window)")
    p.add_argument("--out", default="reports/eval", help="folder for report.json, report.md and PNGs")
    p.add_argument(
        "--explain",
        type=int,
        default=0,
        metavar="N",
        help="classification: add each model's N most confident errors, with the words that pushed them, "
        "to the report (default: 0, none)",
    )
    _deprecated(p, "--out-dir", "--out", dest="out")
    _add_speed(p, compile_default=None)
    _add_hosted(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("list", help="models in the local store (~/.lmforge, or $LMFORGE_HOME)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="a stored model: files, lineage chain, recipe, data and metrics")
    p.add_argument("name", help="NAME[:TAG] (tag latest by default)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("rm", help="remove stored models (`lmforge gc` then frees their files)")
    p.add_argument("names", nargs="+", metavar="NAME[:TAG]")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("cp", help="store a model under a second NAME:TAG (no files are copied)")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.set_defaults(func=cmd_cp)

    p = sub.add_parser("tag", help="give a stored model another tag: `tag spam:v3 best` makes spam:best")
    p.add_argument("src", metavar="SRC")
    p.add_argument("tag", metavar="TAG", help="a tag (same name as SRC) or a full NAME:TAG (like cp)")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("import", help="put a model folder, .gguf file or hub id into the store")
    p.add_argument("source", metavar="PATH|GGUF|HUB-ID")
    p.add_argument("--name", required=True, help="NAME[:TAG] to store it as (required)")
    p.add_argument("--description", default="", help="a line for `show` and the model card (default: none)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("verify", help="re-hash every stored file; report missing or corrupt ones")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("gc", help="delete stored files no model uses and leftovers of interrupted imports")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("export", help="write a model as a Hugging Face folder, a GGUF file or a PEFT adapter")
    _add_model(p)
    p.add_argument("--format", default="hf", help="hf (transformers folder, default) or gguf (llama.cpp)")
    # Not required=True: argparse would refuse the old spelling, --out-dir, before it could say it is one.
    p.add_argument("--out", help="folder (hf, adapter) or file (gguf) to write (required)")
    _deprecated(p, "--out-dir", "--out", dest="out")
    p.add_argument("--dtype", help="weight type: f32 (default), f16 or bf16")
    p.add_argument(
        "--quant", help="GGUF quantization: q8_0, q4_0, q4_1, q5_0 or q5_1 (default: none, --dtype's floats)"
    )
    p.add_argument(
        "--no-merge",
        "--adapter-only",
        dest="merge",
        action="store_false",
        help="write only the LoRA adapter (PEFT layout) instead of merging it into the weights",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="an OpenAI-compatible server (continuous batching) and a web playground")
    _add_model(p)
    _add_loading(p, compile_default=None)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $LMFORGE_API_KEY)")
    p.add_argument(
        "--access-log",
        action="store_true",
        help="print a line per request: method, path, status, tokens generated, latency in ms",
    )
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument(
        "--batch-weights",
        choices=BATCH_WEIGHTS,
        default="auto",
        help="packed (int4/int8) models, a step of several streams: packed = the packed kernel in float32 "
        "(each stream's tokens equal its solo run's); packed-bf16 = in bf16 dot products where the CPU has "
        "AVX512-BF16 (layers 1.1-1.8x faster at 8 streams; a stream may differ from its solo run at near-ties); "
        "bf16 = that, and a bf16 copy of the weights for 9 streams or more (2 bytes a weight more memory); auto = "
        "packed-bf16 where the CPU has it, with the copy when --max-batch exceeds 8 and it fits a quarter of "
        "free memory, else packed (default: auto)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="sequences (prompts x n) waiting before new requests get 429",
    )
    p.add_argument("--max-context", type=int, help="cap on prompt + max_tokens (default: model's context)")
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        help="memory for the keys and values of prompt prefixes requests share (a system prompt), reused "
        f"instead of prefilled again (default: {DEFAULT_PREFIX_CACHE_MB:.0f}; 0: off)",
    )
    p.add_argument(
        "--cors", action="append", help="browser origin allowed to call the API (repeatable; default: none)"
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="Host header name to answer besides localhost, 127.0.0.1, ::1 and --host (repeatable; '*': any; "
        "default: none)",
    )
    p.add_argument(
        "--insecure-no-key",
        action="store_true",
        help="serve on an address other than localhost without an API key (refused otherwise)",
    )
    ray = p.add_argument_group("Ray Serve (pip install 'lmforge[ray]')")
    ray.add_argument(
        "--ray", action="store_true", help="serve as Ray Serve replicas behind Ray's router (a local cluster)"
    )
    ray.add_argument(
        "--replicas", type=int, default=1, help="with --ray: replicas, each loads the model (1-64)"
    )
    ray.add_argument(
        "--replica-threads",
        type=int,
        default=1,
        help="with --ray: intra-op threads (and CPUs reserved from Ray) per replica (default 1)",
    )
    ray.add_argument(
        "--replica-gpus",
        type=float,
        default=0.0,
        help="with --ray: GPUs each replica reserves (0.5: two per GPU; default 0: CPU replicas)",
    )
    ray.add_argument(
        "--ray-address",
        help="with --ray: join this Ray cluster (e.g. auto, ray://HEAD:10001) instead of a local one; a model "
        "folder, file or store entry of this machine is sent to the replicas' nodes through Ray "
        "(default: none, a local cluster)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("estimate", help="memory (weights, gradients, optimizer, activations, KV) and speed")
    _add_model(p)
    p.add_argument(
        "--context",
        type=int,
        help="tokens per sequence, prompt + new ones when generating (default: up to 2048; 512 for training)",
    )
    p.add_argument("--batch", type=int, default=1, help="sequences at once")
    p.add_argument("--mode", default="infer", help="infer | full | freeze | lora (training methods)")
    p.add_argument(
        "--task",
        help="generate | score | classify | embed (default: embed for sentence encoders, else generate)",
    )
    p.add_argument("--dtype", default="auto", help="inference dtype: auto, float32, bfloat16, float16")
    _add_speed(p, old_file_types=True)
    p.add_argument("--lora-rank", type=int, default=8, help="mode lora: the adapters' rank")
    p.add_argument(
        "--train-last-blocks", type=int, default=2, help="mode freeze: the last N blocks train (default: 2)"
    )
    p.add_argument(  # the old name, for one release
        "--freeze-last",
        dest="train_last_blocks",
        type=int,
        default=2,
        help=argparse.SUPPRESS,
        action=renamed_flag("--freeze-last", "--train-last-blocks", "it trains the last N blocks"),
    )
    p.add_argument(
        "--activation-checkpointing", action="store_true", help="training modes: recompute activations"
    )
    p.add_argument("--no-measure", dest="measure", action="store_false", help="skip the speed measurement")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("select", help="rank candidate models on your task, data and machine")
    p.add_argument("--task", required=True, help="classify | generate | summarize | embed (required)")
    p.add_argument("--data", required=True, help=".jsonl / .csv file with your examples (required)")
    p.add_argument(
        "--candidates",
        required=True,
        help="comma-separated models (folder, .gguf, name, hub id, openai:MODEL; required)",
    )
    p.add_argument("--max-ram", help="memory limit, e.g. 4GB or 512MiB (default: RAM free now)")
    p.add_argument(
        "--max-latency-ms", type=float, help="per example (per token for generate; default: no limit)"
    )
    p.add_argument("--sample", type=int, default=32, help="examples to score each candidate on")
    p.add_argument("--shots", type=int, default=0, help="classify: few-shot examples in the prompt")
    p.add_argument("--text-field", default="text", help="field holding the text")
    p.add_argument("--label-field", default="label", help="classify: field holding the label")
    p.add_argument("--summary-field", default="summary", help="summarize: field holding the reference")
    _add_speed(p, compile_default=None)
    _add_hosted(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser(
        "quickstart",
        help="a tour: the default model answers in English and Chinese, then a tiny GPT trains for about a "
        "minute",
    )
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens per answer")
    p.add_argument(
        "--pretrain",
        action=argparse.BooleanOptionalAction,
        help="the tour's second part: train a tokenizer and a tiny GPT for about a minute (default: on)",
    )
    p.set_defaults(pretrain=True)
    _add_speed(p)
    p.set_defaults(func=cmd_quickstart)
    for each in _parsers_under(parser):
        each.formatter_class = _HelpFormatter
    return parser


def _configure_runtime(args: argparse.Namespace) -> None:
    """Once, before any command: intra-op threads (--threads) and inductor's cache under $LMFORGE_HOME."""
    from lmforge import runtime

    args.threads = runtime.set_threads(args.threads)
    runtime.configure_compile_cache()


def _parse(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Parse with the light parser, or with the full one when the command is pretrain or finetune."""
    parser = build_parser(recipes=False)
    known, _ = parser.parse_known_args(argv)
    if known.command in RECIPE_COMMANDS:
        parser = build_parser()
    return parser, parser.parse_args(argv)


def _actions_under(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """A command's arguments, those of its actions included (``tokenizer train``'s --vocab-size)."""
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                yield from _actions_under(subparser)


def _as_typed(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """``message`` with the API's names spelled as the flags the user typed: ``top_p=2.0`` -> ``--top-p 2.0``,
    ``vocab_size`` -> ``--vocab-size``.

    Only numeric flags, whose values read the same either way (a Python list of labels would not), and a bare
    name only when it has an underscore: ``threads`` or ``seed`` alone may be plain English."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in [*parser._actions, *_actions_under(commands.choices[command])]:
        if action.type not in (int, float) or not action.option_strings:
            continue
        flag = max(action.option_strings, key=len)
        field = action.dest.rpartition(".")[2]  # a settings flag's dest is its path: train.max_steps
        for name in (field, *_API_NAMES.get(field, ())):
            message = re.sub(rf"(?<![\w/.-]){name}=", f"{flag} ", message)
            if "_" in name:
                message = re.sub(rf"(?<![\w/.-]){name}(?![\w/-])", flag, message)
    return message


def _bug(command: str, error: BaseException) -> str:
    """The one line for an unexpected error: what failed, the error itself, and where to report it."""
    detail = " ".join(f"{type(error).__name__}: {error}".split())
    detail = detail if len(detail) <= 300 else detail[:299] + "…"
    return (
        f"error: `lmforge {command}` failed unexpectedly ({detail}) — this is a bug in lmforge: please report "
        f"it to {REPORT_TO} with the output of `lmforge --debug {command} ...`"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser, args = _parse(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        _merge_model(args)
        if args.command not in STORE_COMMANDS:
            _configure_runtime(args)
        func(args)
    except LmforgeError as e:
        print(f"error: {_as_typed(str(e), parser, args.command)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`lmforge embed ... | head`): stop quietly, like any Unix tool. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a killed writer
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, OSError) and e.filename is not None:
            # A path the user gave that cannot be read or written (permissions, a full disk): theirs to fix.
            print(f"error: {e.filename}: {e.strerror} — check the path and its permissions", file=sys.stderr)
            return EXIT_USER_ERROR
        print(_bug(args.command, e), file=sys.stderr)
        return EXIT_BUG
    return 0
