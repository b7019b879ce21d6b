"""Router text handling against HF transformers' tokenizer: encode, chat template, streaming decode, stops."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraxpy.router.text import TemplateError, Tokenizer

SAMPLES = [
    "The capital of France is Paris.",
    "héllo wörld — 你好，世界 🙂👍🏽 done",
    "  leading spaces\n\nand\ttabs  ",
    "emoji at the end 🚀",
]


@pytest.fixture(scope="module")
def tokenizers(default_model_path: Path):
    from transformers import AutoTokenizer

    return Tokenizer(default_model_path), AutoTokenizer.from_pretrained(default_model_path)


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_matches_transformers(tokenizers, text: str) -> None:
    ours, hf = tokenizers
    assert ours.encode(text) == hf(text)["input_ids"]


@pytest.mark.parametrize("text", SAMPLES)
def test_streamed_text_equals_decoding_all_tokens_at_once(tokenizers, text: str) -> None:
    ours, hf = tokenizers
    prompt = ours.encode("Say something:")
    ids = ours.encode(text)
    stream = ours.stream(prompt)
    pieces = [stream.push(t)[0] for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("stop", "include", "expected"),
    [
        ("France is", False, "The capital of "),
        ("France is", True, "The capital of France is"),
        ("l of F", False, "The capita"),
        ("Paris.", False, "The capital of France is "),
    ],
)
def test_stop_sequences_spanning_tokens_end_the_text(
    tokenizers, stop: str, include: bool, expected: str
) -> None:
    ours, _ = tokenizers
    stream = ours.stream([], (stop,), include_stop=include)
    emitted, stopped_at = "", None
    for i, t in enumerate(ours.encode("The capital of France is Paris. Yes.")):
        piece, stopped = stream.push(t)
        emitted += piece
        if stopped:
            stopped_at = i
            break
    assert stopped_at is not None and emitted == expected


def test_text_that_might_start_a_stop_is_held_back_then_released(tokenizers) -> None:
    ours, _ = tokenizers
    stream = ours.stream([], ("Paris!",))
    ids = ours.encode("The capital is Paris.")
    assert ours.decode(ids[-1:]) == "."
    before_dot = "".join(stream.push(t)[0] for t in ids[:-1])
    assert before_dot == "The capital is "  # "Paris" could still become "Paris!"
    assert before_dot + stream.push(ids[-1])[0] + stream.flush() == "The capital is Paris."


def test_chat_template_matches_transformers(tokenizers) -> None:
    ours, hf = tokenizers
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy? 🇮🇹"},
    ]
    for gen in (True, False):
        assert ours.apply_chat_template(messages, gen) == hf.apply_chat_template(
            messages, add_generation_prompt=gen, tokenize=False
        )


def test_template_errors_are_typed(tmp_path: Path, default_model_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((default_model_path / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])
