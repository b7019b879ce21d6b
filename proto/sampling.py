"""Sampling parameters as the router sends them and the worker applies them: one type, one set of bounds.

The bounds are the wire's (`SamplingParams` in worker.proto: float32, uint32, uint64) and the
sampler's: a value the router accepts is a value every worker accepts, so one request can never
make the workers refuse a whole step. Floats are checked as float32, the precision they travel in
(1e39 is finite in Python and inf on the wire). No torch here: the router imports this too.

The router builds one from a request (`given`) and puts it on the wire (`to_proto`); the worker reads
it back (`from_proto`), which checks the bounds again: a worker may be called by others than this
router.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, fields
from typing import Any

from loraxpy.proto import worker_pb2 as pb

MAX_TOP_LOGPROBS = 20
MAX_UINT32 = 2**32 - 1
MAX_UINT64 = 2**64 - 1


class SamplingError(ValueError):
    """A parameter outside its bounds; `field` names it (as SamplingParams spells it)."""

    def __init__(self, field: str, requirement: str) -> None:
        super().__init__(f"`{field}` {requirement}")
        self.field = field
        self.requirement = requirement


@dataclass(frozen=True)
class FloatRange:
    """[low, high], or (low, high] when `low_open`; checked on the value rounded to float32."""

    low: float
    high: float
    low_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


# Wide enough for every sane request, narrow enough that no row's logits overflow float32 or turn
# into NaN (a temperature or penalty near zero divides logits into inf).
FLOAT_RANGES: dict[str, FloatRange] = {
    "temperature": FloatRange(1e-4, 100.0),
    "top_p": FloatRange(0.0, 1.0, low_open=True),
    "typical_p": FloatRange(0.0, 1.0, low_open=True),
    "repetition_penalty": FloatRange(1e-2, 100.0),
    "frequency_penalty": FloatRange(-2.0, 2.0),
    "presence_penalty": FloatRange(-2.0, 2.0),
}
INT_RANGES: dict[str, tuple[int, int]] = {
    "top_k": (0, MAX_UINT32),  # 0 = off; the router also keeps it within the vocabulary
    "seed": (0, MAX_UINT64),
    "top_logprobs": (0, MAX_TOP_LOGPROBS),
}


def as_float32(value: float) -> float | None:
    """`value` rounded to float32, or None when it is not finite there (inf, NaN, or beyond float32)."""
    try:
        rounded: float = struct.unpack("f", struct.pack("f", value))[0]
    except (OverflowError, struct.error, TypeError):
        return None
    return rounded if math.isfinite(rounded) else None


def check_float(name: str, value: float, bounds: FloatRange | None = None) -> None:
    """Raises SamplingError unless `value` is a finite float32 inside `bounds` (if any)."""
    rounded = as_float32(value) if isinstance(value, float | int) and not isinstance(value, bool) else None
    if rounded is None:
        raise SamplingError(name, "must be a finite number (float32)")
    if bounds is not None and rounded not in bounds:
        raise SamplingError(name, f"must be in {bounds}")


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SamplingError(name, "must be an integer")
    if not low <= value <= high:
        raise SamplingError(name, f"must be in [{low}, {high}]")


@dataclass(frozen=True)
class SamplingParams:
    """How one request's next token is chosen; mirrors worker.proto's SamplingParams field for field."""

    do_sample: bool = False  # False: greedy (argmax after penalties)
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None while sampling: the worker seeds from the request id
    top_logprobs: int = 0
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in FLOAT_RANGES:
                check_float(f.name, value, FLOAT_RANGES[f.name])
            elif f.name == "seed" and value is None:
                continue
            elif f.name in INT_RANGES:
                _check_int(f.name, value, *INT_RANGES[f.name])
            elif not isinstance(value, bool):
                raise SamplingError(f.name, "must be a boolean")

    @classmethod
    def given(cls, **values: Any) -> SamplingParams:
        """The fields a request gave; None: the field's default."""
        return cls(**{name: value for name, value in values.items() if value is not None})

    def to_proto(self) -> pb.SamplingParams:
        """Field for field; no seed is an unset `seed`."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return pb.SamplingParams(**{name: value for name, value in values.items() if value is not None})

    @classmethod
    def from_proto(cls, msg: pb.SamplingParams) -> SamplingParams:
        """Field for field, bounds checked (SamplingError). proto3 cannot tell an unset number from 0,
        so a float whose default is not 0 reads 0 as its default (temperature, top_p, typical_p and
        repetition_penalty, none of which may be 0); `seed` is optional on the wire."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = getattr(msg, f.name)
            if f.name == "seed":
                value = value if msg.HasField("seed") else None
            elif isinstance(f.default, float) and f.default != 0 and value == 0:
                value = f.default
            values[f.name] = value
        return cls(**values)

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
