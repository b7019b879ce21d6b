"""One declaration per setting: a dataclass field, from which lorax-launcher, lorax-router and
lorax-worker build their command-line flags (each defaulting to its environment variable), read the
parsed values back, and the launcher writes the flags it hands its shards (`to_argv`).

A field is the flag `--field-name` and the environment variable `FIELD_NAME` unless `setting()`
names another variable; a field declared with `not_a_flag()` is set by code (or read from the
environment by hand) and gets no flag. The flag's type follows the field's annotation:

- `int`, `float`, `str`, `Path`, each optionally `| None` (an empty environment variable is None);
- `bool`: `--flag` alone is true, `--flag false` as LoRAX's Option<bool> flags; the variable reads
  true/false, yes/no, on/off or 1/0, anything else is refused;
- `tuple[str, ...]`: repeatable and comma-separated; flags replace the variable's list.

Torch-free: the router imports it.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any

_FLAG = "loraxpy.flag"  # metadata key: False for fields without a flag
_ENV = "loraxpy.env"  # metadata key: the environment variable, when not FIELD_NAME
_HELP = "loraxpy.help"
_CHOICES = "loraxpy.choices"


def setting(
    default: Any = MISSING,
    *,
    env: str | None = None,
    help: str = "",
    choices: Iterable[str] | None = None,
    default_factory: Any = MISSING,
) -> Any:
    """A field that is a flag: its environment variable (`env`; default FIELD_NAME), help and choices."""
    metadata = {_ENV: env, _HELP: help, _CHOICES: tuple(choices) if choices is not None else None}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def not_a_flag(default: Any = MISSING, *, default_factory: Any = MISSING) -> Any:
    """A field with no flag: set by the program, or read from the environment by hand."""
    return field(default=default, default_factory=default_factory, metadata={_FLAG: False})


def is_flag(f: Field[Any]) -> bool:
    return f.metadata.get(_FLAG, True) is not False


def flag_name(f: Field[Any]) -> str:
    return "--" + f.name.replace("_", "-")


def env_name(f: Field[Any]) -> str:
    return f.metadata.get(_ENV) or f.name.upper()


def env_names(cls: type) -> set[str]:
    """Every environment variable the flags of `cls` read."""
    return {env_name(f) for f in fields(cls) if is_flag(f)}


def parse_bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean (true/false, yes/no, on/off, 1/0)")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # each field's annotation in the module that declared it


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of `X` or `X | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def _flag_fields(cls: type, names: Iterable[str] | None) -> list[Field[Any]]:
    """`cls`'s fields that are flags; with `names`, only those (each must be one)."""
    flags = [f for f in fields(cls) if is_flag(f)]
    if names is None:
        return flags
    wanted = set(names)
    if unknown := wanted - {f.name for f in flags}:
        raise ValueError(f"{cls.__name__} has no flags {sorted(unknown)}")
    return [f for f in flags if f.name in wanted]


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    env: Mapping[str, str] | None = None,
    names: Iterable[str] | None = None,
) -> None:
    """A flag for each of `cls`'s fields that is one (with `names`, for those fields only),
    defaulting to its environment variable."""
    env = os.environ if env is None else env
    hints = _hints(cls)
    for f in _flag_fields(cls, names):
        name, kind, optional = env_name(f), *_unwrap(hints[f.name])
        default, raw = _default(f), env.get(name)
        help_ = " ".join(p for p in (f.metadata.get(_HELP), f"(env {name}; default {default})") if p)
        if kind is bool:
            value = parse_bool(raw) if raw is not None else default
            parser.add_argument(
                flag_name(f), nargs="?", const=True, type=parse_bool, default=value, help=help_
            )
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(
                flag_name(f), action="append", help=f"(env {name}; repeatable, comma-separated)"
            )
        else:
            converters: dict[Any, Callable[[str], Any]] = {int: int, float: float, Path: _path}
            convert = converters.get(kind, str)
            if raw is not None and (raw or not optional):
                default = convert(raw)
            elif raw == "" and optional:
                default = None
            parser.add_argument(
                flag_name(f), type=convert, default=default, choices=f.metadata.get(_CHOICES), help=help_
            )


def _path(value: str) -> Path:
    return Path(value).expanduser()


def flag_values(
    cls: type,
    args: argparse.Namespace,
    env: Mapping[str, str] | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The parsed values of `cls`'s flags (with `names`, those added for them), by field name: lists
    split at commas, empty strings of optional fields None."""
    env = os.environ if env is None else env
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in _flag_fields(cls, names):
        kind, optional = _unwrap(hints[f.name])
        value = getattr(args, f.name)
        if typing.get_origin(kind) is tuple:
            raws = value or [env.get(env_name(f), "")]  # flags replace the environment's list
            value = tuple(v.strip() for raw in raws for v in raw.split(",") if v.strip())
        elif optional and value == "":
            value = None
        values[f.name] = value
    return values


def to_argv(settings: Any, cls: type | None = None) -> list[str]:
    """The flags that give a parser of `cls` (default: the settings' own class) these settings;
    None values are left out (the parser's default is None)."""
    argv: list[str] = []
    for f in fields(cls or type(settings)):
        value = getattr(settings, f.name)
        if not is_flag(f) or value is None:
            continue
        if isinstance(value, tuple):
            argv += [flag_name(f), ",".join(value)] if value else []
        else:
            argv += [flag_name(f), str(value).lower() if isinstance(value, bool) else str(value)]
    return argv
