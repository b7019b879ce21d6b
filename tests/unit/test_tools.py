"""Tool calling's pieces: the calls grammar (compiled by llguidance), reading calls back, the prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraxpy.router.errors import ValidationError
from loraxpy.router.grammar import GrammarCompiler
from loraxpy.router.schemas import ChatCompletionRequest, Tool
from loraxpy.router.text import Tokenizer
from loraxpy.router.tools import ToolCallStream, calls_grammar, plan_tools, read_calls

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALL = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(default_model_path: Path) -> Tokenizer:
    return Tokenizer(default_model_path)


def accepts(compiler: GrammarCompiler, tokenizer: Tokenizer, spec, text: str) -> bool:
    matcher = compiler.compile(spec).template.deep_copy()
    ids = tokenizer.encode(text, add_special_tokens=False)
    return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()


def test_the_calls_grammar_takes_valid_calls_only_and_text_only_under_auto(
    default_model_path, tokenizer
) -> None:
    compiler = GrammarCompiler.for_model(default_model_path, tokenizer.vocab_size, (2,))
    tools = [Tool.model_validate(WEATHER), Tool.model_validate(TIME)]
    required = calls_grammar(tools, parallel=True, allow_text=False)
    single = calls_grammar(tools, parallel=False, allow_text=False)
    auto = calls_grammar(tools, parallel=True, allow_text=True)
    time_call = '<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>'
    assert accepts(compiler, tokenizer, required, CALL)
    assert accepts(compiler, tokenizer, required, CALL + "\n" + time_call)
    assert not accepts(compiler, tokenizer, single, CALL + "\n" + time_call)
    assert not accepts(compiler, tokenizer, required, CALL.replace('"city"', '"town"'))
    assert not accepts(compiler, tokenizer, required, "It is sunny.")
    assert accepts(compiler, tokenizer, auto, "It is sunny.")
    assert accepts(compiler, tokenizer, auto, CALL)
    assert not accepts(compiler, tokenizer, auto, "<tool_call>\nnot json")


def test_calls_are_read_back_in_openais_shape_and_text_stays_content() -> None:
    content, calls = read_calls(CALL + "\n" + CALL)
    assert content is None and len(calls) == 2 and calls[0]["id"] != calls[1]["id"]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert read_calls("It is sunny.") == ("It is sunny.", [])


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_tool_choice_none_renders_no_tools_and_a_name_keeps_only_its_function() -> None:
    none = plan_tools(request(tools=[WEATHER, TIME], tool_choice="none"), template_supports_tools=False)
    assert none.grammar is None and not none.parse_calls and none.messages[0]["role"] == "user"
    named = plan_tools(
        request(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}}),
        template_supports_tools=False,
    )
    assert named.parse_calls and "get_time" in named.messages[0]["content"]
    assert "get_weather" not in named.messages[0]["content"]
    with pytest.raises(ValidationError) as e:
        plan_tools(request(tools=[{**TIME, "function": {"name": "bad name"}}]), template_supports_tools=False)
    assert e.value.param == "tools"


def replay(text: str, sizes: list[int]) -> tuple[str, list[dict[str, str]]]:
    """`text` pushed through a ToolCallStream in pieces of the given sizes (cycled): the content and
    the calls the deltas add up to, as an OpenAI client accumulates them."""
    stream = ToolCallStream()
    deltas, pos, k = [], 0, 0
    while pos < len(text):
        size = sizes[k % len(sizes)]
        deltas += stream.push(text[pos : pos + size])
        pos, k = pos + size, k + 1
    deltas += stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            call = calls.setdefault(c["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] += c.get("id", "")
            call["name"] += c.get("function", {}).get("name", "")
            call["arguments"] += c.get("function", {}).get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("sizes", [[1], [3], [7, 1, 2], [1000]])
def test_streamed_deltas_add_up_to_the_calls_and_content_read_back_whole(sizes) -> None:
    time_call = '<tool_call>\n{"name":"get_time","arguments":{"tz":"a}\\n"}}\n</tool_call>'
    for text in [CALL, CALL + "\n" + time_call, "It is sunny.", "<tool", "<b>bold</b>"]:
        content, calls = replay(text, sizes)
        expected_content, expected_calls = read_calls(text)
        assert content == (expected_content or "")
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in expected_calls
        ]
        assert all(c["id"].startswith("call_") for c in calls)
    assert read_calls(CALL)[1][0]["function"]["arguments"] == '{"city":"Paris"}'  # as the model wrote it


TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call {{ c.function.name }} {{ c.function.arguments.city }}>{% endfor %}"
    "{% if m.tool_call_id %}<id {{ m.tool_call_id }}>{% endif %}{% endfor %}"
)


def test_a_template_that_renders_tools_gets_them_and_the_history_as_hf_templates_expect(
    default_model_path: Path, tmp_path: Path
) -> None:
    import shutil

    from loraxpy.router.validation import Limits, validate_chat

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.template_supports_tools
    history = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
    ]
    req = ChatCompletionRequest.model_validate(
        {"messages": history, "tools": [WEATHER, TIME], "max_tokens": 4}
    )
    grammars = GrammarCompiler.for_model(tmp_path, tokenizer.vocab_size, (2,))
    valid = validate_chat(req, Limits(max_input_length=1000, max_total_tokens=2000), tokenizer, grammars)
    prompt = tokenizer.decode(list(valid.engine.input_ids), skip_special_tokens=False)
    assert prompt == (
        "<tools>get_weather;get_time;</tools>[user]Weather?[assistant]<call get_weather Oslo>[tool]cold<id call_1>"
    )
    assert valid.parse_tool_calls and valid.engine.grammar is not None


def test_message_names_reach_the_template_and_unknown_nested_keys_are_refused_by_name() -> None:
    import pydantic

    messages = [{"role": "user", "content": "hi", "name": "alice"}, {"role": "user", "content": "yo"}]
    body = {"model": "m", "messages": messages}
    for supports in (False, True):
        plan = plan_tools(ChatCompletionRequest.model_validate(body), template_supports_tools=supports)
        assert [m.get("name") for m in plan.messages] == ["alice", None]
    for nested, loc in (
        ({"messages": [{"role": "user", "content": "hi", "speaker": "x"}]}, ("messages", 0, "speaker")),
        ({"stream_options": {"include_usage": True, "continuous": True}}, ("stream_options", "continuous")),
        ({"response_format": {"type": "json_object", "strictness": 1}}, ("response_format", "strictness")),
        ({"tools": [{**WEATHER, "cache": True}]}, ("tools", 0, "cache")),
    ):
        with pytest.raises(pydantic.ValidationError) as e:
            ChatCompletionRequest.model_validate({**body, **nested})
        assert e.value.errors()[0]["loc"] == loc and e.value.errors()[0]["type"] == "extra_forbidden"
