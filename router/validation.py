"""Turns HTTP bodies into validated engine inputs; every refusal names its field (LoRAX's wording)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace

from loraxpy.proto.sampling import MAX_TOP_LOGPROBS, SamplingError, SamplingParams, as_float32
from loraxpy.router.engine import GenerateInput
from loraxpy.router.errors import ValidationError
from loraxpy.router.grammar import CompiledGrammar, GrammarCompiler
from loraxpy.router.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateParameters,
    GenerateRequest,
    MergedAdapters,
    TokenizeRequest,
)
from loraxpy.router.structured import compile_spec, lorax_spec, openai_spec
from loraxpy.router.text import TemplateError, Tokenizer
from loraxpy.router.tools import plan_tools
from loraxpy.router.worker_client import AdapterMerge

# A stop sequence is matched against every new piece of text on the event loop; a cap keeps that
# cheap (the matcher holds back at most this many characters).
MAX_STOP_SEQUENCE_CHARS = 1024


@dataclass(frozen=True)
class Limits:
    max_input_length: int
    max_total_tokens: int
    max_stop_sequences: int = 4
    max_best_of: int = 2
    default_adapter_source: str = "hub"
    base_model_id: str = ""
    default_adapter_id: str | None = None
    vocab_size: int = 0  # the model's; 0: unknown (top_k is then bounded by its wire type only)
    max_concurrent_requests: int = 128  # one HTTP request's generations (prompts × n) must fit


@dataclass(frozen=True)
class ValidRequest:
    """Everything the engine and the response builders need."""

    engine: GenerateInput
    stop: tuple[str, ...]
    seed: int | None  # reported back in details when sampling
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    prompt_text: str = ""
    # LoRAX keeps a matched stop sequence in generated_text; OpenAI drops it.
    include_stop: bool = False
    adapter_id: str | None = None  # None: the base model
    adapter_source: str = "hub"
    api_token: str = field(default="", repr=False)  # secret: never logged
    merge: AdapterMerge | None = None  # adapter_id is then the merge's key
    parse_tool_calls: bool = False  # chat with tools: read tool calls back from the output
    end_user: str | None = None  # OpenAI's `user`: the request's trace span carries it (enduser.id)


ADAPTER_SOURCES = ("hub", "local", "s3")
MAX_END_USER_CHARS = 256  # OpenAI's `user`, an id for abuse monitoring: kept on the trace span


def _adapter(adapter_id: str | None, source: str | None, limits: Limits) -> tuple[str | None, str]:
    source = source or limits.default_adapter_source
    if source not in ADAPTER_SOURCES:
        raise ValidationError(
            f"`adapter_source` must be one of {', '.join(ADAPTER_SOURCES)}", param="adapter_source"
        )
    adapter_id = adapter_id or limits.default_adapter_id
    if not adapter_id or adapter_id == limits.base_model_id:
        return None, source
    return adapter_id, source


def chat_adapter(req: ChatCompletionRequest, limits: Limits) -> tuple[str | None, str]:
    """The adapter a chat request names in `model` (None: the base model), and its source."""
    return _adapter(req.model, req.adapter_source, limits)


def adapter_for(adapter_id: str | None, source: str | None, limits: Limits) -> tuple[str | None, str]:
    """The adapter a request names (None: the base model) and its source."""
    return _adapter(adapter_id, source, limits)


def _check_sampling(
    p: GenerateParameters | CompletionRequest | ChatCompletionRequest, limits: Limits, openai: bool
) -> None:
    """What each API means by its fields; the numeric bounds themselves belong to SamplingParams."""
    t = p.temperature
    if t is not None and (t < 0 if openai else t <= 0):
        raise ValidationError(
            "`temperature` must be strictly positive" if not openai else "`temperature` must be non-negative",
            param="temperature",
        )
    if not openai and p.top_p is not None and p.top_p >= 1.0:
        raise ValidationError("`top_p` must be > 0.0 and < 1.0", param="top_p")
    if p.top_k is not None and p.top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive", param="top_k")
    if limits.vocab_size and p.top_k is not None and p.top_k > limits.vocab_size:
        raise ValidationError(
            f"`top_k` must be at most the vocabulary size ({limits.vocab_size}). Given: {p.top_k}",
            param="top_k",
        )
    typical_p = getattr(p, "typical_p", None)
    if typical_p is not None and typical_p >= 1.0:
        raise ValidationError("`typical_p` must be > 0.0 and < 1.0", param="typical_p")


def _sampling(
    *,
    do_sample: bool,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    typical_p: float | None,
    repetition_penalty: float | None,
    frequency_penalty: float | None,
    presence_penalty: float | None,
    seed: int | None,
    top_logprobs: int,
    top_logprobs_field: str,
    prompt_logprobs: bool,
) -> SamplingParams:
    """The request's SamplingParams; a value outside the shared bounds is refused naming its field.

    Every given value is checked, even one a greedy request ignores (a seed), so what passes here
    is what any worker accepts.
    """
    try:
        params = SamplingParams.given(
            do_sample=do_sample,
            temperature=temperature if do_sample else None,  # greedy: the default
            top_k=top_k,
            top_p=top_p,
            typical_p=typical_p,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            seed=seed,
            top_logprobs=top_logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except SamplingError as e:
        field = top_logprobs_field if e.field == "top_logprobs" else e.field
        raise ValidationError(f"`{field}` {e.requirement}", param=field) from None
    if not do_sample:
        return replace(params, seed=None)
    if seed is None:
        return replace(params, seed=random.getrandbits(63))
    return params


def _length(input_ids: list[int], max_new_tokens: int | None, limits: Limits, field: str) -> int:
    n = len(input_ids)
    if n == 0:
        raise ValidationError("`inputs` cannot be empty", param="inputs")
    if n > limits.max_input_length:
        raise ValidationError(
            f"`inputs` must have less than {limits.max_input_length} tokens. Given: {n}", param="inputs"
        )
    if max_new_tokens is None:
        max_new_tokens = limits.max_total_tokens - n
        if max_new_tokens <= 0:
            raise ValidationError(
                f"`inputs` leaves no room to generate within {limits.max_total_tokens} tokens", param="inputs"
            )
    if max_new_tokens <= 0:
        raise ValidationError(f"`{field}` must be strictly positive", param=field)
    if n + max_new_tokens > limits.max_total_tokens:
        raise ValidationError(
            f"`inputs` tokens + `{field}` must be <= {limits.max_total_tokens}. "
            f"Given: {n} `inputs` tokens and {max_new_tokens} `{field}`",
            param=field,
        )
    return max_new_tokens


def _stops(stop: list[str], limits: Limits) -> tuple[str, ...]:
    if len(stop) > limits.max_stop_sequences:
        raise ValidationError(
            f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(stop)}",
            param="stop",
        )
    if any(len(s) > MAX_STOP_SEQUENCE_CHARS for s in stop):
        raise ValidationError(
            f"`stop` sequences must be at most {MAX_STOP_SEQUENCE_CHARS} characters long", param="stop"
        )
    return tuple(s for s in stop if s)


# Tokenizing is the cost /tokenize must cap, so text is refused by length before it is tokenized:
# at a generous number of characters per token allowed (ordinary text runs about 4).
MAX_CHARS_PER_TOKEN = 16


def validate_tokenize(req: TokenizeRequest, limits: Limits, tokenizer: Tokenizer) -> list[int]:
    """/tokenize's token ids, capped at the most tokens any request here may hold."""
    cap = limits.max_total_tokens
    if len(req.inputs) > cap * MAX_CHARS_PER_TOKEN:
        raise ValidationError(
            f"`inputs` must have at most {cap * MAX_CHARS_PER_TOKEN} characters. Given: {len(req.inputs)}",
            param="inputs",
        )
    ids = tokenizer.encode(req.inputs, add_special_tokens=req.add_special_tokens)
    if len(ids) > cap:
        raise ValidationError(f"`inputs` must have at most {cap} tokens. Given: {len(ids)}", param="inputs")
    return ids


def validate_generate(
    req: GenerateRequest, limits: Limits, tokenizer: Tokenizer, grammars: GrammarCompiler | None = None
) -> ValidRequest:
    p = req.parameters
    if not req.inputs:
        raise ValidationError("`inputs` cannot be empty", param="inputs")
    _check_sampling(p, limits, openai=False)
    if p.best_of is not None and not 0 < p.best_of <= limits.max_best_of:
        raise ValidationError(
            f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {p.best_of}", param="best_of"
        )
    if p.best_of is not None and p.best_of > 1:
        raise ValidationError("`best_of` > 1 is not supported by this server", param="best_of")
    if p.return_k_alternatives is not None and not 0 < p.return_k_alternatives <= MAX_TOP_LOGPROBS:
        raise ValidationError(
            f"`return_k_alternatives` must be in [1, {MAX_TOP_LOGPROBS}]", param="return_k_alternatives"
        )
    if p.watermark:
        raise ValidationError("`watermark` is not supported by this server", param="watermark")
    grammar = compile_spec(lorax_spec(p.response_format), "response_format", grammars)
    adapter_id, adapter_source = _adapter(p.adapter_id, p.adapter_source, limits)
    merge = None
    if p.merged_adapters is not None:
        if p.adapter_id:
            raise ValidationError(
                "set either `adapter_id` or `merged_adapters`, not both", param="merged_adapters"
            )
        merge = _merge(p.merged_adapters)
        adapter_id = merge.key
    do_sample = (
        p.do_sample
        or any(v is not None for v in (p.top_k, p.top_p, p.typical_p))
        or (p.temperature is not None and p.temperature != 1.0)
    )
    sampling = _sampling(
        do_sample=do_sample,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        typical_p=p.typical_p,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        seed=p.seed,
        top_logprobs=p.return_k_alternatives or 0,
        top_logprobs_field="return_k_alternatives",
        prompt_logprobs=p.decoder_input_details,
    )
    stop = _stops(p.stop, limits)
    input_ids = tokenizer.encode(req.inputs)
    if p.truncate is not None:
        if not 0 < p.truncate <= limits.max_input_length:
            raise ValidationError(
                f"`truncate` must be strictly positive and less than {limits.max_input_length}. Given: {p.truncate}",
                param="truncate",
            )
        input_ids = input_ids[-p.truncate :]
    max_new_tokens = _length(input_ids, p.max_new_tokens, limits, "max_new_tokens")
    return ValidRequest(
        engine=GenerateInput(
            tuple(input_ids), max_new_tokens, sampling, ignore_eos=p.ignore_eos_token, grammar=grammar
        ),
        stop=stop,
        seed=sampling.seed,
        details=p.details,
        decoder_input_details=p.decoder_input_details,
        return_full_text=p.return_full_text,
        prompt_text=req.inputs,
        include_stop=True,
        adapter_id=adapter_id,
        adapter_source=adapter_source,
        api_token=p.api_token or "",
        merge=merge,
    )


MAX_MERGED_ADAPTERS = 32
MERGE_STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
MAJORITY_SIGN_METHODS = ("total", "frequency")


def _merge(m: MergedAdapters) -> AdapterMerge:
    param = "merged_adapters"
    if not m.ids:
        raise ValidationError("`merged_adapters.ids` cannot be empty", param=param)
    if len(m.ids) > MAX_MERGED_ADAPTERS:
        raise ValidationError(f"`merged_adapters` merges at most {MAX_MERGED_ADAPTERS} adapters", param=param)
    if len(m.weights) != len(m.ids):
        raise ValidationError("`merged_adapters.ids` and `weights` must have the same length", param=param)
    if not all(i for i in m.ids):
        raise ValidationError("`merged_adapters.ids` cannot contain empty ids", param=param)
    if any(as_float32(w) is None for w in m.weights):  # weights travel as float32
        raise ValidationError("`merged_adapters.weights` must be finite numbers", param=param)
    strategy = m.merge_strategy or "linear"
    if strategy not in MERGE_STRATEGIES:
        raise ValidationError(
            f"`merged_adapters.merge_strategy` must be one of {', '.join(MERGE_STRATEGIES)}", param=param
        )
    sign = m.majority_sign_method or "total"
    if sign not in MAJORITY_SIGN_METHODS:
        raise ValidationError(
            f"`merged_adapters.majority_sign_method` must be one of {', '.join(MAJORITY_SIGN_METHODS)}",
            param=param,
        )
    if not (as_float32(m.density) is not None and 0.0 <= m.density <= 1.0):
        raise ValidationError("`merged_adapters.density` must be >= 0.0 and <= 1.0", param=param)
    return AdapterMerge(tuple(m.ids), tuple(m.weights), strategy, m.density, sign)


def _refuse_unknown(req: CompletionRequest | ChatCompletionRequest) -> None:
    """OpenAI fields this server does not honour (and fields OpenAI does not have) are refused by name."""
    for name in sorted(req.model_extra or {}):
        raise ValidationError(f"`{name}` is not supported by this server", param=name)
    if isinstance(req, CompletionRequest) and req.best_of is not None and req.best_of != 1:
        raise ValidationError("`best_of` other than 1 is not supported by this server", param="best_of")


def _openai_common(req: CompletionRequest | ChatCompletionRequest, limits: Limits) -> None:
    _refuse_unknown(req)
    _check_sampling(req, limits, openai=True)
    max_n = limits.max_best_of * 8
    if not 1 <= req.n <= max_n:
        raise ValidationError(f"`n` must be between 1 and {max_n}", param="n")
    if req.logit_bias:
        raise ValidationError("`logit_bias` is not supported by this server", param="logit_bias")
    if req.user is not None and len(req.user) > MAX_END_USER_CHARS:
        raise ValidationError(f"`user` must be at most {MAX_END_USER_CHARS} characters", param="user")


def validate_openai(
    req: CompletionRequest | ChatCompletionRequest,
    prompt: str,
    limits: Limits,
    tokenizer: Tokenizer,
    *,
    add_special_tokens: bool,
    top_logprobs: int,
    top_logprobs_field: str,
    max_tokens: int | None,
    grammar: CompiledGrammar | None = None,
) -> ValidRequest:
    _openai_common(req, limits)
    temperature = 1.0 if req.temperature is None else req.temperature
    sampling = _sampling(
        do_sample=temperature > 0,
        temperature=temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        typical_p=None,
        repetition_penalty=req.repetition_penalty,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        seed=req.seed,
        top_logprobs=top_logprobs,
        top_logprobs_field=top_logprobs_field,
        prompt_logprobs=False,
    )
    stop = _stops([req.stop] if isinstance(req.stop, str) else list(req.stop or []), limits)
    adapter_id, adapter_source = _adapter(req.model, req.adapter_source, limits)
    input_ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    max_new_tokens = _length(input_ids, max_tokens, limits, "max_tokens")
    return ValidRequest(
        engine=GenerateInput(
            tuple(input_ids), max_new_tokens, sampling, ignore_eos=req.ignore_eos, grammar=grammar
        ),
        stop=stop,
        seed=sampling.seed,
        prompt_text=prompt,
        adapter_id=adapter_id,
        adapter_source=adapter_source,
        api_token=req.api_token or "",
        end_user=req.user,
    )


def choices(valid: ValidRequest, n: int) -> list[ValidRequest]:
    """`n` independent choices of one prompt (OpenAI's `n`): choice i > 0 samples with a seed derived
    from the request's, so a seeded request stays reproducible; greedy choices are plain copies."""
    seed = valid.engine.sampling.seed
    if n <= 1 or not valid.engine.sampling.do_sample or seed is None:
        return [valid] * n
    out = [valid]
    for i in range(1, n):
        digest = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
        derived = int.from_bytes(digest, "big") >> 1  # 63 bits, like a seed the router draws
        sampling = replace(valid.engine.sampling, seed=derived)
        out.append(replace(valid, engine=replace(valid.engine, sampling=sampling), seed=derived))
    return out


def check_num_choices(num_prompts: int, n: int, limits: Limits) -> None:
    """One HTTP request runs prompts × n generations; more than the server runs at once never fits."""
    total = num_prompts * max(n, 1)
    if total > limits.max_concurrent_requests:
        raise ValidationError(
            f"this request asks for {total} generations ({num_prompts} prompt(s) × `n` = {n}); "
            f"the server runs at most {limits.max_concurrent_requests} at once",
            param="n" if n > 1 else "prompt",
        )


def openai_grammar(
    req: CompletionRequest | ChatCompletionRequest, grammars: GrammarCompiler | None
) -> CompiledGrammar | None:
    """The grammar an OpenAI request's structured-output fields ask for, compiled (or refused)."""
    spec, param = openai_spec(req)
    return compile_spec(spec, param, grammars)


def validate_completion(
    req: CompletionRequest, limits: Limits, tokenizer: Tokenizer, grammars: GrammarCompiler | None = None
) -> list[ValidRequest]:
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts:
        raise ValidationError("`prompt` cannot be empty", param="prompt")
    if req.logprobs is not None and not 0 <= req.logprobs <= 5:
        raise ValidationError("`logprobs` must be between 0 and 5", param="logprobs")
    if req.echo or req.suffix:
        raise ValidationError("`echo` and `suffix` are not supported by this server", param="echo")
    check_num_choices(len(prompts), req.n, limits)
    grammar = openai_grammar(req, grammars)
    return [
        validate_openai(
            req,
            p,
            limits,
            tokenizer,
            add_special_tokens=True,
            top_logprobs=req.logprobs or 0,
            top_logprobs_field="logprobs",
            max_tokens=req.max_tokens if req.max_tokens is not None else 16,
            grammar=grammar,
        )
        for p in prompts
    ]


def validate_chat(
    req: ChatCompletionRequest, limits: Limits, tokenizer: Tokenizer, grammars: GrammarCompiler | None = None
) -> ValidRequest:
    if not req.messages:
        raise ValidationError("`messages` cannot be empty", param="messages")
    check_num_choices(1, req.n, limits)
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ValidationError(
            f"`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs"
        )
    tools = plan_tools(req, tokenizer.template_supports_tools)
    grammar = openai_grammar(req, grammars)
    if tools.grammar is not None:
        if grammar is not None:
            raise ValidationError(
                "`tools` cannot be combined with `response_format` or structured outputs", param="tools"
            )
        grammar = compile_spec(tools.grammar, "tools", grammars)
    try:
        template_kwargs = {"tools": tools.template_tools} if tools.template_tools else {}
        prompt = tokenizer.apply_chat_template(tools.messages, add_generation_prompt=True, **template_kwargs)
    except TemplateError as e:
        raise ValidationError(f"chat template: {e}", param="messages") from e
    top = (req.top_logprobs or 0) if req.logprobs else 0
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    # The template already wrote the special tokens it wants.
    valid = validate_openai(
        req,
        prompt,
        limits,
        tokenizer,
        add_special_tokens=False,
        top_logprobs=top,
        top_logprobs_field="top_logprobs",
        max_tokens=max_tokens,
        grammar=grammar,
    )
    return replace(valid, parse_tool_calls=tools.parse_calls)
