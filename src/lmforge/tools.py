"""Tool calling: OpenAI's ``tools`` / ``tool_choice`` turned into a prompt, and the model's answer back into
``tool_calls``. The one owner of the convention, used by ``LLM.chat(tools=...)`` and the server alike.

Rendering. A chat template that uses the ``tools`` variable (Qwen2.5's, Hermes', Llama 3.1's...) gets the tools
and the conversation as transformers passes them (``render_prompt``); assistant turns keep their ``tool_calls``
with the arguments as objects, and ``tool`` messages stay ``tool`` messages. Any other template (SmolLM2's) gets
the **fallback prompt**: a system message listing each function as JSON and asking for the Hermes / Qwen form

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

with earlier calls written that way into their assistant turns and tool results sent back as a user turn of
``<tool_response>`` blocks (a template need not know the ``tool`` role). The fallback's system message comes
before the conversation's own system message, which it keeps.

``tool_choice``. ``"auto"`` (the default with tools): the model answers or calls; a reply holding the call form
(or one bare ``{"name", "arguments"}`` object) is parsed into calls, anything else stays text. ``"none"``: the
tools are not shown to the model and nothing is parsed (earlier calls in the conversation still render).
``"required"`` and ``{"type": "function", "function": {"name": X}}``: the prompt ends with the ``<tool_call>``
opener and the reply is decoded under ``call_schema`` (one call, ``{"name": const, "arguments": the function's
parameters}``, objects closed to the properties they list), so its arguments always parse. A name not among
the tools is an error naming the known ones.

Bounds (``limits.MAX_TOOLS`` and the rest) are checked in ``parse_tools`` before anything is rendered.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from jinja2 import Environment, TemplateSyntaxError, meta

from lmforge import limits
from lmforge.errors import LmforgeError
from lmforge.structured import Constraint, compile_constraint
from lmforge.tokenizer import Tokenizer

OPEN, CLOSE = "<tool_call>", "</tool_call>"
Mode = Literal["auto", "none", "required"]

FALLBACK_INTRO = (
    "You can call the following functions. Each is given as JSON: its name, what it does, and the JSON Schema "
    "of its arguments."
)
FALLBACK_HOW = (
    "To call a function, reply with only this, one block per call:\n"
    f'{OPEN}\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n{CLOSE}\n'
    "Function results come back from the tool, or inside <tool_response></tool_response> tags. When no "
    "function is needed, answer normally."
)


@dataclass(frozen=True)
class Function:
    """One callable function: its name, description and the JSON Schema of its arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_tool(self) -> dict[str, Any]:
        """OpenAI's (and transformers' chat templates') shape of a tool (no description when it has none)."""
        spec = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": {k: v for k, v in spec.items() if v != ""}}


@dataclass(frozen=True)
class ToolChoice:
    """What the model may do: ``mode`` auto / none / required; ``function`` set when one is named."""

    mode: Mode
    function: Function | None = None

    @property
    def constrained(self) -> bool:
        """The reply must be a call, decoded under ``call_schema``."""
        return self.mode == "required"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ToolReply:
    """The assistant's turn: text, calls, or both; ``message()`` is what goes back into the conversation."""

    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str

    def message(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [call.as_dict() for call in self.tool_calls]
        return out


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# ------------------------------------------------------------------ requests
def _problem(
    message: str, hint: str = "see OpenAI's tools format: [{'type': 'function', 'function': {...}}]"
):
    return LmforgeError(message, hint=hint)


_NAME = re.compile(rf"[A-Za-z0-9_.-]{{1,{limits.MAX_TOOL_NAME_CHARS}}}")


def parse_tools(tools: Sequence[Any] | None) -> list[Function]:
    """Check a ``tools`` list (OpenAI's shape) against the bounds and return its functions."""
    if tools is None:
        return []
    if not isinstance(tools, Sequence) or isinstance(tools, str):
        raise _problem("tools must be a list")
    if len(tools) > limits.MAX_TOOLS:
        raise _problem(f"{len(tools)} tools, more than the limit of {limits.MAX_TOOLS}", "send fewer tools")
    functions: list[Function] = []
    for i, tool in enumerate(tools):
        spec = tool.get("function") if isinstance(tool, Mapping) else None
        if (
            not isinstance(tool, Mapping)
            or tool.get("type", "function") != "function"
            or not isinstance(spec, Mapping)
        ):
            raise _problem(f"tools[{i}] is not {{'type': 'function', 'function': {{...}}}}")
        name, description = spec.get("name"), spec.get("description") or ""
        parameters = spec.get("parameters")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _problem(
                f"tools[{i}].function.name must be 1-{limits.MAX_TOOL_NAME_CHARS} letters, digits, '_', '.' or '-', "
                f"not {name!r}"
            )
        if any(f.name == name for f in functions):
            raise _problem(
                f"tools[{i}]: the function name {name!r} appears twice", "give each tool its own name"
            )
        if not isinstance(description, str):
            raise _problem(f"tools[{i}].function.description must be a string")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping):
            raise _problem(f"tools[{i}].function.parameters must be a JSON Schema object")
        size = len(json.dumps(spec, ensure_ascii=False))
        if size > limits.MAX_TOOL_CHARS:
            raise _problem(
                f"tools[{i}] ({name}) is {size:,} characters of JSON, over the limit of {limits.MAX_TOOL_CHARS:,}",
                "shorten its description or schema",
            )
        functions.append(Function(name, description, dict(parameters)))
    return functions


def resolve_choice(functions: Sequence[Function], tool_choice: Any = None) -> ToolChoice:
    """``tool_choice`` as OpenAI reads it (default: auto with tools, none without); an unknown name is an error
    listing the known ones."""
    if tool_choice is None:
        return ToolChoice("auto" if functions else "none")
    if tool_choice in ("auto", "none", "required"):
        if tool_choice != "none" and not functions:
            raise _problem(f"tool_choice={tool_choice!r} needs tools", "send the tools the model may call")
        return ToolChoice(tool_choice)
    spec = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = spec.get("name") if isinstance(spec, Mapping) else None
    if not isinstance(name, str) or tool_choice.get("type", "function") != "function":
        raise _problem(
            f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', 'function': {{'name': ...}}}}, "
            f"not {tool_choice!r}"[:300]
        )
    for function in functions:
        if function.name == name:
            return ToolChoice("required", function)
    known = ", ".join(f.name for f in functions) or "none"
    raise _problem(
        f"tool_choice names the function {name!r}, which is not among the tools (known: {known})",
        "name one of the tools sent with the request",
    )


def call_schema(functions: Sequence[Function], choice: ToolChoice) -> dict[str, Any] | None:
    """The JSON Schema of the whole reply when it must be a call (None otherwise): the object
    ``{"name": ..., "arguments": ...}`` for the named function, or one of the tools for ``required``."""
    if not choice.constrained:
        return None

    def one(function: Function) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"name": {"const": function.name}, "arguments": _closed(function.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    if choice.function is not None:
        return one(choice.function)
    if len(functions) == 1:
        return one(functions[0])
    return {"anyOf": [one(f) for f in functions]}


def _closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its properties and says
    nothing of others: a sampled call otherwise invents keys until it runs out of tokens. Whatever the closed
    schema allows, the original allows too."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties"):
            out[key] = {k: _closed(v) for k, v in value.items()} if isinstance(value, Mapping) else value
        elif key in ("items", "anyOf", "oneOf", "allOf", "prefixItems", "not", "additionalProperties"):
            out[key] = _closed(value)
        else:
            out[key] = value
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


# ----------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=16)
def template_declares_tools(template: str | None) -> bool:
    """Whether a chat template reads the ``tools`` variable (parsed, never run)."""
    if not template:
        return False
    try:
        return "tools" in meta.find_undeclared_variables(Environment().parse(template))
    except TemplateSyntaxError:
        return False


def _arguments_object(arguments: Any) -> Any:
    """Arguments as the templates expect them (an object; OpenAI sends JSON text)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _calls_of(message: Mapping[str, Any]) -> list[tuple[str, Any]]:
    calls = []
    for call in message.get("tool_calls") or []:
        spec = call.get("function", call) if isinstance(call, Mapping) else {}
        calls.append((str(spec.get("name", "")), _arguments_object(spec.get("arguments", {}))))
    return calls


def _native_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        message = {**m, "content": m.get("content") or ""}
        if m.get("tool_calls"):
            message["tool_calls"] = [
                {"type": "function", "id": c.get("id", ""), "function": {"name": n, "arguments": a}}
                for c, (n, a) in zip(m["tool_calls"], _calls_of(m), strict=True)
            ]
        out.append(message)
    return out


def _call_text(name: str, arguments: Any) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def fallback_system(functions: Sequence[Function]) -> str:
    """The fallback prompt's system message: the functions as JSON lines, then how to call them."""
    listing = "\n".join(
        json.dumps(
            {"name": f.name, "description": f.description, "parameters": f.parameters}, ensure_ascii=False
        )
        for f in functions
    )
    return f"{FALLBACK_INTRO}\n{listing}\n\n{FALLBACK_HOW}"


def _fallback_messages(
    messages: Sequence[Mapping[str, Any]], functions: Sequence[Function], tool_role: bool
) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = str(m.get("role", "")), m.get("content") or ""
        if role == "tool" and tool_role:
            out.append({"role": "tool", "content": content})
            continue
        if role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1]["content"] += "\n" + block  # consecutive results: one turn
            else:
                out.append({"role": "user", "content": block})
            continue
        calls = [_call_text(name, args) for name, args in _calls_of(m)]
        out.append({"role": role, "content": "\n".join(([content] if content else []) + calls)})
    if functions:
        system = fallback_system(functions)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{system}\n\n{out[0]['content']}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _fallback_prompt(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], functions: Sequence[Function]
) -> str:
    """Tool results as ``tool`` turns when the template writes such a turn out (SmolLM2's writes any role, and
    its model answers from a tool turn where it only echoes a user turn of tags), else as user turns of
    ``<tool_response>`` blocks (a template may refuse or silently drop a role it does not know)."""
    results = [m.get("content") or "" for m in messages if m.get("role") == "tool"]
    if results:
        try:
            text = tokenizer.apply_chat_template(_fallback_messages(messages, functions, tool_role=True))
            others = [m for m in messages if m.get("role") != "tool"]
            without = tokenizer.apply_chat_template(_fallback_messages(others, functions, tool_role=True))
        except LmforgeError:
            text = without = ""
        if all(text.count(r) > without.count(r) for r in results):  # each result is in the text
            return text
    return tokenizer.apply_chat_template(_fallback_messages(messages, functions, tool_role=False))


def render_prompt(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    functions: Sequence[Function],
    choice: ToolChoice,
) -> str:
    """The prompt text for a conversation with tools: the model's template when it declares tools, else the
    fallback prompt; ends with the ``<tool_call>`` opener when the reply must be a call."""
    shown = [] if choice.mode == "none" else list(functions)
    if template_declares_tools(tokenizer.chat_template):
        extra = {"tools": [f.as_tool() for f in shown]} if shown else {}
        text = tokenizer.apply_chat_template(_native_messages(messages), **extra)
    else:
        text = _fallback_prompt(tokenizer, messages, shown)
    return text + OPEN + "\n" if choice.constrained else text


@dataclass(frozen=True)
class ToolCalling:
    """One request's tools and choice: its prompt, the schema its reply is decoded under, its reply parsed."""

    functions: list[Function]
    choice: ToolChoice

    @property
    def schema(self) -> dict[str, Any] | None:
        return call_schema(self.functions, self.choice)

    def constraint(self, tokenizer: Tokenizer) -> Constraint | None:
        """The compiled ``schema`` a forced call is decoded under (None when the model may answer freely)."""
        schema = self.schema
        return None if schema is None else compile_constraint(tokenizer, json_schema=schema)

    def prompt(self, tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]]) -> str:
        return render_prompt(tokenizer, messages, self.functions, self.choice)

    def prompt_ids(self, tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        # The template writes the special tokens itself (as LoadedModel.prompt_ids does for chats).
        return tokenizer.encode(self.prompt(tokenizer, messages), add_special_tokens=False)

    def reply(self, text: str, finish_reason: str = "stop") -> ToolReply:
        return parse_reply(text, self.functions, self.choice, finish_reason)


def tool_calling(
    tools: Sequence[Any] | None, tool_choice: Any, messages: Sequence[Mapping[str, Any]]
) -> ToolCalling | None:
    """The request's ``ToolCalling``, or None when neither it nor its conversation involves tools (a plain
    chat, rendered as before)."""
    involved = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    if tools is None and tool_choice is None and not involved:
        return None
    functions = parse_tools(tools)
    return ToolCalling(functions, resolve_choice(functions, tool_choice))


# ------------------------------------------------------------------- parsing
def _call_from_json(raw: str, names: set[str]) -> ToolCall | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = _arguments_object(value.get("arguments", value.get("parameters", {})))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(call_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|\Z)", re.DOTALL)


def parse_reply(
    text: str, functions: Sequence[Function], choice: ToolChoice, finish_reason: str = "stop"
) -> ToolReply:
    """The model's text as an assistant turn. A constrained reply is the call's JSON (the opener was in the
    prompt); otherwise each well-formed ``<tool_call>`` block naming a tool is a call, the rest stays text."""
    names = {f.name for f in functions}
    if choice.mode == "none" or not names:
        return ToolReply(text, [], finish_reason)
    call = _call_from_json(text.strip().removesuffix(CLOSE), names) if choice.constrained else None
    calls: list[ToolCall] = [call] if call else []
    content = "" if call else text
    if not call:
        kept: list[str] = []
        last = 0
        for match in _BLOCK.finditer(text):
            found = _call_from_json(match.group(1).strip(), names)
            if found:
                kept.append(text[last : match.start()])
                last = match.end()
                calls.append(found)
        kept.append(text[last:])
        content = "".join(kept)
        if not calls and text.strip().startswith("{"):  # a bare call, as Llama 3.1-style templates write them
            bare = _call_from_json(text.strip(), names)
            if bare:
                calls, content = [bare], ""
    reason = "tool_calls" if calls and finish_reason != "length" else finish_reason
    return ToolReply(content.strip() or None, calls, reason)


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def _held_prefix(text: str, token: str) -> int:
    """Length of the longest end of ``text`` that ``token`` starts with (a tag that may be arriving)."""
    for n in range(min(len(text), len(token) - 1), 0, -1):
        if token.startswith(text[-n:]):
            return n
    return 0


def _args_end(text: str) -> int:
    """Where the arguments may end in ``text``: before a partial closing tag, whitespace and one ``}`` (the
    call object's own), which are held back until what follows them is known."""
    end = len(text) - _held_prefix(text, CLOSE)
    end = len(text[:end].rstrip())
    if text[:end].endswith("}"):
        end = len(text[: end - 1].rstrip())
    return end


class ToolStream:
    """Turns streamed text into OpenAI's chat deltas: ``{"content": ...}`` pieces and ``{"tool_calls": [...]}``
    pieces (the first of a call carries index, id, type and function.name with empty arguments; the next carry
    pieces of function.arguments). Text that may be the start of a tag is held until it is known. The deltas
    rebuild what ``parse_reply`` returns for the whole text (tests/test_tools.py cuts replies at random)."""

    def __init__(self, functions: Sequence[Function], choice: ToolChoice) -> None:
        self.names = {f.name for f in functions}
        self.active = choice.mode != "none" and bool(self.names)
        self.state = "head" if choice.constrained else "text"
        # A constrained call always parses, so its arguments stream as they come; a free one is sent once its
        # block is complete and parses (a broken one is text, as parse_reply makes it).
        self.incremental = choice.constrained
        self.bare = True  # no text sent yet: the reply may still be one bare call object (see parse_reply)
        self.buffer = ""
        self.calls = 0
        self.whitespace = ""  # whitespace-only text is sent only when more text follows it
        self.seam = (
            True  # at the start and after a call: leading whitespace is dropped (as parse_reply strips)
        )

    def _content(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        if not text.strip():
            self.whitespace += text
            return []
        text, self.whitespace = self.whitespace + text, ""
        if self.seam:
            text, self.seam = text.lstrip(), False
        return [{"content": text}]

    def _start(self, name: str) -> dict[str, Any]:
        call = {
            "index": self.calls,
            "id": call_id(),
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        return {"tool_calls": [call]}

    def _arguments(self, text: str) -> list[dict[str, Any]]:
        return [{"tool_calls": [{"index": self.calls, "function": {"arguments": text}}]}] if text else []

    def _whole(self, raw: str, closed: bool) -> list[dict[str, Any]]:
        """A block whose head did not match as it arrived: a call if it parses, else text again."""
        call = _call_from_json(raw.strip(), self.names)
        if call is None:
            return self._content(OPEN + raw + (CLOSE if closed else ""))
        out = [self._start(call.name), *self._arguments(call.arguments)]
        self.calls, self.seam = self.calls + 1, True
        return out

    def feed(self, piece: str) -> list[dict[str, Any]]:
        if not self.active:
            return self._content(piece)
        self.buffer += piece
        out: list[dict[str, Any]] = []
        while True:
            if self.state == "text":
                if self.bare and self.buffer.lstrip()[:1] in ("", "{") and OPEN not in self.buffer:
                    return out  # may be a bare call object: held to the end (finish)
                self.bare = False
                at = self.buffer.find(OPEN)
                if at < 0:
                    keep = _held_prefix(self.buffer, OPEN)
                    out += self._content(self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return out
                out += self._content(self.buffer[:at])
                self.whitespace = ""
                self.buffer, self.state = self.buffer[at + len(OPEN) :], "head"
            elif self.state == "head":
                head = _HEAD.match(self.buffer) if self.incremental else None
                name = json.loads(f'"{head.group(1)}"') if head else None
                if head and name in self.names:
                    out.append(self._start(name))
                    self.buffer, self.state = self.buffer[head.end() :], "arguments"
                    continue
                at = self.buffer.find(CLOSE)
                if at < 0:
                    return out
                out += self._whole(self.buffer[:at], closed=True)
                self.buffer, self.state = self.buffer[at + len(CLOSE) :], "text"
            else:  # arguments
                at = self.buffer.find(CLOSE)
                if at < 0:
                    end = _args_end(self.buffer)
                    out += self._arguments(self.buffer[:end])
                    self.buffer = self.buffer[end:]
                    return out
                out += self._arguments(self.buffer[: _args_end(self.buffer[:at])])
                self.calls, self.seam = self.calls + 1, True
                self.buffer, self.state = self.buffer[at + len(CLOSE) :], "text"

    def finish(self) -> list[dict[str, Any]]:
        """The held text once the reply has ended (a call cut short ends where the text did)."""
        out: list[dict[str, Any]] = []
        if self.state == "text":
            bare = _call_from_json(self.buffer.strip(), self.names) if self.bare else None
            if bare is not None:
                out = [self._start(bare.name), *self._arguments(bare.arguments)]
                self.calls += 1
            else:
                out = self._content(self.buffer) if self.buffer.strip() else []
        elif self.state == "head":
            out = self._whole(self.buffer, closed=False)
        else:
            out = self._arguments(self.buffer[: _args_end(self.buffer)])
            self.calls += 1
        self.buffer, self.state = "", "text"
        return out

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls and reason != "length" else reason
