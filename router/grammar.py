"""Structured output: grammars compiled by llguidance, one matcher per request, packed token masks.

The router owns text, so it owns grammars. A request's JSON schema, regex, choice list or Lark
grammar is compiled once (cached by its text) into a template matcher; each generation gets a copy,
advanced with every token the workers sample. Before a step, the engine asks every constrained
request in it for the mask of tokens allowed next: packed bits, bit t % 32 of little-endian uint32
word t // 32 (so bit t % 8 of byte t // 8), one word per 32 vocabulary rows of the model — what
the workers apply to the logits before sampling. The model's EOS tokens are allowed exactly where
the grammar may end; a grammar that can take nothing more ends the request.

A matcher keeps the mask of its current state once computed, until it takes its next token, so the
engine can compute the next step's masks off its critical path (router/engine.py: on a thread, as
soon as a step's tokens are in) and the step finds them ready.
"""

from __future__ import annotations

import ctypes
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import llguidance

GrammarKind = Literal["json_schema", "regex", "choice", "lark"]

# Compact JSON: no free whitespace between tokens, so a model cannot spend its tokens on blanks and
# every output is as short as the values it carries. A schema's own "x-guidance" options override it.
JSON_DEFAULTS: dict[str, Any] = {"whitespace_flexible": False}
MAX_CACHED_GRAMMARS = 256


class GrammarError(ValueError):
    """The grammar engine refused a schema, regex, choice list or grammar; the message is its own."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to. `value`: a JSON schema (dict), a regex, a list of
    choices, or a Lark grammar."""

    kind: GrammarKind
    value: Any

    def key(self) -> str:
        return self.kind + ":" + json.dumps(self.value, sort_keys=True, separators=(",", ":"))


def _grammar_text(spec: GrammarSpec) -> str:
    if spec.kind == "json_schema":
        return str(llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_DEFAULTS))  # type: ignore[arg-type]
    if spec.kind == "regex":
        return str(llguidance.LLMatcher.grammar_from_regex(spec.value))
    if spec.kind == "choice":
        lark = "start: " + " | ".join(json.dumps(c) for c in spec.value)
        return str(llguidance.LLMatcher.grammar_from_lark(lark))
    return str(llguidance.grammar_from("grammar", spec.value))


@dataclass(frozen=True)
class CompiledGrammar:
    """A compiled grammar in its start state: each generation runs its own copy."""

    spec: GrammarSpec
    template: llguidance.LLMatcher
    eos_token_ids: frozenset[int]
    initial_mask: bytes  # the first step's mask, computed once at compile time

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self.template.deep_copy(), self.eos_token_ids, self.initial_mask)


class GrammarMatcher:
    """One generation's position in its grammar."""

    def __init__(
        self, matcher: llguidance.LLMatcher, eos_token_ids: frozenset[int], initial_mask: bytes
    ) -> None:
        self._matcher = matcher
        self._eos = eos_token_ids
        self._mask: bytes | None = initial_mask  # the current state's mask; None until computed
        self.is_done = False  # the grammar ended (EOS taken, or nothing more can follow)
        self.error = ""

    @property
    def llmatcher(self) -> llguidance.LLMatcher:
        return self._matcher

    @property
    def cached_mask(self) -> bytes | None:
        """The mask of the tokens allowed next, if computed since the last token."""
        return self._mask

    def advance(self, token_id: int) -> None:
        """Takes a sampled token. An EOS ends the grammar (the mask allowed it only where it may end)."""
        self._mask = None
        if token_id in self._eos:
            self.is_done = True
            return
        if not self._matcher.consume_token(token_id):
            self.error = self._matcher.get_error() or f"token {token_id} is not allowed by the grammar"
            self.is_done = True
            return
        # Stopped: nothing but EOS may follow; end here rather than spend a step on the EOS.
        self.is_done = self._matcher.is_stopped()


class GrammarCompiler:
    """Compiles grammars for one model's tokenizer and vocabulary; thread-safe (validation threads)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self._eos = list(eos_token_ids)
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._executor: llguidance.LLExecutor | None = None

    @classmethod
    def for_model(cls, model_path: Path, vocab_size: int, eos_token_ids: tuple[int, ...]) -> GrammarCompiler:
        """For the model's tokenizer.json; the vocabulary is the model's (its LM head's rows)."""
        return cls((model_path / "tokenizer.json").read_text(), vocab_size, eos_token_ids)

    @property
    def mask_bytes(self) -> int:
        return 4 * ((self.vocab_size + 31) // 32)

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (about 0.3 s for a 49k vocabulary), under the lock. A tokenizer the
        grammar engine cannot read (no byte decoding it knows) makes every grammar a GrammarError,
        refused with the request's field, not a 500."""
        if self._tokenizer is None:
            try:
                self._tokenizer = llguidance.LLTokenizer(
                    self._tokenizer_json, n_vocab=self.vocab_size, eos_token=self._eos or None
                )
            except ValueError as e:
                raise GrammarError(
                    f"structured output is not available for this model: the grammar engine cannot read "
                    f"its tokenizer ({e})"
                ) from None
        return self._tokenizer

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar (from the cache when seen before); GrammarError with the engine's message."""
        key = spec.key()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
            tokenizer = self._llg_tokenizer()
        try:
            text = _grammar_text(spec)
        except (ValueError, TypeError) as e:
            raise GrammarError(str(e)) from None
        matcher = llguidance.LLMatcher(tokenizer, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        compiled = CompiledGrammar(spec, matcher, self.eos_token_ids, self._mask_of(matcher))
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def _mask_of(self, matcher: llguidance.LLMatcher) -> bytes:
        # compute_bitmask may pad past the vocabulary (a whole spare word); the wire takes exactly mask_bytes.
        return self._with_all_eos(bytearray(matcher.compute_bitmask()[: self.mask_bytes]))

    def _with_all_eos(self, mask: bytearray) -> bytes:
        """llguidance allows its one EOS where the grammar may end; the model's others go with it."""
        if len(self._eos) > 1 and mask[self._eos[0] // 8] >> (self._eos[0] % 8) & 1:
            for t in self._eos[1:]:
                mask[t // 8] |= 1 << (t % 8)
        return bytes(mask)

    def masks(self, matchers: list[GrammarMatcher]) -> list[bytes]:
        """The next-token mask of each matcher, kept by the matcher until its next token; several at
        once run on llguidance's threads (no GIL). One caller at a time, and no one may use these
        matchers meanwhile (llguidance holds them for the call)."""
        out: list[bytes | None] = [m.cached_mask for m in matchers]
        todo = [i for i, m in enumerate(out) if m is None]
        if len(todo) == 1:
            out[todo[0]] = self._mask_of(matchers[todo[0]].llmatcher)
        elif todo:
            size = self.mask_bytes
            buffer = bytearray(size * len(todo))
            pointer = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            pairs = [(matchers[i].llmatcher, k) for k, i in enumerate(todo)]
            self._executor.unsafe_compute_mask_ptr(pairs, pointer, size, len(todo))
            for k, i in enumerate(todo):
                out[i] = self._with_all_eos(buffer[k * size : (k + 1) * size])
        for i in todo:
            matchers[i]._mask = out[i]
        return [m for m in out if m is not None]


@dataclass
class MaskTimer:
    """The per-step cost of structured output in the router: `seconds` computing masks (wherever
    they are computed), `wait_seconds` of it on the engine loop's critical path (waiting for masks
    computed ahead, or computing those that were not), `num_steps` steps that carried masks and
    `num_masks` masks they carried."""

    seconds: float = 0.0
    wait_seconds: float = 0.0
    num_steps: int = 0
    num_masks: int = 0

    def computed(self, started: float) -> None:
        self.seconds += time.perf_counter() - started

    def waited(self, started: float) -> None:
        self.wait_seconds += time.perf_counter() - started

    def sent(self, num_masks: int) -> None:
        self.num_steps += 1
        self.num_masks += num_masks
