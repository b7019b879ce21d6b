"""HTTP request bodies (pydantic): LoRAX's generate API and OpenAI's completions and chat completions.

Field names, types and defaults follow LoRAX's router and OpenAI's API reference. Unknown fields
are ignored on LoRAX's routes, as LoRAX does; on OpenAI's routes a field not declared here is
refused by name (`validation.py`), so nothing a client asks for is silently dropped. Range checks
live in `validation.py`, where the limits are known.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    # Strict types, as LoRAX's serde and OpenAI's API take them: `true` is no penalty of 1.0, "5" and
    # 5.5 are no token counts (pydantic's lax mode would coerce them and run the request).
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), strict=True)


class _Closed(_Body):
    """A nested object of the OpenAI bodies (and the formats LoRAX shares): a key it does not declare
    is refused by name (400), never ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)


class MergedAdapters(_Body):
    ids: list[str]
    weights: list[float]
    merge_strategy: str | None = None  # linear (default), ties, dare_linear, dare_ties
    density: float = 1.0
    majority_sign_method: str | None = None  # total (default), frequency


class JsonSchemaFormat(_Closed):
    """OpenAI's `response_format.json_schema` (what `client.beta.chat.completions.parse` sends)."""

    name: str = ""
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Closed):
    """LoRAX: `{"type": "json_object", "schema": {...}}`; OpenAI: `text`, `json_object`, or
    `{"type": "json_schema", "json_schema": {...}}`."""

    type: str
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Closed):
    """vLLM's `structured_outputs`: at most one of a JSON schema, a regex, a choice list, a grammar."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class GenerateParameters(_Body):
    adapter_id: str | None = None
    adapter_source: str | None = None
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = None
    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    max_new_tokens: int | None = None
    ignore_eos_token: bool = False
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    return_full_text: bool = False
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    return_k_alternatives: int | None = None
    response_format: ResponseFormat | None = None


class GenerateRequest(_Body):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class TokenizeRequest(_Body):
    inputs: str
    add_special_tokens: bool = True


class StreamOptions(_Closed):
    include_usage: bool = False


class _OpenAISampling(_Body):
    # Every field not declared here is kept so validation can refuse it by name: OpenAI's fields
    # this server does not honour are never silently ignored.
    model_config = ConfigDict(
        extra="allow", protected_namespaces=(), json_schema_extra={"additionalProperties": False}
    )

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # Not OpenAI, accepted as vLLM and LoRAX do:
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    adapter_source: str | None = None
    api_token: str | None = None


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Closed):
    type: Literal["text"]
    text: str


class FunctionDefinition(_Closed):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None


class Tool(_Closed):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Closed):
    name: str


class NamedToolChoice(_Closed):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Closed):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Closed):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Closed):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages: the calls it made
    tool_call_id: str | None = None  # tool messages: the call this answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
