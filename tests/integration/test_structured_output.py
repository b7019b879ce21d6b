"""Structured output through the real launcher on the default model, driven by the real `lorax-client`
and `openai` SDKs: every output parses and validates (jsonschema), greedy equals HF transformers
with llguidance's own mask as a logits processor, and unconstrained neighbours are untouched."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import requests
from launcher_process import Launcher, launcher
from lorax import AsyncClient, Client
from lorax.errors import ValidationError
from pydantic import BaseModel, Field
from structured_schemas import SCHEMAS
from test_multi_lora_api import save_adapter

from loraxpy.router.tools import SYSTEM_PROMPT

pytestmark = pytest.mark.slow

PROMPT = "<|im_start|>user\nAnswer in JSON.<|im_end|>\n<|im_start|>assistant\n"
# Free-form JSON objects: a question the model answers in a few tokens (on others it loops).
CAPITAL = "What is the capital of France? Answer in JSON."
CAPITAL_PROMPT = f"<|im_start|>user\n{CAPITAL}<|im_end|>\n<|im_start|>assistant\n"
ADAPTER = "json-r8"
OTHER_ADAPTER = "json-qv-r8"  # same rank: the two merge


@pytest.fixture(scope="module")
def adapter_root(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("structured-adapters")
    save_adapter(default_model_path, root / ADAPTER, 8, 16, ["q_proj", "v_proj", "down_proj"], 5)
    save_adapter(default_model_path, root / OTHER_ADAPTER, 8, 16, ["q_proj", "v_proj"], 6)
    return root


@pytest.fixture(scope="module")
def server(
    default_model_path: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Launcher]:
    with launcher(
        default_model_path,
        tmp_path_factory.mktemp("structured-launcher"),
        "--adapter-root",
        str(adapter_root),
        "--adapter-source",
        "local",
    ) as s:
        yield s


def base_model(server: Launcher) -> str:
    return str(requests.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"])


def test_every_schema_validates_greedy_and_sampled_with_and_without_an_adapter(server: Launcher) -> None:
    client = AsyncClient(server.url, timeout=300)
    cases = [
        (name, adapter, sample) for name in SCHEMAS for adapter in (None, ADAPTER) for sample in (False, True)
    ]

    async def one(name: str, adapter: str | None, sample: bool) -> Any:
        return await client.generate(
            PROMPT,
            adapter_id=adapter,
            max_new_tokens=160,
            do_sample=sample,
            seed=7 if sample else None,
            response_format={"type": "json_object", "schema": SCHEMAS[name]},
        )

    async def run() -> list[Any]:
        return list(await asyncio.gather(*(one(*case) for case in cases)))

    responses = asyncio.run(run())
    for (name, adapter, sample), response in zip(cases, responses, strict=True):
        where = f"{name} adapter={adapter} sample={sample}: {response.generated_text!r}"
        assert response.details.finish_reason.value == "eos_token", where
        jsonschema.validate(json.loads(response.generated_text), SCHEMAS[name])
    # The adapter changes what the model writes, inside the same grammar.
    greedy = {(c[0], c[1]): r.generated_text for c, r in zip(cases, responses, strict=True) if not c[2]}
    assert any(greedy[(n, None)] != greedy[(n, ADAPTER)] for n in SCHEMAS)


def test_a_json_object_without_a_schema_is_any_object(server: Launcher) -> None:
    # lorax-client always sends a schema; LoRAX's API also takes none.
    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": 200, "response_format": {"type": "json_object"}},
    }
    response = requests.post(server.url + "/generate", json=body, timeout=120)
    assert response.status_code == 200
    assert isinstance(json.loads(response.json()["generated_text"]), dict)


def test_an_unconstrained_request_beside_constrained_ones_is_unchanged(server: Launcher) -> None:
    client = AsyncClient(server.url, timeout=300)
    plain = "<|im_start|>user\nWrite one sentence about the sea.<|im_end|>\n<|im_start|>assistant\n"

    async def unconstrained() -> list[int]:
        response = await client.generate(plain, max_new_tokens=24, details=True)
        return [t.id for t in response.details.tokens]

    async def crowd() -> list[int]:
        constrained = [
            client.generate(PROMPT, max_new_tokens=40, response_format={"type": "json_object", "schema": s})
            for s in list(SCHEMAS.values())[:6]
        ]
        results = await asyncio.gather(unconstrained(), *constrained)
        return results[0]

    alone = asyncio.run(unconstrained())
    assert asyncio.run(crowd()) == alone


def test_greedy_constrained_output_equals_transformers_with_llguidances_mask(
    server: Launcher, default_model_path: Path
) -> None:
    import llguidance
    import llguidance.hf
    import llguidance.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    vocab = model.config.vocab_size
    llg_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    class GrammarMask(LogitsProcessor):
        def __init__(self, schema: dict[str, Any], prompt_len: int) -> None:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False}
            )
            self.matcher = llguidance.LLMatcher(llg_tokenizer, grammar)
            self.prompt_len = prompt_len
            self.mask = llguidance.torch.allocate_token_bitmask(1, vocab)

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if input_ids.shape[1] > self.prompt_len:
                assert self.matcher.consume_token(int(input_ids[0, -1]))
            llguidance.torch.fill_next_token_bitmask(self.matcher, self.mask)
            llguidance.torch.apply_token_bitmask_inplace(scores, self.mask)
            return scores

    client = Client(server.url, timeout=120)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    for name in ("nested", "any_of_objects"):
        schema = SCHEMAS[name]
        processors = LogitsProcessorList([GrammarMask(schema, ids.shape[1])])
        out = model.generate(ids, max_new_tokens=40, do_sample=False, logits_processor=processors)
        expected = out[0, ids.shape[1] :].tolist()
        response = client.generate(
            PROMPT, max_new_tokens=40, details=True, response_format={"type": "json_object", "schema": schema}
        )
        ours = [t.id for t in response.details.tokens]
        # The server ends as soon as the grammar is complete; HF spends one more step on the EOS.
        assert expected == [*ours, tokenizer.convert_tokens_to_ids("<|im_end|>")], name


def test_a_grammar_cut_short_by_max_tokens_finishes_with_length(server: Launcher) -> None:
    schema = SCHEMAS["array_of_objects"]
    response = Client(server.url, timeout=120).generate(
        PROMPT, max_new_tokens=4, response_format={"type": "json_object", "schema": schema}
    )
    assert response.details.finish_reason.value == "length"
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    chat = oai.chat.completions.create(
        model=base_model(server),
        messages=[{"role": "user", "content": "Answer in JSON."}],
        max_tokens=4,
        response_format={"type": "json_schema", "json_schema": {"name": "items", "schema": schema}},
    )
    assert chat.choices[0].finish_reason == "length"


def test_bad_schemas_regexes_and_grammars_are_refused_with_the_engines_message(server: Launcher) -> None:
    with pytest.raises(ValidationError, match="strin"):
        Client(server.url).generate(
            PROMPT, response_format={"type": "json_object", "schema": {"type": "strin"}}
        )
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    messages = [{"role": "user", "content": "hi"}]
    for body, param, message in [
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex", "unclosed group"),
        ({"guided_grammar": "start: foo"}, "guided_grammar", "foo"),
        ({"guided_choice": []}, "guided_choice", "at least one"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
    ]:
        with pytest.raises(openai.BadRequestError, match=message) as caught:
            oai.chat.completions.create(model=base_model(server), messages=messages, extra_body=body)
        assert caught.value.status_code == 400
        assert caught.value.body["param"] == param  # type: ignore[index]


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    hobbies: list[str] = Field(min_length=1, max_length=2)


def test_openai_parse_with_a_pydantic_model_returns_a_parsed_object(server: Launcher) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    completion = oai.chat.completions.parse(
        model=base_model(server),
        messages=[{"role": "user", "content": "Describe a person."}],
        response_format=Person,
        max_tokens=120,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)


def test_openai_json_schema_and_json_object_streamed_and_not(server: Launcher) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    schema = SCHEMAS["nested"]
    formats: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (
            {"type": "json_schema", "json_schema": {"name": "nested", "schema": schema, "strict": True}},
            schema,
        ),
        ({"type": "json_object"}, {"type": "object"}),
    ]
    for response_format, check in formats:
        kwargs: dict[str, Any] = dict(
            model=base_model(server),
            messages=[{"role": "user", "content": CAPITAL}],
            max_tokens=100,
            response_format=response_format,
            temperature=0,
        )
        whole = oai.chat.completions.create(**kwargs)
        text = whole.choices[0].message.content or ""
        jsonschema.validate(json.loads(text), check)
        chunks = list(oai.chat.completions.create(stream=True, **kwargs))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        completion = oai.completions.create(
            model=base_model(server),
            prompt=CAPITAL_PROMPT,
            max_tokens=100,
            temperature=0,
            extra_body={"response_format": response_format},
        )
        jsonschema.validate(json.loads(completion.choices[0].text), check)


def test_vllm_extras_constrain_to_a_regex_a_choice_and_a_grammar(server: Launcher) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    messages = [{"role": "user", "content": "Give me a code."}]
    grammar = 'start: "id-" DIGIT DIGIT ("," "id-" DIGIT DIGIT)?\nDIGIT: /[0-9]/'
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}}, re.compile(r"[A-Z]{3}-[0-9]{2}")),
        ({"guided_regex": "(yes|no), [a-z]{2,5}"}, re.compile(r"(yes|no), [a-z]{2,5}")),
        ({"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}}, {"alpha", "beta", "gamma"}),
        ({"guided_choice": ["left", "right"]}, {"left", "right"}),
        ({"structured_outputs": {"grammar": grammar}}, re.compile(r"id-[0-9]{2}(,id-[0-9]{2})?")),
        (
            {
                "guided_json": {
                    "type": "object",
                    "properties": {"n": {"type": "integer", "maximum": 9, "minimum": 0}},
                    "required": ["n"],
                    "additionalProperties": False,
                }
            },
            re.compile(r'\{"n":[0-9]\}'),
        ),
    ]
    for body, expected in cases:
        for temperature in (0.0, 1.0):
            chat = oai.chat.completions.create(
                model=base_model(server),
                messages=messages,
                max_tokens=30,
                temperature=temperature,
                seed=11,
                extra_body=body,
            )
            text = chat.choices[0].message.content or ""
            assert chat.choices[0].finish_reason == "stop", (body, text)
            if isinstance(expected, set):
                assert text in expected, (body, text)
            else:
                assert expected.fullmatch(text), (body, text)


TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Time in a timezone",
            "parameters": {
                "type": "object",
                "properties": {"tz": {"enum": ["UTC", "CET"]}},
                "required": ["tz"],
                "additionalProperties": False,
            },
        },
    },
]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_calls(calls: list[Any], names: set[str]) -> None:
    """Each call has an id, names a function offered, and its arguments validate against its schema."""
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), parameters[call.function.name])


def test_tool_choice_required_and_named_return_valid_tool_calls(server: Launcher) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    named = {"type": "function", "function": {"name": "get_time"}}
    for tool_choice, names in [("required", {"get_weather", "get_time"}), (named, {"get_time"})]:
        for temperature in (0.0, 1.0):
            chat = oai.chat.completions.create(
                model=base_model(server),
                messages=WEATHER,  # type: ignore[arg-type]
                tools=TOOLS,  # type: ignore[arg-type]
                tool_choice=tool_choice,  # type: ignore[arg-type]
                parallel_tool_calls=False,
                max_tokens=80,
                temperature=temperature,
                seed=5,
            )
            choice = chat.choices[0]
            assert choice.finish_reason == "tool_calls", choice.message
            assert choice.message.content is None
            assert len(choice.message.tool_calls or []) == 1
            check_calls(choice.message.tool_calls or [], names)


def test_parallel_tool_calls_allows_several_calls_and_false_allows_one(server: Launcher) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    kwargs: dict[str, Any] = dict(
        model=base_model(server), messages=WEATHER, tools=TOOLS, tool_choice="required", temperature=0
    )
    several = oai.chat.completions.create(max_tokens=60, **kwargs).choices[0]
    # This small model keeps calling; its text holds several valid calls before the length cut.
    text = several.message.content or ""
    assert several.finish_reason == "length" and text.count("<tool_call>") >= 2
    blocks = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, re.DOTALL)
    assert len(blocks) >= 2
    for block in blocks:
        call = json.loads(block)
        parameters = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
        jsonschema.validate(call["arguments"], parameters[call["name"]])
    one = oai.chat.completions.create(max_tokens=60, parallel_tool_calls=False, **kwargs).choices[0]
    assert one.finish_reason == "tool_calls" and len(one.message.tool_calls or []) == 1


def test_tool_choice_none_and_auto_answer_in_text_or_valid_calls(server: Launcher) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    for tool_choice in ("none", "auto"):
        choice = oai.chat.completions.create(
            model=base_model(server),
            messages=WEATHER,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice=tool_choice,  # type: ignore[arg-type]
            max_tokens=40,
            temperature=0,
        ).choices[0]
        if choice.message.tool_calls:
            assert tool_choice == "auto" and choice.finish_reason == "tool_calls"
            check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
        else:
            assert choice.message.content and not choice.message.content.startswith("<tool_call>")
            assert choice.finish_reason in ("stop", "length")


def test_streamed_tool_calls_arrive_as_openai_deltas_equal_to_the_whole_response(server: Launcher) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    kwargs: dict[str, Any] = dict(
        model=base_model(server),
        messages=WEATHER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
    )
    whole = oai.chat.completions.create(**kwargs).choices[0]
    chunks = [c for c in oai.chat.completions.create(stream=True, **kwargs) if c.choices]
    calls: dict[int, dict[str, str]] = {}
    pieces = 0
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            pieces += bool(delta.function and delta.function.arguments)
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert pieces > 1  # the arguments arrive as they are written, not whole at the end
    assert len(calls) == 1 and calls[0]["id"].startswith("call_")
    assert whole.message.tool_calls is not None
    expected = whole.message.tool_calls[0].function
    assert (calls[0]["name"], calls[0]["arguments"]) == (expected.name, expected.arguments)


def test_tool_calls_and_tool_results_in_the_history_are_rendered_as_documented(server: Launcher) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    arguments = json.dumps({"city": "Paris", "unit": "c"})
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    history = [
        *WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    full = oai.chat.completions.create(model=base_model(server), messages=history, tools=TOOLS, max_tokens=1)
    # SmolLM2's template knows no tools: they go into a system prompt, calls and results into the text.
    listing = "\n".join(json.dumps(t["function"]) for t in TOOLS)
    expected = (
        f"<|im_start|>system\n{SYSTEM_PROMPT.format(tools=listing)}<|im_end|>\n"
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
        "\n</tool_call><|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    body = {"inputs": expected, "add_special_tokens": False}
    tokens = requests.post(server.url + "/tokenize", json=body, timeout=10).json()
    assert full.usage is not None and full.usage.prompt_tokens == len(tokens)


def test_bad_tools_and_tool_choices_are_refused_naming_the_field(server: Launcher) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [*TOOLS, TOOLS[0]]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tools"),
    ]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            oai.chat.completions.create(model=base_model(server), messages=WEATHER, extra_body=body)  # type: ignore[arg-type]
        assert caught.value.body["param"] == param, body  # type: ignore[index]


def test_openai_fields_this_server_does_not_honour_are_refused_by_name(server: Launcher) -> None:
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    chat: list[tuple[dict[str, Any], str]] = [
        ({"service_tier": "flex"}, "service_tier"),
        ({"store": True}, "store"),
        ({"metadata": {"k": "v"}}, "metadata"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"functions": [TOOLS[0]["function"]]}, "functions"),
        ({"logit_bias": {"42": 10}}, "logit_bias"),
        ({"extra_body": {"not_a_field": 1}}, "not_a_field"),
    ]
    for kwargs, param in chat:
        with pytest.raises(openai.BadRequestError) as caught:
            oai.chat.completions.create(model=base_model(server), messages=WEATHER, max_tokens=2, **kwargs)  # type: ignore[arg-type]
        assert caught.value.status_code == 400
        assert caught.value.body["param"] == param  # type: ignore[index]
        assert param in caught.value.body["message"]  # type: ignore[index]
    for kwargs, param in [
        ({"best_of": 2}, "best_of"),
        ({"extra_body": {"guided_decoding_backend": "x"}}, "guided_decoding_backend"),
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            oai.completions.create(model=base_model(server), prompt="hi", max_tokens=2, **kwargs)  # type: ignore[arg-type]
        assert caught.value.body["param"] == param  # type: ignore[index]


def test_merged_adapters_write_valid_json_and_metrics_and_openapi_show_structured_output(
    server: Launcher,
) -> None:
    client = AsyncClient(server.url, timeout=300)
    merged = {
        "ids": [ADAPTER, OTHER_ADAPTER],
        "weights": [0.7, 0.5],
        "merge_strategy": "linear",
        "density": 1.0,
    }
    names = ["nested", "array_of_objects", "any_of_objects", "string_pattern_words"]

    async def run() -> list[Any]:
        return list(
            await asyncio.gather(
                *(
                    client.generate(
                        PROMPT,
                        merged_adapters=merged,
                        max_new_tokens=120,
                        response_format={"type": "json_object", "schema": SCHEMAS[name]},
                    )
                    for name in names
                )
            )
        )

    for name, response in zip(names, asyncio.run(run()), strict=True):
        assert response.details.finish_reason.value == "eos_token", (name, response.generated_text)
        jsonschema.validate(json.loads(response.generated_text), SCHEMAS[name])
    metrics = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines()
        if line.startswith("lorax_grammar_")
    }
    assert metrics["lorax_grammar_masks_total"] >= metrics["lorax_grammar_mask_steps_total"] > 0
    assert metrics["lorax_grammar_mask_seconds_total"] > 0
    assert metrics["lorax_grammar_mask_wait_seconds_total"] >= 0  # exported (often ~0: computed ahead)
    schemas = requests.get(server.url + "/openapi.json", timeout=10).json()["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert {"response_format", "tools", "tool_choice", "parallel_tool_calls", "structured_outputs"} <= set(
        chat["properties"]
    )
    assert chat["additionalProperties"] is False
    assert "response_format" in schemas["GenerateParameters"]["properties"]
