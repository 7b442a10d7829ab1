"""Constrained decoding: a JSON Schema, a regular expression or a list of choices becomes per-step token masks.

The grammar engine is llguidance (guidance-ai's, in Rust), chosen over xgrammar by measurement
(docs/architecture.md, "Constrained decoding"; ``benchmarks/structured.py compare``): it compiles each of the five
acceptance schemas in 0.8-3.2 ms on SmolLM2's and a Chinese BPE's tokenizers where xgrammar takes 0.6-54 ms (the
schema with Chinese patterns: 54 ms), its masks (30-200 us a token) are far below one decode step, and its wheel
depends on nothing (xgrammar's needs transformers and triton). Nothing here parses a grammar itself.

    constraint = compile_constraint(tokenizer, json_schema={"type": "object", ...})
    state = constraint.start()               # one per generated sequence
    logits[~state.allowed(vocab_size)] = -inf; token = sample(logits); state.advance(token)
    state.finished                           # the grammar is complete: only end-of-sequence may follow

JSON comes out compact with a space after ``,`` and ``:`` (``json.dumps``'s default layout); numbers a schema
does not give a ``multipleOf`` get at most ``NUMBER_DECIMALS`` digits after the point and no exponent, and numbers
without a bound stay within ``NUMBER_BOUND`` of zero (or of the one bound given): free whitespace, an endless
fraction or an endless integer (SmolLM2 sampled ``7.0322579027690256346950922664...`` and
``"lat": 4124792265275372318881863085...``) would let a sampled answer run to the token limit and break off.
Every such answer still satisfies the schema as given. Compiled constraints are cached per tokenizer
(``CACHED_CONSTRAINTS`` specs each, least recently used dropped first), so a server answering many requests with
one schema compiles it once. Specs are bounded (``limits.MAX_CONSTRAINT_BYTES``) and so is the engine's work per
token (llguidance's parser limits, its defaults).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import llguidance
import numpy as np
import torch

from lmforge import limits
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

CACHED_CONSTRAINTS = 64  # compiled specs kept per tokenizer
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}
NUMBER_DECIMALS = 6  # digits after the point of a JSON number whose schema sets no multipleOf
NUMBER_BOUND = 10**15  # |number| below this where the schema sets no bound (a double holds 15 digits exactly)
_NOT_SCHEMAS = frozenset({"enum", "const", "default", "examples"})  # keywords whose values are data


class ConstraintState:
    """Where one sequence stands in its grammar: which tokens may come next, and whether it is complete."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: Sequence[int], vocab: int) -> None:
        self._matcher = matcher
        self._eos_ids = list(eos_ids)
        self._bits = np.zeros((vocab + 31) // 32, dtype=np.int32)
        self._vocab = vocab

    @property
    def finished(self) -> bool:
        """The grammar accepts the text so far and nothing but end-of-sequence may follow."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """A bool mask (vocab_size,) of the tokens that keep the text inside the grammar.

        ``vocab_size`` is the model's: ids past the tokenizer's (padding rows of the embedding) are never
        allowed. A finished state allows only end-of-sequence, so a batch that goes on decoding other rows
        samples something harmless for this one."""
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        if self.finished:
            eos = [i for i in self._eos_ids if i < vocab_size]
            # Without an end-of-sequence token the caller ends the row itself: any token is as good.
            return allowed.index_fill_(0, torch.tensor(eos, dtype=torch.long), True) if eos else ~allowed
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._matcher.is_error():
            raise LmforgeError(
                f"constrained decoding stopped: {_one_line(self._matcher.get_error())}",
                hint="simplify the schema or regular expression",
            )
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: min(self._vocab, vocab_size)]
        allowed[: len(bits)] = torch.from_numpy(bits.astype(bool))
        return allowed

    def advance(self, token_id: int) -> None:
        """Move past ``token_id`` (one the last ``allowed`` mask let through); nothing once finished."""
        if self.finished:
            return
        if not self._matcher.consume_token(token_id):
            raise LmforgeError(
                f"token {token_id} does not fit the constraint: {_one_line(self._matcher.get_error())}",
                hint="sample only tokens that ConstraintState.allowed lets through",
            )


class Constraint:
    """A compiled JSON Schema, regex or choice list for one tokenizer; ``start`` begins a sequence."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: Sequence[int], vocab: int, spec: str) -> None:
        self._matcher = matcher  # a fresh matcher; each sequence gets a copy (cheap: it shares the lexer)
        self._eos_ids = list(eos_ids)
        self._vocab = vocab
        self.spec = spec  # what was compiled, for messages and the cache

    def start(self) -> ConstraintState:
        return ConstraintState(self._matcher.deep_copy(), self._eos_ids, self._vocab)

    def __repr__(self) -> str:
        return f"Constraint({self.spec[:80]})"


def compile_constraint(
    tokenizer: Tokenizer,
    *,
    json_schema: dict[str, Any] | str | None = None,
    regex: str | None = None,
    choices: Sequence[str] | None = None,
    json_object: bool = False,
) -> Constraint:
    """Compile exactly one of: a JSON Schema (a dict or its JSON text), a regular expression the whole output
    must match, a list of strings the output must be one of, or ``json_object=True`` (any JSON object).

    A malformed or unsatisfiable spec raises ``LmforgeError`` naming the problem."""
    given = [
        name
        for name, value in (
            ("json_schema", json_schema),
            ("regex", regex),
            ("choices", choices),
            ("json_object", json_object or None),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise LmforgeError(
            f"a constraint takes exactly one of json_schema, regex, choices, json_object; got {given or 'none'}",
            hint="pass one of them",
        )
    kind = given[0]
    if json_object:
        key = _spec_text("json_object", ANY_JSON_OBJECT)
    elif json_schema is not None:
        key = _spec_text("json_schema", _schema(json_schema))
    elif regex is not None:
        if not isinstance(regex, str):
            raise LmforgeError(f"regex must be a string, not {type(regex).__name__}", hint="pass a pattern")
        key = _spec_text("regex", regex)
    else:
        key = _spec_text("choices", _choices(choices))
    return _cached(tokenizer, key, kind)


def _schema(value: dict[str, Any] | str) -> Any:
    if isinstance(value, str):
        if len(value.encode("utf-8")) > limits.MAX_CONSTRAINT_BYTES:
            _too_large("json_schema")
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:
            raise LmforgeError(
                f"json_schema is not valid JSON: {e}", hint="send the schema as JSON"
            ) from None
    if not isinstance(value, dict | bool):
        raise LmforgeError(
            f"json_schema must be a JSON object, not {type(value).__name__}",
            hint='pass a schema like {"type": "object", "properties": {...}}',
        )
    return _bounded_numbers(value)


def _bounded_numbers(schema: Any) -> Any:
    """A copy of ``schema`` where each number without a ``multipleOf`` gets ``10**-NUMBER_DECIMALS`` (llguidance
    then allows that many decimals, no exponent): a subset of what the schema accepts, of bounded length."""
    if isinstance(schema, list):
        return [_bounded_numbers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: value if key in _NOT_SCHEMAS else _bounded_numbers(value) for key, value in schema.items()}
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if "number" in kinds and "multipleOf" not in schema:
        out["multipleOf"] = 10.0**-NUMBER_DECIMALS
    if "number" in kinds or "integer" in kinds:
        low = _bound(schema, "minimum", "exclusiveMinimum")
        high = _bound(schema, "maximum", "exclusiveMaximum")
        if high is None and low is not False:
            out["maximum"] = max(0, low or 0) + NUMBER_BOUND - 1
        if low is None and high is not False:
            out["minimum"] = min(0, high or 0) - NUMBER_BOUND + 1
    return out


def _bound(schema: dict[str, Any], inclusive: str, exclusive: str) -> float | None | bool:
    """The schema's bound on one side; None when it sets none, False when it sets one that is not a number
    (left for llguidance to name)."""
    values = [schema[key] for key in (inclusive, exclusive) if key in schema]
    if not values:
        return None
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        return False
    return values[0]


def _choices(choices: Sequence[str] | None) -> list[str]:
    if isinstance(choices, str) or not isinstance(choices, Sequence) or not choices:
        raise LmforgeError("choices must be a non-empty list of strings", hint='pass e.g. ["yes", "no"]')
    bad = [c for c in choices if not isinstance(c, str) or not c]
    if bad:
        raise LmforgeError(f"choices must be non-empty strings; got {bad[0]!r}", hint="fix the list")
    return list(dict.fromkeys(choices))


def _spec_text(kind: str, value: Any) -> str:
    """The cache key: the kind and the spec as canonical JSON (key order kept: it is the output's order)."""
    try:
        text = json.dumps([kind, value], ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise LmforgeError(
            f"{kind} is not JSON-serialisable: {e}", hint="use plain dicts, lists, strings"
        ) from None
    if len(text.encode("utf-8")) > limits.MAX_CONSTRAINT_BYTES:
        _too_large(kind)
    return text


def _too_large(kind: str) -> None:
    raise LmforgeError(
        f"{kind} is over the {limits.MAX_CONSTRAINT_BYTES:,}-byte limit", hint="send a smaller constraint"
    )


def _grammar(kind: str, value: Any) -> str:
    """llguidance's grammar text for a spec; malformed ones surface when the matcher is built."""
    try:
        if kind in ("json_schema", "json_object"):
            return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_LAYOUT)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(value)
        # Lark string literals take JSON's escapes, so json.dumps quotes each choice exactly.
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    except ValueError as e:
        raise LmforgeError(f"invalid {kind}: {_one_line(str(e))}", hint=f"fix the {kind}") from None


class _Index:
    """llguidance's view of one tokenizer (its token trie, built once: ~0.3 s for a 49k vocabulary) and the
    constraints compiled for it, least recently used first."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        eos = tokenizer.eos_id
        self.eos_ids = [eos] if eos is not None else []
        self.vocab = tokenizer.vocab_size
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=self.vocab, eos_token=eos if eos is not None else None
        )
        self.compiled: OrderedDict[str, Constraint] = OrderedDict()


_indexes: weakref.WeakKeyDictionary[Tokenizer, _Index] = weakref.WeakKeyDictionary()
_lock = threading.Lock()  # the server compiles off its event loop, in worker threads


def _cached(tokenizer: Tokenizer, key: str, kind: str) -> Constraint:
    with _lock:
        index = _indexes.get(tokenizer)
        if index is None:
            index = _indexes[tokenizer] = _Index(tokenizer)
        constraint = index.compiled.get(key)
        if constraint is not None:
            index.compiled.move_to_end(key)
            return constraint
    matcher = llguidance.LLMatcher(index.tokenizer, _grammar(kind, json.loads(key)[1]), log_level=0)
    if matcher.is_error():
        raise LmforgeError(f"invalid {kind}: {_one_line(matcher.get_error())}", hint=f"fix the {kind}")
    constraint = Constraint(matcher, index.eos_ids, index.vocab, key)
    with _lock:
        index.compiled[key] = constraint
        while len(index.compiled) > CACHED_CONSTRAINTS:
            index.compiled.popitem(last=False)
    return constraint


def _one_line(message: str) -> str:
    """llguidance's messages can span lines (a caret under a regex): one line, its first paragraph."""
    first = message.split("\n<state>")[0]
    return " ".join(first.split())


def response_format_constraint(tokenizer: Tokenizer, response_format: Any) -> Constraint | None:
    """The constraint an OpenAI ``response_format`` asks for: ``{"type": "json_object"}``, ``{"type":
    "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``, ``{"type": "text"}`` (none),
    or a pydantic model class (its JSON schema). ``None`` gives none."""
    if response_format is None:
        return None
    schema_of = getattr(response_format, "model_json_schema", None)
    if isinstance(response_format, type) and callable(schema_of):  # a pydantic model class
        return compile_constraint(tokenizer, json_schema=schema_of())
    if not isinstance(response_format, dict):
        raise LmforgeError(
            f"response_format must be a dict or a pydantic model class, not {type(response_format).__name__}",
            hint='pass {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}',
        )
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return compile_constraint(tokenizer, json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise LmforgeError(
                "response_format json_schema needs a 'json_schema' object with a 'schema'",
                hint='send {"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}}',
            )
        return compile_constraint(tokenizer, json_schema=spec["schema"])
    raise LmforgeError(
        f"response_format type {kind!r} is not supported",
        hint="use 'text', 'json_object' or 'json_schema'",
    )


def requested_constraint(
    tokenizer: Tokenizer,
    *,
    json_schema: dict[str, Any] | str | None = None,
    regex: str | None = None,
    choices: Sequence[str] | None = None,
    response_format: Any = None,
) -> Constraint | None:
    """The constraint a generation call's keywords ask for (at most one of them), or None for free text."""
    if response_format is not None:
        if json_schema is not None or regex is not None or choices is not None:
            raise LmforgeError(
                "response_format cannot be combined with json_schema, regex or choices",
                hint="pass one of them",
            )
        return response_format_constraint(tokenizer, response_format)
    if json_schema is None and regex is None and choices is None:
        return None
    return compile_constraint(tokenizer, json_schema=json_schema, regex=regex, choices=choices)


def mask_logits(logits: torch.Tensor, states: Sequence[ConstraintState | None]) -> torch.Tensor:
    """logits (B, V) with the tokens each row's constraint forbids set to -inf; rows without one unchanged."""
    if all(state is None for state in states):
        return logits
    vocab = logits.shape[-1]
    allowed = torch.ones_like(logits, dtype=torch.bool)
    for row, state in enumerate(states):
        if state is not None:
            allowed[row] = state.allowed(vocab).to(logits.device)
    return logits.masked_fill(~allowed, float("-inf"))
