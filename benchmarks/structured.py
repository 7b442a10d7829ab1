"""Constrained decoding: xgrammar against llguidance on our tokenizers (issue 19), and lmforge's own figures.

    nice -n 19 python benchmarks/structured.py compare [--repeats 3]
    nice -n 19 python benchmarks/structured.py serve [--samples 40] [--max-tokens 120]

``compare`` prints one table: for each library and tokenizer (the bundled SmolLM2's 49k byte-level BPE, and a
16k byte-level BPE trained here with ``lmforge.train_tokenizer`` on the Chinese text of tests/data), the time to
build the library's tokenizer index, to compile each of the five acceptance schemas (tests/structured_schemas.py),
and the mean time of one token mask along a valid instance of each schema (mask, then advance by its token). This
is the measurement docs/architecture.md ("Constrained decoding") gives for choosing llguidance.

``serve`` runs the acceptance at full size: the server of the bundled SmolLM2 (``create_app``, on 127.0.0.1 as
the tests run it), the five schemas x ``--samples`` sampled generations at temperature 1.0 through the openai
client (the test suite's questions, ``n`` sequences a request, all schemas at once), each parsed and validated
with ``jsonschema``; prints valid/total and finish reasons per schema and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the schemas live in the test suite, so both measure the same ones
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.structured_schemas import EXAMPLES, SCHEMAS  # noqa: E402

from lmforge.formats.gguf import GGUFFile  # noqa: E402
from lmforge.loading import bundled_model_path  # noqa: E402
from lmforge.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


def smollm2_tokenizer() -> Tokenizer:
    return GGUFFile(bundled_model_path()).tokenizer()


def chinese_tokenizer() -> Tokenizer:
    texts = (REPO / "tests" / "data" / "text" / "luxun.txt").read_text(encoding="utf-8").splitlines()
    texts += (REPO / "tests" / "data" / "text" / "songci.txt").read_text(encoding="utf-8").splitlines()
    return train_tokenizer(iter(texts), 16000, show_progress=False)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer: Tokenizer) -> None:
        import llguidance

        self.lib = llguidance
        self.info = llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=tokenizer.eos_id)

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.lib.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        )
        matcher = self.lib.LLMatcher(self.info, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def walk(self, grammar: Any, ids: list[int]) -> list[float]:
        import numpy as np

        matcher = self.lib.LLMatcher(self.info, grammar)
        mask = np.zeros((self.info.vocab_size + 31) // 32, dtype=np.int32)
        times = []
        for token in ids:
            start = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
            times.append(time.perf_counter() - start)
            assert (int(mask[token // 32]) >> (token % 32)) & 1, "the valid instance's token was masked"
            assert matcher.consume_token(token), matcher.get_error()
        return times


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Tokenizer) -> None:
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.lib = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token=tokenizer.eos_token)
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=tokenizer.vocab_size)
        # Its own cache off, so each compile is timed as the first one would be.
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(", ", ": ")
        )

    def walk(self, grammar: Any, ids: list[int]) -> list[float]:
        matcher = self.lib.GrammarMatcher(grammar)
        mask = self.lib.allocate_token_bitmask(1, self.info.vocab_size)
        times = []
        for token in ids:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - start)
            assert (int(mask[0, token // 32]) >> (token % 32)) & 1, "the valid instance's token was masked"
            assert matcher.accept_token(token)
        return times


def compare(repeats: int) -> None:
    tokenizers = {"SmolLM2 49k": smollm2_tokenizer(), "Chinese BPE 16k": chinese_tokenizer()}
    print(f"{'library':<11} {'tokenizer':<16} {'index s':>8} {'schema':<8} {'compile ms':>10} {'mask us':>8}")
    for library in (Llguidance, Xgrammar):
        for tok_name, tokenizer in tokenizers.items():
            index_s, lib = timed(lambda: library(tokenizer))  # noqa: B023 (called at once)
            for schema_name, schema in SCHEMAS.items():
                text = json.dumps(EXAMPLES[schema_name], ensure_ascii=False)
                ids = tokenizer.encode(text, add_special_tokens=False)
                compiles, masks = [], []
                for _ in range(repeats):
                    seconds, grammar = timed(lambda: lib.compile(schema))  # noqa: B023
                    compiles.append(seconds)
                    masks.extend(lib.walk(grammar, ids))
                print(
                    f"{library.name:<11} {tok_name:<16} {index_s:>8.2f} {schema_name:<8} "
                    f"{statistics.median(compiles) * 1e3:>10.1f} {statistics.mean(masks) * 1e6:>8.0f}"
                )


def serve(samples: int, max_tokens: int, per_request: int) -> None:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    import jsonschema
    import openai
    from tests.serving import serving
    from tests.test_structured_serve import QUESTIONS, json_schema_format

    from lmforge.api import LLM
    from lmforge.serve import create_app

    llm = LLM.load(bundled_model_path(), dtype="float32", device="cpu")
    # Requests queue behind each other for the 8 slots: on a slow machine the last waits long.
    with serving(create_app(llm, max_batch=8, request_timeout_s=24 * 3600)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=3600)

        def ask(job: tuple[str, int]) -> list[tuple[str, str | None]]:
            name, seed = job
            answer = client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": QUESTIONS[name]}],
                response_format=json_schema_format(name),  # type: ignore[arg-type]
                n=per_request,
                temperature=1.0,
                max_tokens=max_tokens,
                seed=seed * per_request,  # sequence i of a request samples with seed + i: no two share one
            )
            return [(c.message.content or "", c.finish_reason) for c in answer.choices]

        jobs = [(name, seed) for seed in range(samples // per_request) for name in SCHEMAS]
        start = time.perf_counter()
        valid = dict.fromkeys(SCHEMAS, 0)
        answered = dict.fromkeys(SCHEMAS, 0)
        stopped = dict.fromkeys(SCHEMAS, 0)
        with ThreadPoolExecutor(len(SCHEMAS)) as pool:
            futures = {pool.submit(ask, job): job[0] for job in jobs}
            for future in as_completed(
                futures
            ):  # a line per request, so a cut-short run still says something
                name = futures[future]
                for text, reason in future.result():
                    answered[name] += 1
                    stopped[name] += reason == "stop"
                    try:
                        jsonschema.validate(json.loads(text), SCHEMAS[name])
                        valid[name] += 1
                    except (ValueError, jsonschema.ValidationError) as e:
                        print(f"  invalid {name}: {text!r} ({str(e).splitlines()[0]})")
                print(
                    f"{time.perf_counter() - start:6.0f} s  {name:<8} valid {valid[name]}/{answered[name]} "
                    f"(finish_reason stop: {stopped[name]})",
                    flush=True,
                )
        seconds = time.perf_counter() - start
    print(f"{'schema':<8} {'valid':>9} {'stop':>5}")
    for name in SCHEMAS:
        print(f"{name:<8} {valid[name]:>4}/{answered[name]:<4} {stopped[name]:>5}")
    print(f"all      {sum(valid.values()):>4}/{sum(answered.values()):<4} in {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="xgrammar vs llguidance: compile and mask times")
    cmp.add_argument("--repeats", type=int, default=3)
    srv = sub.add_parser("serve", help="the acceptance at full size against the server of SmolLM2")
    srv.add_argument("--samples", type=int, default=40, help="sampled answers per schema")
    srv.add_argument("--max-tokens", type=int, default=120)
    srv.add_argument("--per-request", type=int, default=8, help="n of each request (divides --samples)")
    args = parser.parse_args()
    if args.command == "compare":
        compare(args.repeats)
    else:
        serve(args.samples, args.max_tokens, args.per_request)


if __name__ == "__main__":
    main()
