"""Text prompts that the server's own tokenizer turns into exactly `prompt_len` tokens.

The HTTP API takes text, the engine and HF take token ids; every path must see the same ids. So the
prompt is built from words that are each one token when preceded by a space (" word"), joined with
spaces: a byte-level BPE or whitespace pre-tokenizer splits the text at those spaces, so the text
encodes to one token per word. The ids used by the in-process paths are the router tokenizer's
encoding of that text — exactly what the server computes — never the words' ids assumed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from loraxpy.router.text import Tokenizer

MAX_TRIES_PER_TOKEN = 200  # a vocabulary with almost no whole-word tokens cannot make prompts


@dataclass(frozen=True)
class TextPrompt:
    text: str
    token_ids: tuple[int, ...]  # the router's encoding of `text` (special tokens included)


def _one_token_word(tokenizer: Tokenizer, rng: random.Random) -> str:
    """A random ASCII word that encodes, after a space, to the single token it decodes from."""
    for _ in range(MAX_TRIES_PER_TOKEN):
        token = rng.randrange(tokenizer.vocab_size)
        word = tokenizer.decode([token], skip_special_tokens=False).strip()
        if (
            word.isascii()
            and word.isalnum()
            and tokenizer.encode(" " + word, add_special_tokens=False) == [token]
        ):
            return word
    raise ValueError("the tokenizer has too few whole-word tokens to build prompts from")


def text_prompt(tokenizer: Tokenizer, prompt_len: int, rng: random.Random) -> TextPrompt:
    """Adds words until the text encodes to `prompt_len` tokens (a BOS token counts as one)."""
    words: list[str] = []
    for _ in range(4 * prompt_len + 8):
        text = " " + " ".join(words)
        ids = tokenizer.encode(text)
        if len(ids) == prompt_len:
            return TextPrompt(text, tuple(ids))
        if len(ids) < prompt_len:
            words.append(_one_token_word(tokenizer, rng))
        elif words:  # a merge across words overshot: drop the last word and retry
            words.pop()
        else:
            break  # the special tokens alone are longer than the prompt
    raise ValueError(f"no text of exactly {prompt_len} tokens found")


def text_prompts(tokenizer: Tokenizer, count: int, prompt_len: int, seed: int) -> list[TextPrompt]:
    """`count` distinct prompts; a batch of B rows uses the first B, so row 0 is the same at every B."""
    rng = random.Random(f"text-prompts-{seed}-{prompt_len}")
    return [text_prompt(tokenizer, prompt_len, rng) for _ in range(count)]
