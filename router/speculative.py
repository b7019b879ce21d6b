"""Prompt lookup (n-gram) speculation: guesses of a request's next tokens from its own tokens.

Text that copies from its context (code edits, quoting, extraction, summaries that reuse phrases)
repeats n-grams the request has already seen. The guess is what followed the latest earlier
occurrence of the request's last n tokens (n = 3, then 2, then 1), continued as a cycle where that
occurrence is close to the end (a loop repeats itself). The workers verify the guesses
in the request's next step (worker/speculative.py) and keep the prefix the model agrees with, so a
wrong guess costs only the extra tokens' compute.

Each request keeps its own index of where each 1-, 2- and 3-gram last ended, extended by the
tokens added since its previous guess: a guess costs a few dict operations per new token, not a
scan of the context.
"""

from __future__ import annotations

MAX_NGRAM = 3


class PromptLookup:
    """One request's n-gram index over its tokens (prompt then generated; tokens are only added)."""

    def __init__(self) -> None:
        self._last_end: dict[tuple[int, ...], int] = {}  # n-gram -> the latest position it ended at
        self._indexed = 0  # n-grams ending before this position are in the index

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """k tokens following the latest earlier occurrence of the last n-gram, the tokens from there
        to the end repeated if fewer follow it; [] if no n-gram occurred before."""
        num = len(tokens)
        if k < 1 or num < 2:
            return []
        # Index the n-grams ending before the last token: an occurrence found there is an earlier one.
        for end in range(self._indexed, num - 1):
            for n in range(1, min(MAX_NGRAM, end + 1) + 1):
                self._last_end[tuple(tokens[end - n + 1 : end + 1])] = end
        self._indexed = max(self._indexed, num - 1)
        for n in range(min(MAX_NGRAM, num), 0, -1):
            found = self._last_end.get(tuple(tokens[num - n :]))
            if found is not None:
                # The text since that occurrence repeats it: continue the cycle past the last token.
                period = num - 1 - found
                return [tokens[found + 1 + i % period] for i in range(k)]
        return []
