"""Medusa heads shipped with an adapter (LoRAX's per-adapter speculators): reading them, and their
guesses of the tokens after each sampled one.

An adapter folder may carry, beside its PEFT files, `config.json` with `medusa_num_heads` and
`medusa_num_layers` and `medusa_lm_head.safetensors` (the Medusa project's and LoRAX's format).
Head i guesses the token i + 2 places after the hidden state h it reads (the model's own LM head
guesses the next one):

    y = h;  y = y + silu(W_ij y + b_ij)  for each of its layers j  (tensors `i.j.linear.weight/bias`)
    guess_i = argmax(out_i y)   with out_i its own vocabulary projection `i.L.weight` (Medusa v1),
                                or the model's LM head with the adapter's LoRA on it (v2, no `i.L`)

The worker runs the heads on the hidden state each sampled token came from and returns the guesses
(RequestOutput.proposed_draft_tokens); the router sends them back as the next step's draft tokens,
which the existing verification (worker/speculative.py) accepts or rejects, so outputs are exactly
what they are without them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraxpy.worker.adapters import AdapterError, AdapterFiles, open_weights
from loraxpy.worker.model_config import ModelConfig

MAX_HEADS = 16
MAX_LAYERS = 8


@dataclass(frozen=True)
class MedusaHeads:
    """One adapter's heads: per head, its residual blocks (W [hidden, hidden], b [hidden]) and its
    own vocabulary projection ([vocab, hidden]; None: the model's LM head)."""

    blocks: tuple[tuple[tuple[torch.Tensor, torch.Tensor], ...], ...]
    out: tuple[torch.Tensor | None, ...]

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    @property
    def nbytes(self) -> int:
        tensors = [t for head in self.blocks for pair in head for t in pair]
        tensors += [o for o in self.out if o is not None]
        return sum(t.nbytes for t in tensors)

    def to(self, device: torch.device, dtype: torch.dtype) -> MedusaHeads:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        return MedusaHeads(
            tuple(tuple((move(w), move(b)) for w, b in head) for head in self.blocks),
            tuple(None if o is None else move(o) for o in self.out),
        )


def propose(
    heads: MedusaHeads, hidden: torch.Tensor, num_tokens: int, lm_head: Callable[[torch.Tensor], torch.Tensor]
) -> list[tuple[int, ...]]:
    """hidden: [n, hidden], the states n sampled tokens came from -> per row, the first
    `num_tokens` heads' greedy guesses of the tokens after its sampled one. `lm_head` maps
    [m, hidden] states of the same rows, repeated head by head, to logits (v2 heads)."""
    num_heads = min(num_tokens, heads.num_heads)
    if num_heads < 1:
        return [() for _ in range(hidden.shape[0])]
    states = []
    for i in range(num_heads):
        y = hidden
        for w, b in heads.blocks[i]:
            y = y + F.silu(F.linear(y, w, b))
        states.append(y)
    guesses: dict[int, torch.Tensor] = {}  # head -> [n] argmax
    for i, y in enumerate(states):
        out = heads.out[i]
        if out is not None:
            guesses[i] = F.linear(y, out).argmax(dim=-1)
    shared = [i for i in range(num_heads) if i not in guesses]  # v2 heads: the LM head, at once
    if shared:
        argmax = lm_head(torch.cat([states[i] for i in shared])).argmax(dim=-1)
        guesses.update(zip(shared, argmax.split(hidden.shape[0]), strict=True))
    table = torch.stack([guesses[i] for i in range(num_heads)], dim=1).tolist()  # [n, heads]
    return [tuple(row) for row in table]


def read_medusa_heads(files: AdapterFiles, config: ModelConfig) -> MedusaHeads | None:
    """The adapter's Medusa heads, checked against the model's shapes; None if it ships none."""
    shape = _read_config(files.medusa_config.read_bytes()) if files.medusa_config is not None else None
    if shape is None and files.medusa_weights is None:
        return None  # no heads (a config.json without medusa_num_heads is someone else's)
    if shape is None or files.medusa_weights is None:
        raise AdapterError(
            "Medusa heads need both config.json (with medusa_num_heads) and medusa_lm_head.safetensors"
        )
    num_heads, num_layers = shape
    h, vocab = config.hidden_size, config.vocab_size
    with open_weights(files.medusa_weights, "medusa_lm_head.safetensors") as (headers, read):
        expected: dict[str, tuple[int, ...]] = {}
        for i in range(num_heads):
            for j in range(num_layers):
                expected[f"{i}.{j}.linear.weight"] = (h, h)
                expected[f"{i}.{j}.linear.bias"] = (h,)
        own_out = f"0.{num_layers}.weight" in headers
        if own_out:
            expected.update({f"{i}.{num_layers}.weight": (vocab, h) for i in range(num_heads)})
        unknown = sorted(set(headers) - set(expected))
        missing = sorted(set(expected) - set(headers))
        if unknown or missing:
            what = f"unexpected tensor {unknown[0][:80]!r}" if unknown else f"missing tensor {missing[0]!r}"
            raise AdapterError(
                f"medusa_lm_head.safetensors does not hold {num_heads} heads of {num_layers} layers: {what}"
            )
        for name, dims in expected.items():
            if headers[name].shape != dims or headers[name].dtype not in ("F32", "F16", "BF16"):
                raise AdapterError(
                    f"Medusa tensor {name} is {headers[name].dtype} {list(headers[name].shape)}; "
                    f"this model needs a float tensor of {list(dims)}"
                )

        def tensor(name: str) -> torch.Tensor:
            return read(name).to(torch.float32, copy=True)

        blocks = tuple(
            tuple(
                (tensor(f"{i}.{j}.linear.weight"), tensor(f"{i}.{j}.linear.bias")) for j in range(num_layers)
            )
            for i in range(num_heads)
        )
        out = tuple(tensor(f"{i}.{num_layers}.weight") if own_out else None for i in range(num_heads))
    return MedusaHeads(blocks, out)


def _read_config(raw: bytes) -> tuple[int, int] | None:
    """(heads, layers per head) from the adapter's config.json; None if it names no Medusa heads."""
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError):
        raise AdapterError("the adapter's config.json is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise AdapterError("the adapter's config.json must hold a JSON object")
    if "medusa_num_heads" not in cfg:
        return None
    num_heads, num_layers = cfg.get("medusa_num_heads"), cfg.get("medusa_num_layers", 1)
    for key, value, top in (
        ("medusa_num_heads", num_heads, MAX_HEADS),
        ("medusa_num_layers", num_layers, MAX_LAYERS),
    ):
        if type(value) is not int or not 1 <= value <= top:
            raise AdapterError(f"the adapter's config.json: {key} must be an integer from 1 to {top}")
    assert isinstance(num_heads, int) and isinstance(num_layers, int)
    return num_heads, num_layers
