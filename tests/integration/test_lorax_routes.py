"""LoRAX's remaining routes over one real launcher (tiny Llama, --api-key, --cors-allow-origin): the
probes answer without the key, the Swagger UI at /docs loads its files from this server only and
reads the same document as /openapi.json, browsers from the allowed origin pass CORS preflights and
read answers while other origins do not, and SageMaker's /invocations answers as the route its
body names. Embeddings (/embed, /v1/embeddings) equal HF transformers and PEFT with the model's
sentence-transformers pooling, batched or alone, over the openai SDK and lorax-client. An adapter that ships a chat template in its own tokenizer_config.json has its chat
requests rendered with it (checked against HF transformers' rendering), others the base model's."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
import torch
from launcher_process import Launcher, launcher
from otlp_receiver import OtlpReceiver, attribute_values
from tiny_served import CHAT_TEMPLATE, build_served_tiny_llama

pytestmark = pytest.mark.slow

API_KEY = "routes-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ALLOWED = "http://allowed.example:8080"
PROMPT = "w5 w17 w3"
# The adapter "templated" ships its own; "plain" ships none; "broken" ships one that does not compile.
ADAPTER_TEMPLATE = "{% for m in messages %}w9 w8 {{ m['content'] }} w10 {% endfor %}{% if add_generation_prompt %}w7{% endif %}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama served, with three LoRA adapters (two of them carrying a tokenizer config)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = build_served_tiny_llama(tmp_path_factory.mktemp("routes-llama"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapters = path.parent / "adapters"
    for seed, name in enumerate(("templated", "plain", "broken")):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        get_peft_model(model, config).save_pretrained(adapters / name)
    (adapters / "templated" / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": ADAPTER_TEMPLATE})
    )
    (adapters / "broken" / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% for m in %}"})
    )
    # Embeddings: a sentence-transformers folder that pools the mean of the tokens, then normalises.
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    pooling = {
        "word_embedding_dimension": 64,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_lasttoken": False,
    }
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return path


@pytest.fixture(scope="module")
def server(tiny: Path, tmp_path_factory: pytest.TempPathFactory, otlp: OtlpReceiver) -> Iterator[Launcher]:
    with launcher(
        tiny,
        tmp_path_factory.mktemp("routes-launcher"),
        *("--max-input-length", "48", "--max-total-tokens", "64", "--api-key", API_KEY),
        *("--otlp-endpoint", otlp.url),
        *("--cors-allow-origin", ALLOWED, "--cors-allow-origin", "http://other-allowed.example"),
        *("--adapter-source", "local", "--adapter-root", str(tiny.parent / "adapters")),
    ) as s:
        yield s


@pytest.mark.parametrize("path", ["/", "/ping", "/startup", "/health"])
def test_probes_answer_200_without_the_api_key(server: Launcher, path: str) -> None:
    r = requests.get(server.url + path, timeout=10)
    assert r.status_code == 200, r.text
    assert requests.get(server.url + "/info", timeout=10).status_code == 401  # the key still guards the rest


def test_swagger_ui_loads_every_file_from_this_server_and_reads_the_served_document(server: Launcher) -> None:
    import swagger_ui

    page = requests.get(server.url + "/docs", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text), "the page loads nothing from elsewhere"
    files = re.findall(r"(?:src|href)=\"(/docs/static/[^\"]+)\"", page.text)
    assert {"/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui.css"} <= set(files)
    for path in files:
        r = requests.get(server.url + path, timeout=10)
        assert r.status_code == 200, path
        assert r.content == (Path(swagger_ui.__path__[0]) / "static" / Path(path).name).read_bytes()
    spec_url = re.search(r'url: "([^"]+)"', page.text)
    assert spec_url is not None and spec_url.group(1) == "/api-doc/openapi.json"
    doc = requests.get(server.url + spec_url.group(1), timeout=10)  # no key: the browser has none
    assert doc.status_code == 200
    assert doc.json() == requests.get(server.url + "/openapi.json", headers=AUTH, timeout=10).json()
    for path in ("/docs", "/api-doc/openapi.json", "/invocations", "/ping", "/startup", "/"):
        assert path in doc.json()["paths"]
    missing = requests.get(server.url + "/docs/static/swagger-editor-bundle.js", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()


def _preflight(
    server: Launcher, origin: str, headers: str = "content-type,authorization"
) -> requests.Response:
    preflight = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": headers,
    }
    return requests.options(server.url + "/generate", headers=preflight, timeout=10)


def test_the_allowed_origin_passes_the_preflight_and_reads_answers_and_errors(server: Launcher) -> None:
    r = _preflight(server, ALLOWED)
    assert r.status_code == 200, r.text
    assert r.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert {"content-type", "authorization"} <= {
        h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")
    }
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    ok = requests.post(server.url + "/generate", json=body, headers={**AUTH, "Origin": ALLOWED}, timeout=60)
    assert ok.status_code == 200 and ok.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "Origin" in ok.headers["Vary"].split(", ")  # the answer depends on the Origin: caches must know
    assert "Retry-After" in ok.headers["Access-Control-Expose-Headers"]
    refused = requests.post(server.url + "/generate", json=body, headers={"Origin": ALLOWED}, timeout=60)
    assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"] == ALLOWED
    second = _preflight(server, "http://other-allowed.example")
    assert second.headers["Access-Control-Allow-Origin"] == "http://other-allowed.example"


def test_other_origins_fail_the_preflight_and_get_no_cors_headers(server: Launcher) -> None:
    r = _preflight(server, "http://evil.example")
    assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers
    assert _preflight(server, ALLOWED, headers="x-custom").status_code == 403  # a header not allowed
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    r = requests.post(server.url + "/generate", json=body, headers={**AUTH, "Origin": "http://evil.example"})
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers
    assert "Origin" in r.headers["Vary"].split(", ")


def test_without_the_flag_the_server_sends_no_cors_headers() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from loraxpy.router.server import build_app

    async def scenario() -> tuple[int, Any, Any]:
        app = build_app(SimpleNamespace(api_key=None))  # type: ignore[arg-type]
        async with TestClient(TestServer(app)) as client:
            preflight = await client.options(
                "/docs", headers={"Origin": ALLOWED, "Access-Control-Request-Method": "GET"}
            )
            page = await client.get("/docs", headers={"Origin": ALLOWED})
            return preflight.status, preflight.headers.get("Access-Control-Allow-Origin"), page.headers

    status, allow_origin, page_headers = asyncio.run(scenario())
    assert status == 405 and allow_origin is None
    assert "Access-Control-Allow-Origin" not in page_headers and "Vary" not in page_headers


def test_invocations_answers_as_the_route_its_body_names(server: Launcher) -> None:
    def both(path: str, body: dict[str, Any]) -> tuple[Any, Any]:
        direct = requests.post(server.url + path, json=body, headers=AUTH, timeout=60)
        invoked = requests.post(server.url + "/invocations", json=body, headers=AUTH, timeout=60)
        assert direct.status_code == invoked.status_code == 200, invoked.text
        return direct.json(), invoked.json()

    generate = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
    direct, invoked = both("/", generate)
    assert isinstance(invoked, list) and invoked == direct
    chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0}
    direct, invoked = both("/v1/chat/completions", chat)
    assert invoked["object"] == "chat.completion"
    assert invoked["choices"][0]["message"] == direct["choices"][0]["message"]
    completion = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    direct, invoked = both("/v1/completions", completion)
    assert (
        invoked["object"] == "text_completion"
        and invoked["choices"][0]["text"] == direct["choices"][0]["text"]
    )
    embedding = {"input": [PROMPT, "w9 w2"], "encoding_format": "float"}
    direct, invoked = both("/v1/embeddings", embedding)
    assert invoked["object"] == "list" and invoked["data"] == direct["data"] and len(invoked["data"]) == 2


def test_invocations_errors_come_in_the_shape_of_the_routed_api(server: Launcher) -> None:
    def post(body: Any) -> requests.Response:
        return requests.post(server.url + "/invocations", json=body, headers=AUTH, timeout=60)

    openai = post({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": -1})
    assert openai.status_code == 400 and isinstance(openai.json()["error"], dict), openai.text
    assert openai.json()["error"]["param"] == "max_tokens"
    embedding = post({"input": [], "model": "plain"})
    assert embedding.status_code == 400 and embedding.json()["error"]["param"] == "input", embedding.text
    lorax = post({"inputs": PROMPT, "parameters": {"max_new_tokens": -1}})
    assert lorax.status_code == 422 and isinstance(lorax.json()["error"], str), lorax.text
    bad = requests.post(server.url + "/invocations", data=b"{not json", headers=AUTH, timeout=60)
    assert bad.status_code == 422 and "JSON" in bad.json()["error"]
    assert requests.post(server.url + "/invocations", json={"inputs": PROMPT}).status_code == 401


def _rendered(tiny: Path, template: str, messages: list[dict[str, str]]) -> str:
    """The prompt as HF transformers renders `template` for `messages` (the independent reference)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tiny / "tokenizer.json"), chat_template=template)
    return str(hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


@pytest.mark.parametrize(("adapter", "template"), [("templated", ADAPTER_TEMPLATE), ("plain", CHAT_TEMPLATE)])
def test_an_adapter_chats_with_its_own_template_or_else_the_base_models(
    server: Launcher, tiny: Path, adapter: str, template: str
) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model=adapter, messages=messages, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    prompt = _rendered(tiny, template, messages)
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 6, "adapter_id": adapter, "details": True}}
    generated = requests.post(server.url + "/generate", json=body, headers=AUTH, timeout=60).json()
    assert chat.choices[0].message.content == generated["generated_text"]
    assert chat.usage is not None and chat.usage.prompt_tokens == len(prompt.split())  # one word, one token
    assert chat.usage.completion_tokens == generated["details"]["generated_tokens"]


def test_the_template_of_one_adapter_reaches_neither_the_base_model_nor_another(server: Launcher) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": PROMPT}]
    usage = {}
    for model in ("templated", "plain", "templated", str(server_model_id(server))):
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=1)  # type: ignore[arg-type]
        assert chat.usage is not None
        usage.setdefault(model, set()).add(chat.usage.prompt_tokens)
    base = len(f"w1 {PROMPT} w2".split())
    assert usage == {
        "templated": {len(f"w9 w8 {PROMPT} w10 w7".split())},
        "plain": {base},
        server_model_id(server): {base},
    }


def server_model_id(server: Launcher) -> str:
    return str(requests.get(server.url + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"])


def test_an_adapter_template_that_does_not_compile_is_a_400_naming_model(server: Launcher) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="broken", messages=[{"role": "user", "content": PROMPT}], max_tokens=1
        )
    assert "chat template" in str(e.value) and e.value.body["param"] == "model"  # type: ignore[index]
    missing = requests.post(
        server.url + "/v1/chat/completions",
        json={"model": "nowhere", "messages": [{"role": "user", "content": PROMPT}]},
        headers=AUTH,
        timeout=30,
    )
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


TEXTS = ["w5 w17 w3", "w9 w2", "w130 w7 w7 w7 w21 w64 w3 w11 w250 w6 w1 w42 w17 w99 w4 w8 w31 w12"]


def embedding_reference(tiny: Path, ids: list[int], adapter: str | None) -> torch.Tensor:
    """HF transformers' final hidden states (PEFT's model for an adapter): their mean, normalised, as
    the folder's sentence-transformers config says."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    if adapter is None:
        model = AutoModel.from_pretrained(tiny, dtype=torch.float32)
    else:
        causal = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
        model = PeftModel.from_pretrained(causal, tiny.parent / "adapters" / adapter).base_model.model.model
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)


def _ids(server: Launcher, text: str) -> list[int]:
    r = requests.post(server.url + "/tokenize", json={"inputs": text}, headers=AUTH, timeout=30)
    return [t["id"] for t in r.json()]


@pytest.mark.parametrize("adapter", [None, "plain"])
def test_embeddings_equal_hf_and_peft_batched_or_alone_over_the_openai_sdk_and_embed(
    server: Launcher, tiny: Path, adapter: str | None
) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    batched = client.embeddings.create(
        model=adapter or server_model_id(server), input=TEXTS
    )  # base64 by default
    assert batched.usage.prompt_tokens == sum(len(t.split()) for t in TEXTS)
    for i, text in enumerate(TEXTS):
        expected = embedding_reference(tiny, _ids(server, text), adapter)
        body = {"inputs": text, "parameters": {"adapter_id": adapter}}
        alone = requests.post(server.url + "/embed", json=body, headers=AUTH, timeout=60).json()["embeddings"]
        torch.testing.assert_close(torch.tensor(alone), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(batched.data[i].embedding), expected, rtol=0, atol=1e-5)
    if adapter is None:  # lorax-client's embed, unchanged
        from lorax import Client

        vector = Client(server.url, headers=AUTH).embed(TEXTS[0]).embeddings
        torch.testing.assert_close(
            torch.tensor(vector), torch.tensor(batched.data[0].embedding), rtol=0, atol=1e-6
        )


def test_embeddings_take_token_ids_and_floats_and_refuse_what_they_cannot_honour(server: Launcher) -> None:
    def post(body: dict[str, Any]) -> requests.Response:
        return requests.post(server.url + "/v1/embeddings", json=body, headers=AUTH, timeout=60)

    ids = _ids(server, TEXTS[0])
    by_text = post({"input": TEXTS[0], "encoding_format": "float"}).json()
    by_ids = post({"input": ids, "encoding_format": "float", "dimensions": 64}).json()
    assert (
        by_ids["data"][0]["embedding"] == by_text["data"][0]["embedding"]
        and by_ids["usage"]["total_tokens"] == 3
    )
    plain = post({"input": [ids, ids], "model": "plain"}).json()["data"]
    assert [d["index"] for d in plain] == [0, 1] and plain[0]["embedding"] != by_text["data"][0]["embedding"]
    for body, param in [
        ({"input": TEXTS[0], "dimensions": 32}, "dimensions"),
        ({"input": []}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [10**9]}, "input"),
        ({"input": " ".join(["w5"] * 60)}, "input"),  # past --max-input-length
        ({"input": TEXTS[0], "encoding_format": "int8"}, "encoding_format"),
        ({"input": TEXTS[0], "unknown": 1}, "unknown"),
        ({"input": TEXTS[0], "user": "u" * 257}, "user"),
    ]:
        r = post(body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    for body in ({"inputs": ""}, {"inputs": TEXTS[0], "parameters": {"merged_adapters": {"ids": ["plain"]}}}):
        lorax = requests.post(server.url + "/embed", json=body, headers=AUTH, timeout=30)
        assert lorax.status_code == 422 and isinstance(lorax.json()["error"], str), lorax.text


def test_an_embedding_requests_user_reaches_its_trace_span(server: Launcher, otlp: OtlpReceiver) -> None:
    """OpenAI's `user` is honoured on /v1/embeddings as on chat: the span carries it as enduser.id."""
    body = {"input": TEXTS[0], "user": "tenant-embed-7"}
    assert (
        requests.post(server.url + "/v1/embeddings", json=body, headers=AUTH, timeout=60).status_code == 200
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "tenant-embed-7" not in attribute_values(otlp, "enduser.id"):
        time.sleep(0.2)
    assert "tenant-embed-7" in attribute_values(otlp, "enduser.id")
    spans = [s for s in otlp.spans if s.name == "POST /v1/embeddings request"]
    assert spans and any(kv.key == "prompt_tokens" for kv in spans[-1].attributes)
