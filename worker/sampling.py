"""Choosing every request's next token in one batched pass.

Processing order and formulas follow HF transformers' `generate`: repetition penalty, then
(OpenAI-style) frequency and presence penalties, then for sampling rows temperature, top-k, top-p
and typical-p. Each sampling row draws only from its own generator, a fixed amount per step, so a
seed gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

# The one sampling type, shared with the router: its bounds are the wire's and this sampler's.
from loraxpy.kernels.cpu_fused import FusedOps
from loraxpy.proto.sampling import SamplingParams


@dataclass
class SamplingRow:
    """One request's view for sampling: its parameters, its tokens so far, and its generator."""

    params: SamplingParams
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    generator: torch.Generator | None


@dataclass(frozen=True)
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float]  # of the chosen token, under the unprocessed distribution
    top_logprobs: list[list[tuple[int, float]]]  # most likely first


def make_generator(
    params: SamplingParams, device: torch.device, fallback_seed: int | None = None
) -> torch.Generator | None:
    """The request's own generator. Without a seed, `fallback_seed` (the same on every shard) or a random one."""
    if not params.do_sample:
        return None
    if params.seed is not None:
        seed = params.seed
    else:
        seed = fallback_seed if fallback_seed is not None else random.getrandbits(63)
    generator = torch.Generator(device=device)
    # torch seeds are signed 64-bit at most; fold larger seeds rather than refuse them.
    generator.manual_seed(seed % (2**63))
    return generator


def _token_matrix(rows: list[SamplingRow], generated_only: bool, device: torch.device) -> torch.Tensor:
    """[num_rows, max_len] token ids padded with -1 (prompt + generated, or generated only)."""
    lists = [r.token_ids[r.num_prompt_tokens :] if generated_only else r.token_ids for r in rows]
    width = max(1, *(len(t) for t in lists))
    return torch.tensor([t + [-1] * (width - len(t)) for t in lists], dtype=torch.int64, device=device)


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    device = logits.device
    vocab = logits.shape[1]
    rep = torch.tensor([r.params.repetition_penalty for r in rows], device=device)[:, None]
    if (rep != 1.0).any():
        tokens = _token_matrix(rows, generated_only=False, device=device)
        # Padding (-1) goes to an extra column: scattered onto a real token it could unmark it.
        seen = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, torch.where(tokens >= 0, tokens, vocab), True)
        seen = seen[:, :vocab]
        penalized = torch.where(logits < 0, logits * rep, logits / rep)
        logits = torch.where(seen, penalized, logits)
    freq = torch.tensor([r.params.frequency_penalty for r in rows], device=device)[:, None]
    presence = torch.tensor([r.params.presence_penalty for r in rows], device=device)[:, None]
    if (freq != 0).any() or (presence != 0).any():
        tokens = _token_matrix(rows, generated_only=True, device=device)
        counts = torch.zeros(logits.shape[0], vocab + 1, dtype=logits.dtype, device=device)
        counts.scatter_add_(
            1, torch.where(tokens >= 0, tokens, vocab), torch.ones_like(tokens, dtype=logits.dtype)
        )
        counts = counts[:, :vocab]
        logits = logits - freq * counts - presence * (counts > 0).to(logits.dtype)
    return logits


def _apply_warpers(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    device = logits.device
    neg_inf = torch.tensor(float("-inf"), device=device)
    temperature = torch.tensor([r.params.temperature for r in rows], device=device)[:, None]
    logits = logits / temperature
    top_k = torch.tensor([r.params.top_k or logits.shape[1] for r in rows], device=device)
    if (top_k < logits.shape[1]).any():
        kth = logits.sort(dim=-1, descending=True).values.gather(
            1, (top_k.clamp(max=logits.shape[1]) - 1)[:, None]
        )
        logits = torch.where(logits < kth, neg_inf, logits)
    top_p = torch.tensor([r.params.top_p for r in rows], device=device)[:, None]
    if (top_p < 1).any():
        logits = _top_p(logits, top_p)
    typical = torch.tensor([r.params.typical_p for r in rows], device=device)[:, None]
    if (typical < 1).any():
        logits = _typical(logits, typical)
    return logits


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    # HF TopPLogitsWarper: drop the ascending-sorted prefix whose cumulative mass is <= 1 - top_p.
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[:, -1] = False  # min_tokens_to_keep = 1
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop & (top_p < 1), float("-inf"))


def _typical(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    # HF TypicalLogitsWarper: keep tokens closest to the entropy until their mass exceeds typical_p.
    normalized = logits.log_softmax(dim=-1)
    p = normalized.exp()
    entropy = -(normalized * p).nansum(-1, keepdim=True)
    shifted = (-normalized - entropy).abs()
    sorted_scores, order = shifted.sort(descending=False)
    sorted_logits = logits.gather(-1, order)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    last_ind = (cumulative < mass).sum(dim=1)
    last_ind.clamp_(max=logits.shape[-1] - 1)
    drop_sorted = sorted_scores > sorted_scores.gather(1, last_ind.view(-1, 1))
    drop_sorted[..., :1] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop & (mass < 1), float("-inf"))


# Row b of the table: the additive bias of the 8 tokens whose mask bits are the bits of byte b
# (least significant first): 0 where allowed, -inf where not. One gather unpacks a whole mask.
_BIT_BIAS: dict[torch.device, torch.Tensor] = {}


def _bit_bias(device: torch.device) -> torch.Tensor:
    if device not in _BIT_BIAS:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1  # [256, 8]
        _BIT_BIAS[device] = torch.where(bits.bool(), 0.0, float("-inf")).to(device)
    return _BIT_BIAS[device]


def apply_token_masks(logits: torch.Tensor, masks: list[bytes]) -> torch.Tensor:
    """logits [num_rows, vocab] → the same with -inf wherever a row's packed allowed-token mask (bit
    t % 8 of byte t // 8) has a 0 bit; rows with an empty mask are unchanged. Each mask covers the
    vocabulary (the step was validated)."""
    rows = [i for i, m in enumerate(masks) if m]
    if not rows:
        return logits
    num_rows, vocab = logits.shape
    packed = bytearray().join(masks[i] for i in rows)
    # packed: [len(rows), mask bytes] uint8 → bias [len(rows), vocab] of 0 / -inf.
    u8 = torch.frombuffer(packed, dtype=torch.uint8).view(len(rows), -1).to(logits.device)
    bias = _bit_bias(logits.device)[u8.long()].view(len(rows), -1)[:, :vocab]
    if len(rows) == num_rows:
        return logits + bias
    index = torch.tensor(rows, device=logits.device)
    return logits.index_add(0, index, bias)


def process_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits [num_rows, vocab] fp32 → processed logits; warpers apply to sampling rows only."""
    if any(r.params.has_penalties for r in rows):
        logits = _apply_penalties(logits, rows)
    is_sampling = torch.tensor([r.params.do_sample for r in rows], device=logits.device)[:, None]
    if is_sampling.any():
        logits = torch.where(is_sampling, _apply_warpers(logits, rows), logits)
    return logits


def _plain_greedy(
    logits: torch.Tensor, rows: list[SamplingRow], masks: list[bytes] | None, fused: FusedOps | None
) -> bool:
    return (
        fused is not None
        and logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.shape[-1] > 0
        and not (masks and any(masks))
        and not any(r.params.do_sample or r.params.has_penalties for r in rows)
    )


def sample(
    logits: torch.Tensor,
    rows: list[SamplingRow],
    masks: list[bytes] | None = None,
    fused: FusedOps | None = None,
) -> SampleOutput:
    """Chooses one token per row: argmax for greedy rows, an exponential race for sampling rows.

    `masks` (structured output): each row's packed allowed-token mask (b"": any token); the others
    become -inf first, so penalties and warpers see only what the grammar allows. `fused` (CPU):
    kernels/cpu_fused's ops, whose greedy_logsumexp answers a batch of plain greedy rows (no mask,
    penalty or sampling) in one op instead of torch's argmax and logsumexp."""
    # logits: [num_rows, vocab] fp32. Log-probs are reported on the raw logits: logit - logsumexp
    # for the few tokens asked for, never a whole [num_rows, vocab] log-softmax.
    if _plain_greedy(logits, rows, masks, fused):
        assert fused is not None
        chosen, norms = fused.greedy_logsumexp(logits.contiguous())
        log_norm = norms[:, None]
    else:
        log_norm = logits.logsumexp(dim=-1, keepdim=True)  # [num_rows, 1]
        processed = process_logits(apply_token_masks(logits, masks) if masks else logits, rows)
        chosen = processed.argmax(dim=-1)
    sampling = [i for i, r in enumerate(rows) if r.params.do_sample]
    if sampling:
        probs = processed[sampling].softmax(dim=-1)  # (never the plain-greedy case: it has no sampling rows)
        # argmax(p / E) with E ~ Exp(1) draws from p; each row's noise comes from its own generator.
        noise = torch.stack(
            [torch.empty_like(probs[0]).exponential_(generator=rows[i].generator) for i in sampling]
        )
        chosen[sampling] = (probs / noise).argmax(dim=-1)
    chosen_logprobs = (logits.gather(1, chosen[:, None]) - log_norm).squeeze(1)
    k = max(r.params.top_logprobs for r in rows)
    top_values, top_ids = logits.topk(k, dim=-1) if k else (chosen_logprobs[:, None][:, :0],) * 2
    top_values = top_values - log_norm if k else top_values
    # One device→host transfer for everything.
    token_ids, logprobs, top_v, top_i = (t.tolist() for t in (chosen, chosen_logprobs, top_values, top_ids))
    top = [
        list(zip(top_i[i][: r.params.top_logprobs], top_v[i][: r.params.top_logprobs], strict=True))
        for i, r in enumerate(rows)
    ]
    return SampleOutput(token_ids=token_ids, logprobs=logprobs, top_logprobs=top)
