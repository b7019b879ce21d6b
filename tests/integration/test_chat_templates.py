"""Each family's chat template, as its instruct checkpoint ships it, through a real router: the prompt
the router writes for /v1/chat/completions is the one HF transformers' apply_chat_template renders
(same tokens, same greedy reply as /generate with HF's text), a template that refuses the messages
(Gemma 2 and Mixtral have no system role) is a 400 carrying the template's own message, and the EOS
list of generation_config.json stops generation where HF's generate stops.

One server: the tiny Llama with a byte-level tokenizer (every text is its bytes, each family's
special tokens one token each) and Gemma 2's template; the other families' templates come with
adapters (an adapter's tokenizer_config.json carries its template, rendered by the same code)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from conftest import build_tiny_model
from family_templates import SPECIAL_TOKENS, TEMPLATES
from launcher_process import Launcher, launcher
from test_multi_lora_api import write_qv_adapter

pytestmark = pytest.mark.slow

CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "turns": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a color."},
    ],
    "system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."},
    ],
}
EOS_PROMPT = [{"role": "user", "content": "Count: one two"}]


def _hf_tokenizer(model: Path, template: str):  # type: ignore[no-untyped-def]
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(model / "tokenizer.json"),
        chat_template=template,
        bos_token="<bos>",
        eos_token="<eos>",
    )


def _render(model: Path, template: str, messages: list[dict[str, str]]) -> str:
    return str(
        _hf_tokenizer(model, template).apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM

    path = build_tiny_model("llama", tmp_path_factory.mktemp("templates") / "llama")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"chat_template": TEMPLATES["gemma2"], "bos_token": "<bos>", "eos_token": "<eos>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    # Two EOS ids, as Gemma's generation_config lists <eos> and <end_of_turn>: the second is the token
    # HF's greedy reply to EOS_PROMPT writes third (one it has not written before).
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = _hf_tokenizer(path, TEMPLATES["gemma2"])(_render(path, TEMPLATES["gemma2"], EOS_PROMPT))[
        "input_ids"
    ]
    reply = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    stop = next(t for i, t in enumerate(reply) if i >= 2 and t not in reply[:i])
    eos = [tokenizer.token_to_id("<eos>"), stop]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    # The other families' templates ride on adapters (LoRA on q and v; the template is what differs).
    for seed, (family, template) in enumerate(TEMPLATES.items()):
        if family != "gemma2":  # Gemma 2: the base model's own template
            write_qv_adapter(path, path.parent / "adapters" / family, r=4, alpha=8, seed=seed)
            (path.parent / "adapters" / family / "tokenizer_config.json").write_text(
                json.dumps({"chat_template": template})
            )
    return path


@pytest.fixture(scope="module")
def server(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    with launcher(
        model,
        tmp_path_factory.mktemp("templates-launcher"),
        *("--max-input-length", "160", "--max-total-tokens", "192"),
        *("--adapter-source", "local", "--adapter-root", str(model.parent / "adapters")),
    ) as s:
        yield s


def _chat(
    server: Launcher, family: str, messages: list[dict[str, str]], max_tokens: int
) -> requests.Response:
    body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if family != "gemma2":
        body["model"] = family
    return requests.post(server.url + "/v1/chat/completions", json=body, timeout=120)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_the_router_writes_the_prompt_hf_renders_or_answers_the_templates_refusal(
    server: Launcher, model: Path, family: str, conversation: str
) -> None:
    from jinja2 import TemplateError

    messages = CONVERSATIONS[conversation]
    chat = _chat(server, family, messages, max_tokens=4)
    try:
        prompt = _render(model, TEMPLATES[family], messages)
    except TemplateError as e:  # HF refuses these messages: so does the router, with the same words
        assert chat.status_code == 400, chat.text
        error = chat.json()["error"]
        assert str(e) in error["message"] and error["param"] == "messages", error
        return
    assert chat.status_code == 200, chat.text
    ids = _hf_tokenizer(model, TEMPLATES[family])(prompt, add_special_tokens=False)["input_ids"]
    assert chat.json()["usage"]["prompt_tokens"] == len(ids)
    parameters: dict[str, Any] = {"max_new_tokens": 4, "details": True}
    if family != "gemma2":
        parameters["adapter_id"] = family
    generated = requests.post(
        server.url + "/generate", json={"inputs": prompt, "parameters": parameters}, timeout=120
    ).json()
    assert chat.json()["choices"][0]["message"]["content"] == generated["generated_text"]


def test_every_eos_id_of_generation_config_stops_generation(server: Launcher, model: Path) -> None:
    from transformers import AutoModelForCausalLM

    prompt = _render(model, TEMPLATES["gemma2"], EOS_PROMPT)
    ids = _hf_tokenizer(model, TEMPLATES["gemma2"])(prompt)["input_ids"]
    # HF's generate reads the same generation_config.json and stops at either id.
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    eos = json.loads((model / "generation_config.json").read_text())["eos_token_id"]
    assert len(expected) < 8 and expected[-1] == eos[1]
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 8, "details": True}}
    generated = requests.post(server.url + "/generate", json=body, timeout=120).json()
    assert [t["id"] for t in generated["details"]["tokens"]] == expected
    assert generated["details"]["finish_reason"] == "eos_token"
    chat = _chat(server, "gemma2", EOS_PROMPT, max_tokens=8).json()
    assert chat["choices"][0]["finish_reason"] == "stop"
