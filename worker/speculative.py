"""Verifying a request's draft tokens (speculative decoding) against the model's own choices.

The router guesses up to k tokens that follow a decoding request's last token (prompt lookup,
router/speculative.py) and the step computes the last token and the k guesses together, so the
model's logits at each of the k + 1 positions are known at once. Position j's logits are processed
as a one-token step would process them there: penalties over the request's tokens followed by the
first j guesses, then the sampling warpers.

- Greedy: guess j is accepted while it equals the argmax at position j; the first mismatch is
  replaced by that argmax, and when all k are accepted the argmax after them is added. The tokens
  are exactly what k + 1 one-token greedy steps would give.
- Sampled: the guesses come from a deterministic draft (q puts all its mass on the guess), so
  standard speculative rejection sampling reduces to: accept guess j with probability p_j(guess)
  (p_j: position j's processed distribution); on the first rejection sample from p_j with the guess
  removed and renormalised, and stop; when all k are accepted sample the next token from p_k. Each
  token then has exactly the model's distribution given the tokens before it (Leviathan et al.
  2023, Chen et al. 2023). The request's generator draws k uniforms and one exponential race per
  step, so a seed gives the same tokens whatever else is in the batch.

Rows that ask for top log-probs or carry an allowed-token mask are never sent guesses (the worker
refuses them): their outputs are per token and per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraxpy.worker.sampling import SamplingRow, process_logits


@dataclass(frozen=True)
class DraftRequest:
    """One speculating request: its sampling row (tokens up to and including the last one computed
    this step, before the guesses) and its guesses."""

    row: SamplingRow
    draft: tuple[int, ...]


@dataclass(frozen=True)
class Verified:
    accepted: tuple[tuple[int, float], ...]  # the guesses accepted, with raw log-probs
    token: tuple[int, float]  # the model's own token after them


def position_rows(req: DraftRequest) -> list[SamplingRow]:
    """The k + 1 sampling rows of a request: position j sees its tokens followed by draft[:j]."""
    r = req.row
    return [
        SamplingRow(r.params, r.token_ids + list(req.draft[:j]), r.num_prompt_tokens, r.generator)
        for j in range(len(req.draft) + 1)
    ]


def verify(logits: torch.Tensor, requests: list[DraftRequest]) -> list[Verified]:
    """logits: [sum(len(draft) + 1), vocab] fp32, each request's k + 1 positions back to back."""
    rows = [row for req in requests for row in position_rows(req)]
    log_norm = logits.logsumexp(dim=-1)
    processed = process_logits(logits, rows)
    greedy = processed.argmax(dim=-1).tolist()
    chosen: list[tuple[int, list[int]]] = []  # (first row, tokens) per request
    row0 = 0
    for req in requests:
        k = len(req.draft)
        if req.row.params.do_sample:
            tokens = _sample_run(processed[row0 : row0 + k + 1], req)
        else:
            tokens = _greedy_run(greedy[row0 : row0 + k + 1], req.draft)
        chosen.append((row0, tokens))
        row0 += k + 1
    index = torch.tensor([r + j for r, tokens in chosen for j in range(len(tokens))], device=logits.device)
    ids = torch.tensor([t for _, tokens in chosen for t in tokens], device=logits.device)
    logprobs = (logits[index].gather(1, ids[:, None]).squeeze(1) - log_norm[index]).tolist()
    out = []
    i = 0
    for _, tokens in chosen:
        pairs = tuple(zip(tokens, logprobs[i : i + len(tokens)], strict=True))
        i += len(tokens)
        out.append(Verified(accepted=pairs[:-1], token=pairs[-1]))
    return out


def _greedy_run(argmax: list[int], draft: tuple[int, ...]) -> list[int]:
    """The accepted guesses then the model's token: argmax[j] is the model's choice at position j."""
    for j, guess in enumerate(draft):
        if argmax[j] != guess:
            return [*draft[:j], argmax[j]]
    return [*draft, argmax[len(draft)]]


def _sample_run(processed: torch.Tensor, req: DraftRequest) -> list[int]:
    """Rejection sampling of a deterministic draft over the k + 1 positions' processed logits."""
    k = len(req.draft)
    generator = req.row.generator
    probs = processed.softmax(dim=-1)  # [k + 1, vocab]
    draft = torch.tensor(req.draft, dtype=torch.int64, device=probs.device)
    p_guess = probs[:k].gather(1, draft[:, None]).squeeze(1)
    uniforms = torch.rand(k, generator=generator, device=probs.device, dtype=probs.dtype)
    rejected = (uniforms >= p_guess).tolist()
    num_accepted = rejected.index(True) if True in rejected else k
    target = probs[num_accepted]
    if num_accepted < k:  # the residual: p with the rejected guess removed (renormalised by the race)
        target = target.clone()
        target[req.draft[num_accepted]] = 0.0
    # argmax(p / E) with E ~ Exp(1) draws from p (unnormalised p too), as worker/sampling.py does.
    noise = torch.empty_like(target).exponential_(generator=generator)
    token = int((target / noise).argmax())
    return [*req.draft[:num_accepted], token]
