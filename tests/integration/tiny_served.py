"""The tiny random Llama as a server serves it: a word-level tokenizer ("w1 w2 ..."), a chat
template, and a byte-level decoder that the grammar engine reads (structured output works)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import build_tiny_model

CHAT_TEMPLATE = "{% for m in messages %}w1 {{ m['content'] }} {% endfor %}w2"


def build_served_tiny_llama(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    build_tiny_model("llama", path)
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 320)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return path
