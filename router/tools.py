"""Tool calling on /v1/chat/completions: the prompt, the grammar of a call, and calls read back.

A call is written as Hermes-style text, one block per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

`tool_choice` picks the grammar: `none` renders no tools and constrains nothing; `auto` (the default
with tools) lets the model write text or calls, and once it opens a call the call must be valid;
`required` must call one or more functions (one with `parallel_tool_calls: false`); a named
function must call exactly that one. Arguments follow each function's `parameters` schema.

Chat templates that render `tools` themselves get the tools and the history as they expect them
(calls with parsed arguments, `tool` messages); others get a system prompt listing the tools
(appended to the caller's own system message), assistant calls written as above, and tool results
as user messages wrapped in <tool_response> tags.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from loraxpy.router.errors import ValidationError
from loraxpy.router.grammar import GrammarSpec
from loraxpy.router.schemas import ChatCompletionRequest, ChatMessage, Tool

CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"
_CALL = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names

SYSTEM_PROMPT = (
    "You may call one or more functions to assist with the user query. The functions are listed "
    "in <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with a JSON object with its name and arguments inside "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools."""

    messages: list[dict[str, Any]]  # for the chat template
    template_tools: list[dict[str, Any]] | None  # `tools` for a template that renders them
    grammar: GrammarSpec | None  # what the output is constrained to (None: tools do not constrain)
    parse_calls: bool  # read calls back from the output


def plan_tools(req: ChatCompletionRequest, template_supports_tools: bool) -> ToolPlan:
    """The messages, template tools and grammar for `req`; refuses a bad `tools` / `tool_choice`."""
    tools = req.tools or []
    choice = req.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise ValidationError("`tool_choice` needs `tools`", param="tool_choice")
    for tool in tools:
        if not _NAME.match(tool.function.name):
            raise ValidationError(
                "`tools`: function names must be 1-64 letters, digits, `_` or `-`", param="tools"
            )
    if len({t.function.name for t in tools}) != len(tools):
        raise ValidationError("`tools`: function names must be unique", param="tools")
    active = [t for t in tools if choice != "none"]
    if not isinstance(choice, str) and choice is not None:
        active = [t for t in tools if t.function.name == choice.function.name]
        if not active:
            raise ValidationError(
                f"`tool_choice` names `{choice.function.name}`, which is not in `tools`", param="tool_choice"
            )
    if template_supports_tools:
        messages = [_template_message(m) for m in req.messages]
        template_tools = [t.model_dump(exclude_none=True, by_alias=True) for t in active] or None
    else:
        messages = _with_system_prompt([_plain_message(m) for m in req.messages], active)
        template_tools = None
    if not active:
        return ToolPlan(messages, template_tools, None, parse_calls=False)
    parallel = req.parallel_tool_calls is not False and isinstance(choice, str | None)
    grammar = calls_grammar(active, parallel=parallel, allow_text=choice in (None, "auto"))
    return ToolPlan(messages, template_tools, grammar, parse_calls=True)


def _call_schema(tool: Tool) -> dict[str, Any]:
    parameters = tool.function.parameters or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def calls_grammar(tools: list[Tool], *, parallel: bool, allow_text: bool) -> GrammarSpec:
    """Lark (llguidance) for one call or several (`parallel`), or free text that does not open a
    call (`allow_text`); each call's JSON follows its function's schema, written compactly."""
    schemas = [_call_schema(t) for t in tools]
    body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    body = {**body, "x-guidance": {"whitespace_flexible": False}}
    lines = [
        "start: text | calls" if allow_text else "start: calls",
        'calls: call ("\\n" call)*' if parallel else "calls: call",
        f"call: {json.dumps(CALL_OPEN)} body {json.dumps(CALL_CLOSE)}",
        f"body: %json {json.dumps(body)}",
    ]
    if allow_text:
        lines += ["text: TEXT", "TEXT: /(?s:.+)/ & ~/<tool_call>(?s:.*)/"]
    return GrammarSpec("lark", "\n".join(lines) + "\n")


def _arguments(call_arguments: str) -> Any:
    try:
        return json.loads(call_arguments)
    except json.JSONDecodeError:
        raise ValidationError(
            "`messages`: a tool call's `arguments` must be JSON text", param="messages"
        ) from None


def _call_text(name: str, arguments: Any) -> str:
    return CALL_OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + CALL_CLOSE


def _plain_message(m: ChatMessage) -> dict[str, Any]:
    """One history message for a template that knows nothing of tools."""
    if m.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"}
    content = m.text()
    if m.tool_calls:
        calls = "\n".join(_call_text(c.function.name, _arguments(c.function.arguments)) for c in m.tool_calls)
        content = f"{content}\n{calls}" if content else calls
    return _named({"role": m.role, "content": content}, m)


def _named(message: dict[str, Any], m: ChatMessage) -> dict[str, Any]:
    """OpenAI's `name` of a participant goes to the chat template, which renders it if it knows it."""
    if m.name is not None:
        message["name"] = m.name
    return message


def _template_message(m: ChatMessage) -> dict[str, Any]:
    """One history message as HF chat templates with tool support expect it."""
    message: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    return _named(message, m)


def _with_system_prompt(messages: list[dict[str, Any]], tools: list[Tool]) -> list[dict[str, Any]]:
    if not tools:
        return messages
    listing = "\n".join(
        json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False) for t in tools
    )
    prompt = SYSTEM_PROMPT.format(tools=listing)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        return [{"role": first["role"], "content": f"{first['content']}\n\n{prompt}"}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _raw_arguments(block: str, name: str) -> str:
    """The arguments as the model wrote them (compact JSON: the grammar allows no blanks)."""
    head = '{"name":' + json.dumps(name) + ',"arguments":'
    return block[len(head) : -1] if block.startswith(head) and block.endswith("}") else ""


def read_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """An output's content and its tool calls (OpenAI's shape, with fresh ids). Text that does not
    open with a call is content; a call block that is not complete JSON stays content."""
    if not text.startswith(CALL_OPEN.rstrip("\n")):
        return text, []
    calls = []
    for block in _CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return text, []
        arguments = _raw_arguments(block, call["name"]) or json.dumps(call["arguments"], ensure_ascii=False)
        calls.append(
            {"id": _new_id(), "type": "function", "function": {"name": call["name"], "arguments": arguments}}
        )
    return (None, calls) if calls else (text, [])


_HEAD = re.compile(r'\n?<tool_call>\n\{"name":"([A-Za-z0-9_-]+)","arguments":')


class ToolCallStream:
    """One streamed choice of a chat with tools: its text, as it arrives, as OpenAI's deltas.

    Content goes out as it comes, held back only while it could still open a call. Calls (compact
    JSON, as the grammar writes them, so no raw newline inside) go out as the id and name once the
    name is complete, then the arguments as they are written, holding back the one character that
    may be the call's own closing brace.
    """

    def __init__(self) -> None:
        self._text = ""
        self._pos = 0  # of the text handed out
        self._in_call = False  # the arguments of call `num_calls - 1` are being written
        self.num_calls = 0

    def push(self, piece: str) -> list[dict[str, Any]]:
        self._text += piece
        if self.num_calls == 0 and not self._in_call:
            opening = CALL_OPEN.rstrip("\n")
            if opening.startswith(self._text[: len(opening)]) and len(self._text) < len(opening):
                return []  # could still open a call
            if not self._text.startswith(opening):
                return self._content()
        return self._calls()

    def finish(self) -> list[dict[str, Any]]:
        """Deltas held back when the choice ends: text that looked like the start of a call."""
        return self._content() if self.num_calls == 0 and not self._in_call else []

    def _content(self) -> list[dict[str, Any]]:
        new, self._pos = self._text[self._pos :], len(self._text)
        return [{"content": new}] if new else []

    def _calls(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        while True:
            rest = self._text[self._pos :]
            if not self._in_call:
                head = _HEAD.match(rest)
                if head is None:
                    return deltas
                call = {"index": self.num_calls, "id": _new_id(), "type": "function"}
                deltas.append(
                    {"tool_calls": [{**call, "function": {"name": head.group(1), "arguments": ""}}]}
                )
                self.num_calls += 1
                self._in_call = True
                self._pos += head.end()
                continue
            end = rest.find("\n")  # compact JSON holds no raw newline: this ends the call
            arguments = rest[: end - 1] if end >= 0 else rest[:-1]
            if arguments:
                delta = {"index": self.num_calls - 1, "function": {"arguments": arguments}}
                deltas.append({"tool_calls": [delta]})
                self._pos += len(arguments)
            if end < 0:
                return deltas
            self._in_call = False
            self._pos += 1 + len(CALL_CLOSE)  # the closing brace, then "\n</tool_call>"
