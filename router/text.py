"""Text for the router: tokenizer, chat template, incremental detokenization and stop sequences.

Needs no torch: `tokenizers` for the vocabulary, jinja2 for chat templates (rendered the way HF
transformers renders them: sandboxed, trimmed blocks, `raise_exception`, `tojson`).
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer


class TemplateError(ValueError):
    """The chat template refused the messages (e.g. roles out of order); the message is the template's."""


@dataclass(frozen=True)
class SpecialTokens:
    bos: str | None
    eos: str | None
    add_bos: bool


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, model_path: Path) -> None:
        self._tok = HFTokenizer.from_file(str(model_path / "tokenizer.json"))
        config_path = model_path / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.special = SpecialTokens(
            bos=_token_text(config.get("bos_token")),
            eos=_token_text(config.get("eos_token")),
            add_bos=bool(config.get("add_bos_token", False)),
        )
        template = config.get("chat_template")
        template_file = model_path / "chat_template.jinja"
        if template_file.exists():
            template = template_file.read_text()
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        self._compiled = _compile(template) if template else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(self._tok.token_to_id(t.content) for t in self._added_special())

    def _added_special(self) -> list[Any]:
        return [t for t in self._tok.get_added_tokens_decoder().values() if t.special]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode does not), so tokenizing in an
        # executor thread leaves the event loop running.
        ids = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        bos_id = self._tok.token_to_id(self.special.bos) if self.special.bos else None
        if (
            add_special_tokens
            and self.special.add_bos
            and bos_id is not None
            and (not ids or ids[0] != bos_id)
        ):
            ids = [bos_id, *ids]
        return list(ids)

    def encode_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]], list[int]]:
        """With special tokens: the ids, each token's character span in `text`, and which are special
        (1), for token classification."""
        enc = self._tok.encode_batch([text], add_special_tokens=True)[0]
        return list(enc.ids), [tuple(o) for o in enc.offsets], list(enc.special_tokens_mask)  # type: ignore[misc]

    @functools.cached_property
    def unk_id(self) -> int | None:
        """The id of the model's unknown token, if its tokenizer has one."""
        unk = getattr(self._tok.model, "unk_token", None)
        return self._tok.token_to_id(unk) if isinstance(unk, str) else None

    def tokens_to_string(self, tokens: list[str]) -> str:
        """Tokens (their vocabulary strings) joined as the tokenizer's decoder joins them (WordPiece
        drops `##`), as HF transformers' `convert_tokens_to_string`."""
        decoder = self._tok.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or ""

    def with_chat_template(self, template: str) -> Tokenizer:
        """This vocabulary with another chat template (an adapter's own): raises TemplateError when
        the template does not compile."""
        view = copy.copy(self)
        view.chat_template = template
        try:
            view._compiled = _compile_cached(template)
        except jinja2.TemplateError as e:
            raise TemplateError(str(e)) from e
        return view

    @property
    def template_supports_tools(self) -> bool:
        """The chat template renders `tools` itself (else router/tools.py writes them into the system prompt)."""
        return self.chat_template is not None and "tools" in self.chat_template

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if self._compiled is None:
            raise TemplateError("this model has no chat template")
        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.special.bos or "",
                eos_token=self.special.eos or "",
                tools=tools,
            )
        except jinja2.TemplateError as e:
            raise TemplateError(str(e)) from e

    def stream(
        self, prompt_ids: list[int], stop_sequences: tuple[str, ...] = (), include_stop: bool = False
    ) -> TextStream:
        return TextStream(self, prompt_ids, stop_sequences, include_stop)


def _compile(template: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


# Adapters' templates, compiled once each (the base model's is compiled by its Tokenizer).
_compile_cached = functools.lru_cache(maxsize=64)(_compile)


class TextStream:
    """Incremental detokenizer with stop sequences for one request.

    Decodes a window of recent tokens and emits only the text beyond what the previous window
    produced (so leading-space rules of SentencePiece / byte-level BPE come out right), holds back
    text ending in an incomplete UTF-8 character, and holds back any tail that could still become a
    stop sequence, so a stream never shows text that later turns out to be part of a stop.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], stop_sequences: tuple[str, ...], include_stop: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.include_stop = include_stop
        self.stop_sequences = tuple(s for s in stop_sequences if s)
        # Start with a few prompt tokens as context so the first generated token decodes with its space.
        self.ids: list[int] = list(prompt_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.pending = ""  # decoded, not yet emitted (possible stop-sequence prefix)
        self.text = ""  # everything emitted so far
        self.is_stopped = False

    def _decode_new(self) -> str:
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        full = decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new yet, or half a multi-byte character
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.is_stopped:
            return "", True
        self.ids.append(token_id)
        self.pending += self._decode_new()
        for stop in self.stop_sequences:
            at = self.pending.find(stop)
            if at >= 0:
                out = self.pending[: at + len(stop) if self.include_stop else at]
                self.pending = ""
                self.text += out
                self.is_stopped = True
                return out, True
        keep = self._stop_prefix_len(self.pending)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        self.text += out
        return out, False

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop sequence."""
        best = 0
        for stop in self.stop_sequences:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        self.text += out
        return out
