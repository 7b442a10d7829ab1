"""Tool calling through a live server with the official openai client (issue 19): the round trip (call -> tool
message -> final answer) plain and streamed on the bundled SmolLM2 (its template declares no tools: the fallback
prompt); a named tool_choice's arguments valid on 50 sampled tries, ``required`` among two tools, and an unknown
tool name refused with one 400, on a tiny random model whose template declares tools (Qwen2.5's form). Valid
arguments are the grammar's doing, whatever the model: the 50 tries on SmolLM2 itself take minutes on two busy
CPU cores (run once for the report, not in the suite)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from lmforge.errors import LmforgeError
from lmforge.serve import ServerLimits, create_app
from lmforge.tokenizer import Tokenizer
from lmforge.tools import tool_calling

from .conftest import tiny_llm
from .serving import serving
from .test_tools import QWEN_STYLE_TEMPLATE

WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast for a city",
        "parameters": WEATHER_ARGS,
    },
}
TIME_ARGS = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "enum": ["UTC", "Asia/Shanghai", "Europe/Paris"]}},
    "required": ["timezone"],
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "The time now", "parameters": TIME_ARGS},
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
MAX_TOKENS = 200  # a call's tokens are bounded by the schema (short strings, an enum, a small integer)
TRIES = 50  # the acceptance's count, in one request of n=50 sequences (one prefill, one batch)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def server(smollm2):
    with serving(create_app(smollm2, max_batch=2, batch_weights="packed")) as base:  # float32: as solo
        yield smollm2, client(base)


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    tokenizer = Tokenizer(
        tiny_tokenizer.backend,
        bos_token=tiny_tokenizer.bos_token,
        eos_token=tiny_tokenizer.eos_token,
        chat_template=QWEN_STYLE_TEMPLATE,
    )
    llm = tiny_llm("tiny-llama", tokenizer, block_size=2048)
    with serving(create_app(llm, max_batch=TRIES, limits=ServerLimits(max_rows=TRIES))) as base:
        yield llm, client(base)


def as_messages(first: list[dict], message, result: str) -> list[dict]:
    """The conversation after the call: the assistant's turn as the client got it, then the tool's result."""
    call = message.tool_calls[0]
    return [
        *first,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]


def test_round_trip_call_tool_message_answer_plain_and_streamed(server):
    llm, client = server
    first = [{"role": "user", "content": "上海天气怎么样？"}]
    result = '{"天气": "晴", "温度": 21}'
    ask = {"model": "smollm2", "tools": [WEATHER], "max_tokens": 40, "temperature": 0}
    call = client.chat.completions.create(messages=first, tool_choice=NAMED, **ask)
    choice = call.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (tool_call,) = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.id.startswith("call_")
    assert tool_call.function.name == "get_weather"
    arguments = json.loads(tool_call.function.arguments)
    jsonschema.validate(arguments, WEATHER_ARGS)

    # streamed: the same call (greedy), in OpenAI's deltas
    stream = client.chat.completions.create(messages=first, tool_choice=NAMED, stream=True, **ask)
    deltas, reasons = [], []
    for chunk in stream:
        (c,) = chunk.choices
        deltas += c.delta.tool_calls or []
        assert not c.delta.content
        reasons.append(c.finish_reason)
    assert reasons[-1] == "tool_calls" and set(reasons[:-1]) == {None}
    head, *pieces = deltas
    assert head.index == 0 and head.id.startswith("call_") and head.type == "function"
    assert head.function.name == "get_weather" and head.function.arguments == ""
    assert len(pieces) > 1  # the arguments arrive in pieces as they are decoded
    assert all(p.index == 0 and p.id is None and p.function.name is None for p in pieces)
    assert json.loads("".join(p.function.arguments for p in pieces)) == arguments

    # the tool's result goes back; the model answers (tool_choice auto: it may call or answer, greedy answers)
    conversation = as_messages(first, choice.message, result)
    ask["max_tokens"] = 8
    answer = client.chat.completions.create(messages=conversation, **ask)
    final = answer.choices[0]
    assert final.message.tool_calls is None and final.message.content
    assert final.finish_reason in ("stop", "length")
    # the tool message was in the prompt the server rendered (lmforge.tools, as LLM.chat renders it)
    calling = tool_calling([WEATHER], None, conversation)
    prompt = calling.prompt(llm.tokenizer, conversation)
    assert result in prompt and answer.usage.prompt_tokens == len(
        calling.prompt_ids(llm.tokenizer, conversation)
    )
    streamed = client.chat.completions.create(messages=conversation, stream=True, **ask)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == final.message.content


def test_a_named_tool_choice_gives_valid_arguments_on_every_sampled_try(tiny):
    _, client = tiny
    answer = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Plan my week: what will the weather be where I travel?"}],
        tools=[WEATHER, TIME],
        tool_choice=NAMED,
        n=TRIES,
        temperature=1.0,
        max_tokens=MAX_TOKENS,
        seed=19,
    )
    assert len(answer.choices) == TRIES
    arguments = []
    for choice in answer.choices:
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and choice.finish_reason == "tool_calls"
        arguments.append(json.loads(call.function.arguments))
        jsonschema.validate(arguments[-1], WEATHER_ARGS)
    assert len({json.dumps(a, sort_keys=True) for a in arguments}) > TRIES // 5  # really sampled


def test_llm_chat_gives_the_same_forced_calls_in_python(tiny):
    llm, _ = tiny
    messages = [{"role": "user", "content": "巴黎明天的天气？"}]
    for seed in range(3):
        reply = llm.chat(messages, tools=[WEATHER, TIME], tool_choice=NAMED, temperature=1.0, seed=seed)
        (call,) = reply.tool_calls
        assert reply.content is None and reply.finish_reason == "tool_calls" and call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), WEATHER_ARGS)
        assert reply.message()["tool_calls"][0] == call.as_dict()
    with pytest.raises(LmforgeError, match="not among the tools"):
        llm.chat(
            messages, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}
        )


def test_required_calls_one_of_the_tools_with_its_schema(tiny):
    _, client = tiny
    answer = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "现在北京几点了？"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        n=4,
        temperature=1.0,
        max_tokens=MAX_TOKENS,
        seed=7,
    )
    schemas = {"get_weather": WEATHER_ARGS, "get_time": TIME_ARGS}
    for choice in answer.choices:
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_an_unknown_tool_name_is_one_400_naming_the_known_tools(tiny):
    _, client = tiny
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "hi"}],
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_wether"}},
            max_tokens=4,
        )
    assert caught.value.status_code == 400
    error = caught.value.body
    assert error["param"] == "tool_choice" and "get_wether" in error["message"]
    assert "known: get_weather, get_time" in error["message"] and "\n" not in error["message"]
    bad = [
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "letters, digits"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "tool_choice must be"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tools",
            "cannot be combined",
        ),
    ]
    for fields, param, message in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, **fields
            )
        assert caught.value.status_code == 400
        assert caught.value.body["param"] == param and message in caught.value.body["message"]
    # nothing else harmed: the next request is answered
    ok = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0
    )
    assert ok.choices[0].message.content is not None
