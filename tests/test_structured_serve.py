"""Structured output through a live server of the bundled SmolLM2, with the official openai client (issue 19).

The acceptance's full size (5 schemas x 40 sampled generations) runs in ``benchmarks/structured.py serve``; here
each schema gets ``SAMPLES`` sampled answers (temperature 1.0), all of which must parse and validate with
``jsonschema``, so the suite stays within its time budget.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pydantic
import pytest

from lmforge.serve import create_app

from .serving import serving
from .structured_schemas import SCHEMAS

SAMPLES = 2  # per schema; benchmarks/structured.py serve --samples 40 runs the acceptance's 200
MAX_TOKENS = 120

# A question per schema that invites the answer the schema shapes (the grammar does the rest).
QUESTIONS = {
    "nested": "Describe a person: their name, home city and its rough latitude and longitude, as JSON.",
    "enums": "Describe a T-shirt you like as JSON: its color, size and how you feel about it.",
    "arrays": "Give a few tags for a blog post about cooking, and a small matrix of booleans, as JSON.",
    "bounds": "Describe a customer (age, rating out of 5) and today's temperature and discount, as JSON.",
    "chinese": "用JSON写一个中国城市的名字、一句关于它的诗和一个季节。",
}


@pytest.fixture(scope="module")
def server(smollm2):
    # 16 slots: the five schemas' answers decode in one wave (a CPU step reads the weights once for all rows)
    # packed: float32 batches, each stream equal to its solo run
    with serving(create_app(smollm2, max_batch=16, batch_weights="packed")) as base:
        yield smollm2, openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)


def json_schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def test_sampled_answers_to_five_schemas_all_validate(server):
    _, client = server

    def ask(name: str) -> list[tuple[str, str]]:
        answer = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": QUESTIONS[name]}],
            response_format=json_schema_format(name),
            n=SAMPLES,
            temperature=1.0,
            max_tokens=MAX_TOKENS,
            seed=19,
        )
        return [(c.message.content, c.finish_reason) for c in answer.choices]

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # the five requests share the server's batch
        answers = dict(zip(SCHEMAS, pool.map(ask, SCHEMAS), strict=True))
    for name, choices in answers.items():
        assert len(choices) == SAMPLES
        for text, finish_reason in choices:
            assert finish_reason == "stop", (name, text)  # ended by the grammar, not cut by max_tokens
            jsonschema.validate(json.loads(text), SCHEMAS[name])
    assert len({text for choices in answers.values() for text, _ in choices}) == SAMPLES * len(
        SCHEMAS
    )  # sampled
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in json.loads(t)["诗句"]) for t, _ in answers["chinese"])


def test_constrained_and_free_streams_together_free_ones_equal_their_solo_runs(server):
    llm, client = server
    free = ["The capital of France is", "床前明月光，", "def fibonacci(n):", "The three primary colors are"]
    solo = [llm.generate_text(p, max_length=12) for p in free]

    def free_stream(prompt: str) -> str:
        chunks = client.completions.create(
            model="smollm2", prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in chunks if c.choices)

    def constrained_stream(seed: int) -> str:
        chunks = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": QUESTIONS["enums"]}],
            response_format=json_schema_format("enums"),
            temperature=1.0,
            max_tokens=MAX_TOKENS,
            seed=seed,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(8) as pool:
        constrained = [pool.submit(constrained_stream, seed) for seed in range(4)]
        unconstrained = [pool.submit(free_stream, p) for p in free]
        texts = [f.result() for f in unconstrained]
        for f in constrained:
            jsonschema.validate(json.loads(f.result()), SCHEMAS["enums"])
    assert texts == solo


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=20)
    celsius: int = pydantic.Field(ge=-50, le=50)
    sunny: bool


def test_parse_with_a_pydantic_model_and_completions_take_response_format(server):
    _, client = server
    parsed = client.chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the weather in Paris today? Answer in JSON."}],
        response_format=Weather,
        max_tokens=60,
        temperature=0,
    )
    assert isinstance(parsed.choices[0].message.parsed, Weather)
    text = client.completions.create(
        model="smollm2",
        prompt="A JSON object describing a cat:",
        max_tokens=60,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert isinstance(json.loads(text.choices[0].text), dict)


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum (5) is greater than maximum (1)"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "does not exist"),
        ({"type": "string", "pattern": "(["}, "unclosed character class"),
    ],
)
def test_a_malformed_schema_is_a_400_naming_the_problem_and_nothing_else_is_harmed(server, schema, words):
    _, client = server
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}},
            max_tokens=5,
        )
    assert e.value.status_code == 400
    error = e.value.body
    assert words in error["message"] and error["param"] == "response_format", error
    after = client.completions.create(model="smollm2", prompt="Hello", max_tokens=2, temperature=0)
    assert after.choices[0].finish_reason in {"stop", "length"}
