"""Grammars compiled by llguidance for the default model's tokenizer: masks, EOS, caching, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraxpy.router.grammar import GrammarCompiler, GrammarError, GrammarSpec
from loraxpy.router.text import Tokenizer

EOS = (2, 0)  # <|im_end|> first (llguidance's), a second EOS id the model may also end with


@pytest.fixture(scope="module")
def compiler(default_model_path: Path) -> GrammarCompiler:
    tokenizer = Tokenizer(default_model_path)
    return GrammarCompiler.for_model(default_model_path, tokenizer.vocab_size, EOS)


@pytest.fixture(scope="module")
def tokenizer(default_model_path: Path) -> Tokenizer:
    return Tokenizer(default_model_path)


def allowed(mask: bytes) -> list[int]:
    return [t for t in range(len(mask) * 8) if mask[t // 8] >> (t % 8) & 1]


def test_choice_masks_allow_only_prefixes_and_eos_only_at_the_end(compiler, tokenizer) -> None:
    grammar = compiler.compile(GrammarSpec("choice", ["yes", "no"]))
    matcher = grammar.matcher()
    text = ""
    for _ in range(10):
        (mask,) = compiler.masks([matcher])
        assert len(mask) == compiler.mask_bytes
        tokens = allowed(mask)
        pieces = {t: tokenizer.decode([t], skip_special_tokens=False) for t in tokens}
        assert all(
            t in EOS or "yes".startswith(text + p) or "no".startswith(text + p) for t, p in pieces.items()
        )
        assert (set(EOS) <= set(tokens)) == (text in ("yes", "no"))
        chosen = next(t for t in tokens if t not in EOS)
        text += pieces[chosen]
        matcher.advance(chosen)
        if matcher.is_done:
            break
    assert text in ("yes", "no")
    assert matcher.is_done and not matcher.error


def test_masks_in_parallel_equal_masks_one_at_a_time(compiler) -> None:
    grammar = compiler.compile(GrammarSpec("json_schema", {"type": "object"}))
    matchers = [grammar.matcher() for _ in range(3)]
    first = allowed(grammar.initial_mask)[0]
    for m in matchers[1:]:
        m.advance(first)
    together = compiler.masks(matchers)
    assert together == [compiler.masks([m])[0] for m in matchers]
    assert together[0] == grammar.initial_mask and together[1] != together[0]


def test_compiled_grammars_are_cached_by_their_text(compiler) -> None:
    a = compiler.compile(
        GrammarSpec("json_schema", {"type": "object", "properties": {"x": {"type": "integer"}}})
    )
    b = compiler.compile(
        GrammarSpec("json_schema", {"properties": {"x": {"type": "integer"}}, "type": "object"})
    )
    assert a is b


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (GrammarSpec("regex", "a(b"), "unclosed group"),
        (GrammarSpec("json_schema", {"type": "strin"}), "strin"),
        (GrammarSpec("lark", "start: foo"), "foo"),
        (
            GrammarSpec("json_schema", {"type": "array", "uniqueItems": True}),
            "Unimplemented keys.*uniqueItems",
        ),
    ],
)
def test_bad_grammars_are_refused_with_the_engines_message(compiler, spec, message) -> None:
    with pytest.raises(GrammarError, match=message):
        compiler.compile(spec)


def test_a_token_outside_the_grammar_ends_the_matcher_with_an_error(compiler, tokenizer) -> None:
    matcher = compiler.compile(GrammarSpec("regex", "[0-9]+")).matcher()
    matcher.advance(tokenizer.encode("abc", add_special_tokens=False)[0])
    assert matcher.is_done and matcher.error


def test_a_tokenizer_the_grammar_engine_cannot_read_refuses_grammars_with_the_field_not_a_crash() -> None:
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import models, pre_tokenizers

    from loraxpy.router.errors import ValidationError
    from loraxpy.router.structured import compile_spec

    words = HfTokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # and no decoder: llguidance cannot read it
    compiler = GrammarCompiler(words.to_str(), 3, ())
    spec = GrammarSpec("choice", ["a", "b"])
    with pytest.raises(GrammarError, match="cannot read its tokenizer"):
        compiler.compile(spec)
    with pytest.raises(ValidationError, match="guided_choice") as e:
        compile_spec(spec, "guided_choice", compiler)
    assert e.value.param == "guided_choice" and e.value.status == 422
