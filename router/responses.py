"""Response bodies: LoRAX's generate / stream shapes and OpenAI's completion / chat shapes.

A finished generation is collected into a `Generation` once, and every route renders from it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from loraxpy.router.engine import TokenEvent
from loraxpy.router.scheduler import FinishReason
from loraxpy.router.text import Tokenizer
from loraxpy.router.tools import ToolCallStream, read_calls
from loraxpy.router.validation import ValidRequest

OPENAI_FINISH = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.ABORTED: "stop",
}


@dataclass
class Generation:
    request: ValidRequest
    events: list[TokenEvent] = field(default_factory=list)
    prompt_logprobs: dict[int, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    queue_s: float | None = None  # from admission to the first step that computed it

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def finish_reason(self) -> FinishReason:
        reason = self.events[-1].finish_reason if self.events else None
        return reason or FinishReason.LENGTH

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.engine.input_ids)


def token_body(tok: Tokenizer, e: TokenEvent) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": e.token_id,
        "text": tok.decode([e.token_id], skip_special_tokens=False),
        "logprob": e.logprob,
        "special": e.token_id in tok.special_ids,
    }
    if e.top_logprobs:
        body["alternative_tokens"] = [
            {"id": t, "text": tok.decode([t], skip_special_tokens=False), "logprob": lp}
            for t, lp in e.top_logprobs
        ]
    return body


def prefill_body(tok: Tokenizer, g: Generation) -> list[dict[str, Any]]:
    if not g.request.decoder_input_details:
        return []
    ids = g.request.engine.input_ids
    return [
        {"id": t, "text": tok.decode([t], skip_special_tokens=False), "logprob": g.prompt_logprobs.get(i)}
        for i, t in enumerate(ids)
    ]


def generate_body(tok: Tokenizer, g: Generation) -> dict[str, Any]:
    text = g.text
    if g.request.return_full_text:
        text = g.request.prompt_text + text
    body: dict[str, Any] = {"generated_text": text}
    if g.request.details:
        body["details"] = {
            "finish_reason": g.finish_reason.value,
            "prompt_tokens": g.num_prompt_tokens,
            "generated_tokens": len(g.events),
            "seed": g.request.seed,
            "prefill": prefill_body(tok, g),
            "tokens": [token_body(tok, e) for e in g.events],
            "skipped": 0,
            "skipped_tokens": 0,
            "best_of_sequences": None,
        }
    return body


def stream_event_body(tok: Tokenizer, g: Generation, e: TokenEvent) -> dict[str, Any]:
    body: dict[str, Any] = {"token": token_body(tok, e), "generated_text": None, "details": None}
    if e.finish_reason is not None:
        text = g.text
        body["generated_text"] = g.request.prompt_text + text if g.request.return_full_text else text
        body["details"] = {
            "finish_reason": e.finish_reason.value,
            "prompt_tokens": g.num_prompt_tokens,
            "generated_tokens": len(g.events),
            "seed": g.request.seed,
        }
    return body


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(gens: list[Generation]) -> dict[str, int]:
    prompt = sum(g.num_prompt_tokens for g in gens)
    completion = sum(len(g.events) for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(tok: Tokenizer, g: Generation) -> dict[str, Any]:
    tokens = [tok.decode([e.token_id], skip_special_tokens=False) for e in g.events]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in g.events],
        "top_logprobs": [
            {tok.decode([t], skip_special_tokens=False): lp for t, lp in e.top_logprobs} for e in g.events
        ],
        "text_offset": offsets,
    }


def chat_logprobs(tok: Tokenizer, events: list[TokenEvent]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tok.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs]}
            for e in events
        ]
    }


def completion_body(
    tok: Tokenizer, model: str, gens: list[Generation], want_logprobs: bool
) -> dict[str, Any]:
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "text": g.text,
                "logprobs": completion_logprobs(tok, g) if want_logprobs else None,
                "finish_reason": OPENAI_FINISH[g.finish_reason],
            }
            for i, g in enumerate(gens)
        ],
        "usage": usage(gens),
    }


def chat_message(g: Generation) -> tuple[dict[str, Any], str]:
    """The assistant message of a finished chat generation and its finish reason: with tools, calls
    read back from the text (finish reason `tool_calls`); a call cut short by length stays text."""
    finish = OPENAI_FINISH[g.finish_reason]
    if g.request.parse_tool_calls and g.finish_reason is not FinishReason.LENGTH:
        content, calls = read_calls(g.text)
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": g.text}, finish


def tool_stream_choices(stream: ToolCallStream, e: TokenEvent) -> list[dict[str, Any]]:
    """One chat event of a choice with tools as stream choices (without `index`): content and
    tool-call deltas as the text arrives, and at the end the finish (`tool_calls` after calls)."""
    deltas = stream.push(e.text)
    if e.finish_reason is None:
        return [{"delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
    deltas += stream.finish()
    finish = OPENAI_FINISH[e.finish_reason]
    if stream.num_calls and e.finish_reason is not FinishReason.LENGTH:
        finish = "tool_calls"
    out = [{"delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
    return [*out, {"delta": {}, "logprobs": None, "finish_reason": finish}]


def _chat_choice(tok: Tokenizer, i: int, g: Generation, want_logprobs: bool) -> dict[str, Any]:
    message, finish = chat_message(g)
    return {
        "index": i,
        "message": message,
        "logprobs": chat_logprobs(tok, g.events) if want_logprobs else None,
        "finish_reason": finish,
    }


def chat_body(tok: Tokenizer, model: str, gens: list[Generation], want_logprobs: bool) -> dict[str, Any]:
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [_chat_choice(tok, i, g, want_logprobs) for i, g in enumerate(gens)],
        "usage": usage(gens),
    }
