"""Every numeric request field is bounded once (the shared SamplingParams, the validation module),
and what the router accepts is exactly what every worker accepts."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest

from loraxpy.proto.sampling import FLOAT_RANGES, SamplingError, SamplingParams, as_float32
from loraxpy.router.errors import ValidationError
from loraxpy.router.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest, TokenizeRequest
from loraxpy.router.validation import (
    Limits,
    choices,
    validate_chat,
    validate_completion,
    validate_generate,
    validate_tokenize,
)
from loraxpy.worker.server import WorkerInputError, sampling_from_proto

LIMITS = Limits(max_input_length=100, max_total_tokens=200, vocab_size=320, max_concurrent_requests=64)


class WordTokenizer:
    """One token per character: enough for validation, which only counts tokens."""

    template_supports_tools = False

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 320 for c in text]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return "".join(m["content"] for m in messages)


TOKENIZER: Any = WordTokenizer()


def generate(**parameters: Any) -> Any:
    return validate_generate(GenerateRequest(inputs="hi", parameters=parameters), LIMITS, TOKENIZER)


def chat(**fields: Any) -> Any:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return validate_chat(ChatCompletionRequest.model_validate(body), LIMITS, TOKENIZER)


# Values finite in Python that are not on the wire (float32 / uint32 / uint64), or that overflow the
# sampler's float32 logits.
HOSTILE_GENERATE = [
    ("top_k", 2**33),
    ("top_k", 321),  # beyond the vocabulary
    ("temperature", 1e39),
    ("temperature", 1e-40),
    ("temperature", 1e9),
    ("repetition_penalty", 1e39),
    ("repetition_penalty", 1e-30),
    ("frequency_penalty", 1e39),
    ("presence_penalty", -1e39),
    ("top_p", 1e-50),
    ("typical_p", 1e-50),
    ("seed", 2**64),
    ("seed", -1),
    ("return_k_alternatives", 2**40),
    ("max_new_tokens", 2**70),
    ("truncate", 2**70),
    ("best_of", 2**70),
]


@pytest.mark.parametrize(("field", "value"), HOSTILE_GENERATE)
def test_generate_refuses_values_beyond_the_wire_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as e:
        generate(**{field: value})
    assert e.value.param == field and field in e.value.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", 2**33),
        ("temperature", 1e39),
        ("temperature", 1e-40),
        ("repetition_penalty", 1e39),
        ("seed", 2**64),
        ("top_logprobs", 2**40),
        ("n", 2**40),
        ("max_tokens", 2**70),
    ],
)
def test_openai_refuses_values_beyond_the_wire_naming_the_field(field: str, value: Any) -> None:
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(ValidationError) as e:
        chat(**{field: value}, **extra)
    assert e.value.param == field


def test_a_greedy_request_still_has_its_seed_checked() -> None:
    with pytest.raises(ValidationError, match="seed"):
        chat(temperature=0, seed=2**64)
    assert chat(temperature=0, seed=5).engine.sampling.seed is None  # greedy: no seed on the wire


def test_merge_weights_are_finite_as_float32() -> None:
    merge = {"ids": ["a", "b"], "weights": [1.0, 1e39]}
    with pytest.raises(ValidationError, match="merged_adapters"):
        generate(merged_adapters=merge)


def test_a_prompt_list_times_n_counts_every_generation() -> None:
    request = CompletionRequest(prompt=["a"] * 8, n=9)  # 72 generations, limit 64
    with pytest.raises(ValidationError) as e:
        validate_completion(request, LIMITS, TOKENIZER)
    assert e.value.param == "n" and "72" in e.value.message
    assert len(validate_completion(CompletionRequest(prompt=["a"] * 8, n=8), LIMITS, TOKENIZER)) == 8


def test_tokenize_is_capped_before_and_after_tokenizing() -> None:
    with pytest.raises(ValidationError, match="characters"):
        validate_tokenize(TokenizeRequest(inputs="x" * 10**6), LIMITS, TOKENIZER)
    with pytest.raises(ValidationError, match="tokens"):
        validate_tokenize(TokenizeRequest(inputs="x" * 201), LIMITS, TOKENIZER)
    assert len(validate_tokenize(TokenizeRequest(inputs="x" * 200), LIMITS, TOKENIZER)) == 200


def test_long_stop_sequences_are_refused() -> None:
    with pytest.raises(ValidationError, match="stop"):
        generate(stop=["x" * 5000])


def test_floats_are_judged_as_float32() -> None:
    assert as_float32(1e39) is None and as_float32(float("nan")) is None and as_float32(float("inf")) is None
    assert as_float32(3.4e38) is not None
    with pytest.raises(SamplingError) as e:
        SamplingParams(do_sample=True, temperature=1e39)
    assert e.value.field == "temperature"


EDGES = {
    "temperature": [1e-45, 1e-5, 1e-4, 1.0, 100.0, 100.00001, 1e38, 1e39],
    "top_p": [1e-46, 1e-30, 1.0, 1.0000001],
    "repetition_penalty": [1e-3, 1e-2, 1.0, 100.0, 1e39],
    "frequency_penalty": [-2.0000001, -2.0, 2.0, 3.0],
    "top_k": [0, 1, 2**32 - 1, 2**32],
    "seed": [0, 2**64 - 1, 2**64],
}


@pytest.mark.parametrize("field", sorted(EDGES))
def test_what_the_router_accepts_every_worker_accepts_unchanged(field: str) -> None:
    for value in EDGES[field]:
        try:
            params = SamplingParams(do_sample=True, **{field: value})
        except SamplingError:
            continue
        on_worker = sampling_from_proto(params.to_proto())  # raises if the worker refuses
        if field in FLOAT_RANGES:
            assert getattr(on_worker, field) == as_float32(value)
        else:
            assert getattr(on_worker, field) == value


def test_every_float_field_has_a_finite_float32_range() -> None:
    for bounds in FLOAT_RANGES.values():
        for end in (bounds.low, bounds.high):
            assert as_float32(end) is not None
    # The sampler divides logits by temperature and repetition_penalty: neither may reach zero.
    assert FLOAT_RANGES["temperature"].low > 0 and FLOAT_RANGES["repetition_penalty"].low > 0


def test_n_choices_sample_independently_and_a_seeded_request_stays_reproducible() -> None:
    seeded = choices(chat(temperature=1.0, seed=7, n=3), 3)
    seeds = [c.engine.sampling.seed for c in seeded]
    assert seeds[0] == 7 and len(set(seeds)) == 3, "each choice draws from its own generator"
    assert [c.seed for c in seeded] == seeds, "details report the seed each choice used"
    assert [c.engine.sampling.seed for c in choices(chat(temperature=1.0, seed=7, n=3), 3)] == seeds
    unseeded = [c.engine.sampling.seed for c in choices(chat(temperature=1.0, n=3), 3)]
    assert len(set(unseeded)) == 3
    greedy = choices(chat(temperature=0, n=2), 2)
    assert greedy[0] is greedy[1], "greedy choices are the same computation"


def test_sampling_params_mirror_the_wire_and_every_field_crosses_it() -> None:
    from loraxpy.proto import worker_pb2 as pb

    assert [f.name for f in fields(SamplingParams)] == [f.name for f in pb.SamplingParams.DESCRIPTOR.fields]
    params = SamplingParams(
        do_sample=True,
        temperature=0.5,
        top_k=7,
        top_p=0.75,
        typical_p=0.5,
        repetition_penalty=1.25,
        frequency_penalty=-0.5,
        presence_penalty=0.25,
        seed=0,  # 0 is a seed, not an unset one
        top_logprobs=3,
        prompt_logprobs=True,
    )
    assert all(getattr(params, f.name) != f.default for f in fields(SamplingParams))
    assert sampling_from_proto(params.to_proto()) == params
    assert sampling_from_proto(pb.SamplingParams()) == SamplingParams()  # proto3's zeros: the defaults
    with pytest.raises(WorkerInputError, match="top_logprobs"):
        sampling_from_proto(pb.SamplingParams(top_logprobs=21))
