"""lmforge.structured: specs compile to masks that admit exactly the texts the grammar accepts (tiny tokenizer)."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pydantic
import pytest
import torch

from lmforge import limits
from lmforge.errors import LmforgeError
from lmforge.structured import (
    CACHED_CONSTRAINTS,
    _indexes,
    compile_constraint,
    mask_logits,
    response_format_constraint,
)

from .structured_schemas import EXAMPLES, SCHEMAS


def walk(tokenizer, constraint, text: str) -> list[bool]:
    """Feed ``text``'s tokens through a fresh state: whether each was allowed when its turn came."""
    state = constraint.start()
    verdicts = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        ok = bool(state.allowed(tokenizer.vocab_size)[token])
        verdicts.append(ok)
        if not ok:
            break
        state.advance(token)
    return verdicts


def random_walk(tokenizer, constraint, rng: random.Random, vocab: int, limit: int = 200) -> tuple[str, bool]:
    """Sample uniformly among allowed tokens until the grammar finishes (or EOS is picked); the text and
    whether it ended by the grammar's own accord."""
    state = constraint.start()
    ids = []
    for _ in range(limit):
        allowed = state.allowed(vocab).nonzero().flatten().tolist()
        assert allowed, "a live state must allow some token"
        token = rng.choice(allowed)
        if token == tokenizer.eos_id:
            return tokenizer.decode(ids), True
        state.advance(token)
        ids.append(token)
        if state.finished:
            return tokenizer.decode(ids), True
    return tokenizer.decode(ids), False


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_each_schema_admits_its_example(tiny_tokenizer, name):
    jsonschema.validate(EXAMPLES[name], SCHEMAS[name])  # the example is a real instance
    constraint = compile_constraint(tiny_tokenizer, json_schema=SCHEMAS[name])
    text = json.dumps(EXAMPLES[name], ensure_ascii=False)
    assert all(walk(tiny_tokenizer, constraint, text))


def test_schema_rejects_a_wrong_value(tiny_tokenizer):
    constraint = compile_constraint(tiny_tokenizer, json_schema=SCHEMAS["enums"])
    assert not all(walk(tiny_tokenizer, constraint, '{"color": "purple"'))
    bounds = compile_constraint(tiny_tokenizer, json_schema=SCHEMAS["bounds"])
    assert not all(walk(tiny_tokenizer, bounds, '{"age": 121'))  # maximum 120
    assert all(walk(tiny_tokenizer, bounds, '{"age": 120'))


@pytest.mark.parametrize("name", ["enums", "bounds", "chinese", "arrays"])
def test_random_walks_are_valid_instances(tiny_tokenizer, name):
    """Whatever the sampler picks among allowed tokens, the finished text parses and validates."""
    constraint = compile_constraint(tiny_tokenizer, json_schema=SCHEMAS[name])
    rng = random.Random(0)
    finished = 0
    for _ in range(5):
        text, done = random_walk(tiny_tokenizer, constraint, rng, tiny_tokenizer.vocab_size)
        if done:
            finished += 1
            jsonschema.validate(json.loads(text), SCHEMAS[name])
    assert finished >= 1


def test_finished_state_allows_only_eos_and_model_vocab_padding_is_masked(tiny_tokenizer):
    constraint = compile_constraint(tiny_tokenizer, choices=["是", "否"])
    state = constraint.start()
    padded = tiny_tokenizer.vocab_size + 13  # a model whose embedding has spare rows
    first = state.allowed(padded)
    assert first.shape == (padded,) and not first[tiny_tokenizer.vocab_size :].any()
    for token in tiny_tokenizer.encode("否", add_special_tokens=False):
        assert not state.finished
        state.advance(token)
    assert state.finished
    assert state.allowed(padded).nonzero().flatten().tolist() == [tiny_tokenizer.eos_id]
    state.advance(tiny_tokenizer.eos_id)  # nothing happens once finished


def test_numbers_get_bounded_decimals_and_data_stays_data(tiny_tokenizer):
    """An endless fraction would run a sampled answer to the token limit: six decimals at most, no exponent."""
    number = compile_constraint(tiny_tokenizer, json_schema={"type": "number", "maximum": 50})
    assert all(walk(tiny_tokenizer, number, "-7.123456"))
    assert not all(walk(tiny_tokenizer, number, "7.1234567"))
    assert not all(walk(tiny_tokenizer, number, "1e3"))
    integer = compile_constraint(tiny_tokenizer, json_schema={"type": "integer", "minimum": 10**12})
    assert all(walk(tiny_tokenizer, integer, str(10**12 + 10**15 - 1)))  # a bound near the one given
    assert not all(walk(tiny_tokenizer, integer, str(10**12 + 10**15)))
    unbounded = compile_constraint(tiny_tokenizer, json_schema={"type": "integer"})
    assert all(walk(tiny_tokenizer, unbounded, "-999999999999999"))
    assert not all(walk(tiny_tokenizer, unbounded, "1000000000000000"))  # 16 digits: the length is bounded
    quarter = compile_constraint(tiny_tokenizer, json_schema={"type": ["number", "null"], "multipleOf": 0.25})
    assert all(walk(tiny_tokenizer, quarter, "0.75")) and not all(walk(tiny_tokenizer, quarter, "0.3"))
    const = {"const": {"type": "number"}}  # a value that looks like a schema is data: left as it is
    assert all(
        walk(tiny_tokenizer, compile_constraint(tiny_tokenizer, json_schema=const), '{"type": "number"}')
    )


def test_regex_and_choices(tiny_tokenizer):
    regex = compile_constraint(tiny_tokenizer, regex=r"[0-9]{3}-[a-z]{2}")
    assert all(walk(tiny_tokenizer, regex, "123-ab"))
    assert not all(walk(tiny_tokenizer, regex, "12a"))
    choices = compile_constraint(tiny_tokenizer, choices=['say "hi"', "床前明月光"])
    assert all(walk(tiny_tokenizer, choices, 'say "hi"'))
    assert all(walk(tiny_tokenizer, choices, "床前明月光"))
    assert not all(walk(tiny_tokenizer, choices, "say hi"))


def test_json_object_and_response_formats(tiny_tokenizer):
    any_object = compile_constraint(tiny_tokenizer, json_object=True)
    assert all(walk(tiny_tokenizer, any_object, '{"k": [1, "二"]}'))
    assert not all(walk(tiny_tokenizer, any_object, "[1]"))
    assert response_format_constraint(tiny_tokenizer, {"type": "json_object"}) is any_object  # cached
    assert response_format_constraint(tiny_tokenizer, {"type": "text"}) is None
    fmt = {"type": "json_schema", "json_schema": {"name": "e", "schema": SCHEMAS["enums"], "strict": True}}
    same = compile_constraint(tiny_tokenizer, json_schema=json.dumps(SCHEMAS["enums"]))
    assert response_format_constraint(tiny_tokenizer, fmt) is same

    class Point(pydantic.BaseModel):
        x: int
        label: str

    from_model = response_format_constraint(tiny_tokenizer, Point)
    assert all(walk(tiny_tokenizer, from_model, '{"x": 3, "label": "点"}'))
    assert not all(walk(tiny_tokenizer, from_model, '{"x": "3"'))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}, "minimum (5) is greater"),
        ({"json_schema": {"type": "frob"}}, "Invalid type: frob"),
        ({"json_schema": '{"type": '}, "not valid JSON"),
        ({"json_schema": [1, 2]}, "must be a JSON object"),
        ({"json_schema": {"$ref": "#/defs/nowhere"}}, "does not exist"),
        ({"regex": "(["}, "unclosed character class"),
        ({"choices": []}, "non-empty list"),
        ({"choices": ["a", ""]}, "non-empty strings"),
        ({}, "exactly one of"),
        ({"regex": "a", "choices": ["a"]}, "exactly one of"),
        ({"json_schema": {"type": "string", "enum": ["x" * limits.MAX_CONSTRAINT_BYTES]}}, "byte limit"),
    ],
)
def test_malformed_specs_are_one_line_errors(tiny_tokenizer, kwargs, words):
    with pytest.raises(LmforgeError) as e:
        compile_constraint(tiny_tokenizer, **kwargs)
    assert words in e.value.message and "\n" not in e.value.message


def test_response_format_errors(tiny_tokenizer):
    for bad, words in [
        ({"type": "xml"}, "not supported"),
        ({"type": "json_schema"}, "needs a 'json_schema' object"),
        ("json", "must be a dict"),
    ]:
        with pytest.raises(LmforgeError, match=words):
            response_format_constraint(tiny_tokenizer, bad)


def test_cache_is_bounded_and_reuses(tiny_tokenizer):
    first = compile_constraint(tiny_tokenizer, regex="a{1}")
    assert compile_constraint(tiny_tokenizer, regex="a{1}") is first
    for n in range(CACHED_CONSTRAINTS):
        compile_constraint(tiny_tokenizer, regex=f"b{{{n + 1}}}")
    assert len(_indexes[tiny_tokenizer].compiled) == CACHED_CONSTRAINTS
    assert compile_constraint(tiny_tokenizer, regex="a{1}") is not first  # the oldest was dropped


def test_mask_logits_leaves_unconstrained_rows_alone(tiny_tokenizer):
    constraint = compile_constraint(tiny_tokenizer, choices=["yes"])
    logits = torch.randn(3, tiny_tokenizer.vocab_size)
    masked = mask_logits(logits, [None, constraint.start(), None])
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    allowed = masked[1].isfinite().nonzero().flatten().tolist()
    assert allowed and all("yes".startswith(tiny_tokenizer.decode([t])) for t in allowed)
    assert mask_logits(logits, [None, None, None]) is logits


# --------------------------------------------------------------- generation with a tiny random model
@pytest.fixture(scope="module")
def llm(tiny_tokenizer):
    from .conftest import tiny_llm

    return tiny_llm("tiny-llama", tiny_tokenizer)


def test_generate_text_follows_schema_regex_and_choices(llm, one_thread):
    """A random model left alone writes noise; constrained, every sample is a valid instance."""
    schema = SCHEMAS["chinese"]  # strings bounded by patterns: a random model's answer fits 150 tokens
    texts = llm.generate_text(["a", "床前"] * 2, 150, json_schema=schema, temperature=1.0, seed=3)
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(texts)) > 1  # sampled, not one forced path
    assert re.fullmatch(r"[a-c]{2}-\d", llm.generate_text("x", 20, regex=r"[a-c]{2}-\d", temperature=1.0))
    assert llm.generate_text("x", 20, choices=["是", "否", "maybe"], temperature=1.0, seed=1) in {
        "是",
        "否",
        "maybe",
    }
    completion = llm._complete(["x"], {"choices": ["ab"]}, max_new_tokens=20)[0]
    assert completion.text == "ab" and completion.finish_reason == "stop"  # ends with the grammar


def test_constrained_and_free_rows_in_one_batch(llm, tiny_tokenizer, one_thread):
    """Free rows decode exactly as alone (greedy) while their neighbours are masked; masked ones validate."""
    from lmforge.generate import SamplingParams, complete

    prompts = [tiny_tokenizer.encode(p) for p in ["The quick", "床前明月光", "To be, or"]]
    params = SamplingParams(max_new_tokens=64)
    schema = SCHEMAS["enums"]
    constraint = compile_constraint(tiny_tokenizer, json_schema=schema)
    mixed = complete(
        llm.model, tiny_tokenizer, prompts, params, llm.eos_ids, constraints=[None, constraint.start(), None]
    )
    for row in (0, 2):
        alone = complete(llm.model, tiny_tokenizer, [prompts[row]], params, llm.eos_ids)[0]
        assert mixed[row].token_ids == alone.token_ids
    jsonschema.validate(json.loads(mixed[1].text), schema)
    free = complete(llm.model, tiny_tokenizer, [prompts[1]], params, llm.eos_ids)[0]
    assert free.text != mixed[1].text


def test_chat_and_stream_take_response_format(llm, one_thread):
    class Reply(pydantic.BaseModel):
        answer: bool
        score: int = pydantic.Field(ge=0, le=9)

    text = llm.chat("hi", 40, response_format=Reply, temperature=1.0, seed=0)
    assert isinstance(Reply.model_validate_json(text), Reply)
    pieces = list(llm.stream("hi", 40, response_format=Reply, temperature=1.0, seed=0))
    assert "".join(pieces) == text  # same seed, same constrained sample, streamed
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMAS["chinese"]}}
    jsonschema.validate(json.loads(llm.chat("诗", 80, response_format=fmt)), SCHEMAS["chinese"])
    with pytest.raises(LmforgeError, match="cannot be combined"):
        list(llm.stream("hi", 5, response_format=Reply, regex="a"))
    with pytest.raises(LmforgeError, match="unclosed character class"):
        llm.generate_text("hi", 5, regex="([")
