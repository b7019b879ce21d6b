"""Request bodies take JSON types strictly, as LoRAX's serde and OpenAI's API do (found by fuzzing)."""

from __future__ import annotations

import pydantic
import pytest

from loraxpy.router.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest


@pytest.mark.parametrize(
    "parameters",
    [
        {"presence_penalty": True},  # lax mode read it as a penalty of 1.0
        {"max_new_tokens": "5"},
        {"max_new_tokens": 5.5},
        {"do_sample": "yes"},
        {"stop": "a"},
    ],
    ids=str,
)
def test_generate_parameters_of_the_wrong_json_type_are_refused(parameters: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        GenerateRequest.model_validate({"inputs": "x", "parameters": parameters})


def test_bodies_of_the_right_types_are_read_with_nested_objects() -> None:
    req = GenerateRequest.model_validate(
        {
            "inputs": "x",
            "parameters": {"temperature": 1, "max_new_tokens": 4, "response_format": {"type": "text"}},
        }
    )
    assert req.parameters.temperature == 1.0 and req.parameters.max_new_tokens == 4
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "tool_choice": "auto"}
    )
    assert chat.messages[0].text() == "hi"
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest.model_validate({"prompt": "x", "n": True})
