"""--cors-allow-origin as LoRAX takes it (repeated), also comma-separated and from CORS_ALLOW_ORIGIN;
flags replace the environment's list, and a value that is no origin is refused at startup."""

from __future__ import annotations

import pytest

from loraxpy.router.config import parse_args


@pytest.mark.parametrize("prog", ["lorax-launcher", "lorax-router"])
def test_origins_come_from_repeated_or_comma_separated_flags(
    prog: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CORS_ALLOW_ORIGIN", raising=False)
    argv = ["--cors-allow-origin", "https://a.example", "--cors-allow-origin", "http://b:8080, http://c"]
    assert parse_args(argv, prog=prog).cors_allow_origin == ("https://a.example", "http://b:8080", "http://c")
    assert parse_args([], prog=prog).cors_allow_origin == ()


def test_the_environment_gives_origins_unless_flags_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_ALLOW_ORIGIN", "*")
    assert parse_args([]).cors_allow_origin == ("*",)
    assert parse_args(["--cors-allow-origin", "http://x"]).cors_allow_origin == ("http://x",)


def test_a_value_that_is_no_origin_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORS_ALLOW_ORIGIN", raising=False)
    with pytest.raises(ValueError, match="cors-allow-origin"):
        parse_args(["--cors-allow-origin", "allowed.example"])
