"""Tool calling without a model: tools and tool_choice checked, prompts rendered (a template that declares tools,
judged by transformers rendering the same template; the fallback prompt), replies parsed back into calls, and the
streamed deltas equal to the parsed reply however the text is cut (English and Chinese arguments)."""

from __future__ import annotations

import json
import random

import pytest

from lmforge import limits
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tools import (
    CLOSE,
    OPEN,
    ToolChoice,
    ToolStream,
    call_schema,
    parse_reply,
    parse_tools,
    render_prompt,
    resolve_choice,
    template_declares_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
TOOLS = [WEATHER, TIME]

# Written after Qwen2.5-Instruct's template (the parts that handle tools, tool calls and tool results).
QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    '{{- "\\n\\n# Tools\\n\\n<tools>" }}{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}'
    '{{- "\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags.'
    '<|im_end|>\\n" }}'
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    '{%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}'
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == \"assistant\" %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    '{%- elif message.role == "tool" %}'
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}{{- '<|im_start|>user' }}"
    "{%- endif %}{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def conversation(arguments: str) -> list[dict]:
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "巴黎和东京的天气怎么样？"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                },
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"温度": 21}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    ]


def with_template(tokenizer: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(
        tokenizer.backend,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        chat_template=template,
    )


# ----------------------------------------------------------------- requests
def test_tools_and_choices_are_checked_with_one_line_naming_the_problem():
    functions = parse_tools(TOOLS)
    assert [f.name for f in functions] == ["get_weather", "get_time"]
    assert resolve_choice(functions) == ToolChoice("auto")
    assert resolve_choice([]) == ToolChoice("none")
    assert resolve_choice(functions, "required") == ToolChoice("required")
    named = resolve_choice(functions, {"type": "function", "function": {"name": "get_time"}})
    assert named.constrained and named.function == functions[1]
    with pytest.raises(LmforgeError, match=r"'get_wether'.*known: get_weather, get_time"):
        resolve_choice(functions, {"type": "function", "function": {"name": "get_wether"}})
    with pytest.raises(LmforgeError, match="needs tools"):
        resolve_choice([], "required")
    with pytest.raises(LmforgeError, match="tool_choice must be"):
        resolve_choice(functions, "sometimes")
    bad = [
        ([{"type": "retrieval"}], "tools\\[0\\] is not"),
        ([{"type": "function", "function": {"name": "has space"}}], "letters, digits"),
        ([WEATHER, WEATHER], "appears twice"),
        ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "JSON Schema object"),
        ([TIME] * (limits.MAX_TOOLS + 1), "more than the limit"),
        (
            [{"type": "function", "function": {"name": "f", "description": "x" * limits.MAX_TOOL_CHARS}}],
            "over the limit",
        ),
    ]
    for tools, message in bad:
        with pytest.raises(LmforgeError, match=message) as caught:
            parse_tools(tools)
        assert "\n" not in str(caught.value)


def test_call_schema_is_the_whole_call_for_one_function_or_any_tool():
    functions = parse_tools(TOOLS)
    assert call_schema(functions, ToolChoice("auto")) is None
    named = call_schema(
        functions, resolve_choice(functions, {"type": "function", "function": {"name": "get_weather"}})
    )
    assert named["properties"]["name"] == {"const": "get_weather"}
    # the function's parameters, closed to the properties they list (a subset of what they allow)
    assert named["properties"]["arguments"] == {
        **WEATHER["function"]["parameters"],
        "additionalProperties": False,
    }
    nested = {"type": "object", "properties": {"a": {"type": "array", "items": {"properties": {"b": {}}}}}}
    closed = call_schema(
        parse_tools([{"function": {"name": "f", "parameters": nested}}]), ToolChoice("required")
    )
    assert closed["properties"]["arguments"]["properties"]["a"]["items"]["additionalProperties"] is False
    open_one = {"type": "object", "properties": {}, "additionalProperties": {"type": "integer"}}
    kept = call_schema(
        parse_tools([{"function": {"name": "f", "parameters": open_one}}]), ToolChoice("required")
    )
    assert kept["properties"]["arguments"]["additionalProperties"] == {"type": "integer"}
    assert named["required"] == ["name", "arguments"] and named["additionalProperties"] is False
    anyof = call_schema(functions, ToolChoice("required"))["anyOf"]
    assert [s["properties"]["name"]["const"] for s in anyof] == ["get_weather", "get_time"]


# ---------------------------------------------------------------- rendering
def test_a_template_that_declares_tools_renders_as_transformers_renders_it(tiny_tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = with_template(tiny_tokenizer, QWEN_STYLE_TEMPLATE)
    assert template_declares_tools(QWEN_STYLE_TEMPLATE) and not template_declares_tools(PLAIN_TEMPLATE)
    tiny_tokenizer.save(tmp_path)
    oracle = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    oracle.chat_template = QWEN_STYLE_TEMPLATE
    messages = conversation('{"city": "巴黎"}')
    functions = parse_tools(TOOLS)
    ours = render_prompt(tokenizer, messages, functions, ToolChoice("auto"))
    # transformers' documented form: arguments as an object
    hf_messages = json.loads(json.dumps(messages))
    hf_messages[2]["content"] = ""
    for call, arguments in zip(hf_messages[2]["tool_calls"], [{"city": "巴黎"}, {}], strict=True):
        call["function"]["arguments"] = arguments
    expected = oracle.apply_chat_template(
        hf_messages, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert ours == expected
    assert (
        '"arguments": {"city": "巴黎"}' in ours and '<tool_response>\n{"温度": 21}\n</tool_response>' in ours
    )
    # a forced call ends the prompt with the opener; "none" hides the tools
    forced = render_prompt(tokenizer, messages, functions, ToolChoice("required"))
    assert forced == expected + OPEN + "\n"
    assert "<tools>" not in render_prompt(tokenizer, messages, functions, ToolChoice("none"))


def test_the_fallback_prompt_lists_the_functions_and_writes_calls_and_results_as_text(tiny_tokenizer):
    tokenizer = with_template(tiny_tokenizer, PLAIN_TEMPLATE)
    functions = parse_tools(TOOLS)
    prompt = render_prompt(tokenizer, conversation('{"city": "巴黎"}'), functions, ToolChoice("auto"))
    turns = prompt.split("<|im_start|>")[1:]
    # a template that writes any role gets the results as tool turns
    assert [t.split("\n", 1)[0] for t in turns] == [
        "system",
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
    ]
    system = turns[0]
    for function in functions:
        spec = {"name": function.name, "description": function.description, "parameters": function.parameters}
        assert json.dumps(spec, ensure_ascii=False) in system
    assert "To call a function" in system and system.rstrip().endswith("Be brief.<|im_end|>")
    assert f'{OPEN}\n{{"name": "get_weather", "arguments": {{"city": "巴黎"}}}}\n{CLOSE}' in turns[2]
    assert f'{OPEN}\n{{"name": "get_time", "arguments": {{}}}}\n{CLOSE}' in turns[2]
    assert turns[3:5] == ['tool\n{"温度": 21}<|im_end|>\n', "tool\n12:00<|im_end|>\n"]
    none = render_prompt(tokenizer, conversation("{}"), functions, ToolChoice("none"))
    assert "To call a function" not in none and none.startswith("<|im_start|>system\nBe brief.")
    # templates that drop or refuse a role they do not know get the results as one user turn of tags
    known = "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    dropping = PLAIN_TEMPLATE.replace("{{'<|im_start|>'", known + "{{'<|im_start|>'").replace(
        "{% endfor %}", "{% endif %}{% endfor %}"
    )
    refusing = PLAIN_TEMPLATE.replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if message['role'] == 'tool' %}{{ raise_exception('no') }}{% endif %}",
    )
    for template in (dropping, refusing):
        text = render_prompt(
            with_template(tiny_tokenizer, template), conversation("{}"), functions, ToolChoice("auto")
        )
        turns = text.split("<|im_start|>")[1:]
        assert [t.split("\n", 1)[0] for t in turns] == ["system", "user", "assistant", "user", "assistant"]
        results = '<tool_response>\n{"温度": 21}\n</tool_response>\n<tool_response>\n12:00\n</tool_response>'
        assert turns[3] == f"user\n{results}<|im_end|>\n"


# ------------------------------------------------------------------ parsing
REPLIES = [
    # (text, choice, content, [(name, arguments)], finish_reason)
    ("Paris is sunny.", ToolChoice("auto"), "Paris is sunny.", [], "stop"),
    (
        f'Let me check.\n{OPEN}\n{{"name": "get_weather", "arguments": {{"city": "東京", "unit": "C"}}}}\n{CLOSE}',
        ToolChoice("auto"),
        "Let me check.",
        [("get_weather", {"city": "東京", "unit": "C"})],
        "tool_calls",
    ),
    (
        f'{OPEN}{{"name": "get_weather", "arguments": {{"city": "巴黎"}}}}{CLOSE}\n'
        f'{OPEN}\n{{"name":"get_time","arguments":{{}}}}\n{CLOSE}',
        ToolChoice("auto"),
        None,
        [("get_weather", {"city": "巴黎"}), ("get_time", {})],
        "tool_calls",
    ),
    # an unknown function or broken JSON stays text
    (f'{OPEN}{{"name": "launch", "arguments": {{}}}}{CLOSE}', ToolChoice("auto"), None, [], "stop"),
    (f'{OPEN}{{"name": "get_time", "arguments": {{}}{CLOSE}', ToolChoice("auto"), None, [], "stop"),
    # a bare call object; a call cut off before its closing tag
    ('{"name": "get_time", "arguments": {}}', ToolChoice("auto"), None, [("get_time", {})], "tool_calls"),
    (
        f'{OPEN}\n{{"name": "get_time", "arguments": {{}}}}',
        ToolChoice("auto"),
        None,
        [("get_time", {})],
        "tool_calls",
    ),
    # a constrained reply: the JSON alone (the opener was in the prompt)
    (
        '{"name": "get_weather", "arguments": {"city": "上海"}}',
        ToolChoice("required"),
        None,
        [("get_weather", {"city": "上海"})],
        "tool_calls",
    ),
    # "none": nothing is parsed
    (f'{OPEN}{{"name": "get_time", "arguments": {{}}}}{CLOSE}', ToolChoice("none"), None, [], "stop"),
]


@pytest.mark.parametrize("text, choice, content, calls, reason", REPLIES)
def test_replies_parse_into_content_and_calls_and_stream_into_the_same_deltas(
    text, choice, content, calls, reason
):
    functions = parse_tools(TOOLS)
    reply = parse_reply(text, functions, choice)
    expected_content = text if content is None and not calls else content
    assert reply.content == expected_content
    assert [(c.name, json.loads(c.arguments)) for c in reply.tool_calls] == calls
    assert reply.finish_reason == reason
    assert len({c.id for c in reply.tool_calls}) == len(calls)
    assert all(c.id.startswith("call_") for c in reply.tool_calls)
    message = reply.message()
    assert message["role"] == "assistant" and ("tool_calls" in message) == bool(calls)
    # streamed in random cuts (seeded), the deltas rebuild the same turn, in OpenAI's delta shapes
    for seed in range(20):
        rng = random.Random(seed)
        stream = ToolStream(functions, choice)
        deltas = []
        rest = text
        while rest:
            cut = rng.randint(1, 6)
            deltas += stream.feed(rest[:cut])
            rest = rest[cut:]
        deltas += stream.finish()
        assert stream.finish_reason("stop") == reason
        text_parts = [d["content"] for d in deltas if "content" in d]
        streamed_content = "".join(text_parts).strip() or None
        assert streamed_content == (text.strip() if content is None and not calls else content)
        calls_seen: dict[int, dict] = {}
        for d in deltas:
            if "tool_calls" not in d:
                continue
            (piece,) = d["tool_calls"]
            if piece["index"] not in calls_seen:  # the first delta of a call names it
                assert piece["id"].startswith("call_") and piece["type"] == "function"
                assert piece["function"]["arguments"] == ""
                calls_seen[piece["index"]] = {"name": piece["function"]["name"], "arguments": ""}
            else:
                assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
                calls_seen[piece["index"]]["arguments"] += piece["function"]["arguments"]
        assert sorted(calls_seen) == list(range(len(calls)))
        assert [(c["name"], json.loads(c["arguments"])) for c in calls_seen.values()] == calls
