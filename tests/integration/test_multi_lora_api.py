"""Multi-LoRA through the launcher: PEFT adapters on the default model, served concurrently with base requests."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import torch
from fake_hub import fake_hub, hub_cache_from_folder
from launcher_process import Launcher, launcher
from lorax import AsyncClient, Client
from lorax.errors import NotFoundError, ValidationError
from safetensors.torch import save_file

from loraxpy.proto.adapter_policy import not_found_message

pytestmark = pytest.mark.slow

# name → (rank, alpha, target modules)
ADAPTERS = {
    "qv-r4": (4, 16, ["q_proj", "v_proj"]),
    "all-r8": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp-r16": (16, 32, ["gate_proj", "up_proj", "down_proj"]),
}
PROMPT = "<|im_start|>user\nWrite one sentence about the sea.<|im_end|>\n<|im_start|>assistant\n"
NUM_CYCLED = 40


def save_adapter(base: Path, out: Path, r: int, alpha: int, targets: list[str], seed: int) -> None:
    save_adapters(base, out.parent, {out.name: (r, alpha, targets, seed)})


def save_adapters(base: Path, root: Path, specs: dict[str, tuple[int, int, list[str], int]]) -> None:
    """PEFT's own adapters, name → (rank, alpha, target modules, seed), with random A and B (answers
    change); the base model is loaded once and given back by `unload` after each save."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for name, (r, alpha, targets, seed) in specs.items():
        torch.manual_seed(seed)
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(root / name)
        model = peft_model.unload()


def write_qv_adapter(base: Path, out: Path, r: int, alpha: int, seed: int) -> None:
    """PEFT's file layout written directly (PEFT's save takes seconds per adapter here): a random
    LoRA on q_proj and v_proj drawn like PEFT's `init_lora_weights=False` (A and B as nn.Linear's
    default init); PEFT itself reads these files for the reference answers."""
    config = json.loads((base / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config["num_key_value_heads"] * config.get("head_dim", hidden // heads)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        for target, out_features in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{target}"
            a = (torch.rand(r, hidden, generator=g) * 2 - 1) / hidden**0.5
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = (torch.rand(out_features, r, generator=g) * 2 - 1) / r**0.5
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors")
    peft = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha}
    (out / "adapter_config.json").write_text(json.dumps({**peft, "target_modules": ["q_proj", "v_proj"]}))


@pytest.fixture(scope="module")
def adapter_root(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    specs = {
        name: (r, alpha, targets, seed) for seed, (name, (r, alpha, targets)) in enumerate(ADAPTERS.items())
    }
    # Same rank as all-r8, fewer modules: the two merge.
    specs["qvd-r8"] = (8, 8, ["q_proj", "v_proj", "down_proj"], 77)
    save_adapters(default_model_path, root, specs)
    for i in range(NUM_CYCLED):
        write_qv_adapter(default_model_path, root / f"cycled-{i}", 1 + i % 3, 8, 1000 + i)
    return root


@pytest.fixture(scope="module")
def server(
    default_model_path: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Launcher]:
    with launcher(
        default_model_path,
        tmp_path_factory.mktemp("lora-launcher"),
        "--adapter-root",
        str(adapter_root),
        "--adapter-source",
        "local",
        "--max-active-adapters",
        "4",
        # Forty adapters through four slots: on a busy CI machine the last ones wait past the 60 s
        # default (the bounded wait itself is test_router_overload.py's).
        "--max-queue-time-s",
        "600",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def peft_greedy(default_model_path: Path, adapter_root: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)

    def run(adapter: str | None, prompt: str, max_new_tokens: int) -> list[int]:
        model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter_root / adapter)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, ids.shape[1] :].tolist()

    return run


def test_base_and_three_adapters_in_one_batch_match_peft(server: Launcher, peft_greedy) -> None:
    names: list[str | None] = [None, *ADAPTERS, None, *ADAPTERS]

    async def concurrently() -> list[list[int]]:
        client = AsyncClient(server.url, timeout=300)

        async def one(name: str | None) -> list[int]:
            response = await client.generate(PROMPT, adapter_id=name, max_new_tokens=16, details=True)
            return [t.id for t in response.details.tokens]

        return list(await asyncio.gather(*(one(n) for n in names)))

    results = asyncio.run(concurrently())
    expected = {name: peft_greedy(name, PROMPT, 16) for name in set(names)}
    for name, tokens in zip(names, results, strict=True):
        assert tokens == expected[name], name
    assert len({tuple(v) for v in expected.values()}) == 4, "each adapter changes the answer"


def test_openai_model_field_selects_an_adapter_and_models_lists_it(server: Launcher, peft_greedy) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    chat = client.chat.completions.create(model="qv-r4", messages=messages, temperature=0, max_tokens=16)
    tokenizer = AutoTokenizer.from_pretrained(server_model_path(server))
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = tokenizer.decode(peft_greedy("qv-r4", prompt, 16), skip_special_tokens=True)
    assert chat.choices[0].message.content == expected
    assert "qv-r4" in [m.id for m in client.models.list().data]


def server_model_path(server: Launcher) -> str:
    return str(requests.get(server.url + "/info", timeout=10).json()["model_id"])


def test_forty_adapters_cycle_through_four_slots(server: Launcher, peft_greedy) -> None:
    async def all_adapters() -> list[str]:
        client = AsyncClient(server.url, timeout=600)

        async def one(i: int) -> str:
            r = await client.generate(PROMPT, adapter_id=f"cycled-{i}", max_new_tokens=6)
            return r.generated_text

        return list(await asyncio.gather(*(one(i) for i in range(NUM_CYCLED))))

    texts = asyncio.run(all_adapters())
    assert len(texts) == NUM_CYCLED and all(texts)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server_model_path(server))
    for i in (0, 13, 39):  # spot-check correctness against PEFT
        assert texts[i] == tokenizer.decode(peft_greedy(f"cycled-{i}", PROMPT, 6), skip_special_tokens=True)


def test_bad_adapters_fail_only_their_requests(server: Launcher, adapter_root: Path) -> None:
    (adapter_root / "corrupt").mkdir(exist_ok=True)
    (adapter_root / "corrupt" / "adapter_config.json").write_text(
        (adapter_root / "qv-r4" / "adapter_config.json").read_text()
    )
    (adapter_root / "corrupt" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    client = Client(server.url)
    cases = [
        ("corrupt", ValidationError, "unreadable"),
        ("no-such-adapter", NotFoundError, "not found"),
        ("../../etc", NotFoundError, "not found"),
    ]
    for adapter_id, error, message in cases:
        with pytest.raises(error, match=message):
            client.generate(PROMPT, adapter_id=adapter_id, max_new_tokens=4)
    r = requests.post(
        server.url + "/generate_stream",
        json={"inputs": PROMPT, "parameters": {"adapter_id": "no-such-adapter", "max_new_tokens": 4}},
        timeout=30,
    )
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    assert client.generate(PROMPT, adapter_id="all-r8", max_new_tokens=4).generated_text
    assert client.generate(PROMPT, max_new_tokens=4).generated_text


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize(("strategy", "density"), [("linear", 1.0), ("ties", 0.6)])
def test_merged_adapters_equal_peft_weighted_merge(
    server: Launcher, default_model_path: Path, adapter_root: Path, peft_greedy, strategy: str, density: float
) -> None:
    from lorax.types import MergedAdapters
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids, weights = ["all-r8", "qvd-r8"], [0.8, -0.6]
    merged = MergedAdapters(ids=ids, weights=weights, merge_strategy=strategy, density=density)
    client = Client(server.url)
    response = client.generate(PROMPT, merged_adapters=merged, max_new_tokens=12, details=True)

    base = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_root / ids[0], adapter_name=ids[0])
    model.load_adapter(adapter_root / ids[1], adapter_name=ids[1])
    model.add_weighted_adapter(ids, weights, "merged", combination_type=strategy, density=density)
    model.set_adapter("merged")
    prompt_ids = AutoTokenizer.from_pretrained(default_model_path)(PROMPT, return_tensors="pt").input_ids
    expected = model.generate(prompt_ids, max_new_tokens=12, do_sample=False)[
        0, prompt_ids.shape[1] :
    ].tolist()
    assert [t.id for t in response.details.tokens] == expected
    assert expected != peft_greedy(ids[0], PROMPT, 12), "the merge changes the answer"
    # Served again from the registry (same merge, same slot): the same answer.
    again = client.generate(PROMPT, merged_adapters=merged, max_new_tokens=12, details=True)
    assert [t.id for t in again.details.tokens] == expected


def test_bad_merges_fail_with_a_clear_error(server: Launcher) -> None:
    from lorax.types import MergedAdapters

    client = Client(server.url)
    different_ranks = MergedAdapters(ids=["qv-r4", "all-r8"], weights=[1.0, 1.0], density=1.0)
    with pytest.raises(ValidationError, match="same rank"):
        client.generate(PROMPT, merged_adapters=different_ranks, max_new_tokens=4)
    missing = MergedAdapters(ids=["all-r8", "no-such-adapter"], weights=[1.0, 1.0], density=1.0)
    with pytest.raises(NotFoundError, match="not found"):
        client.generate(PROMPT, merged_adapters=missing, max_new_tokens=4)
    body = {"ids": ["all-r8"], "weights": [1.0, 2.0], "density": 1.0}
    r = requests.post(
        server.url + "/generate",
        json={"inputs": PROMPT, "parameters": {"merged_adapters": body, "max_new_tokens": 4}},
        timeout=30,
    )
    assert r.status_code == 422 and "same length" in r.json()["error"]
    assert client.generate(PROMPT, adapter_id="all-r8", max_new_tokens=4).generated_text


def _generate(url: str, **parameters: Any) -> requests.Response:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, **parameters}}
    return requests.post(url + "/generate", json=body, timeout=120)


def test_hostile_adapter_requests_get_a_4xx_and_everyone_else_is_served(
    server: Launcher, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside") / "qv-r4"
    shutil.copytree(adapter_root / "qv-r4", outside)
    (adapter_root / "escape").symlink_to(outside)  # a link out of --adapter-root
    shutil.copytree(adapter_root / "qv-r4", adapter_root / "redos")
    config = json.loads((adapter_root / "redos" / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"(.*)*z": 2}  # as a regex over a module name: hours, holding the GIL
    (adapter_root / "redos" / "adapter_config.json").write_text(json.dumps(config))
    refused = [  # (parameters, status, the id a 404 names)
        ({"adapter_id": "qv-r4", "adapter_source": "hub"}, 422, None),  # --adapter-source local pins it
        ({"adapter_id": "s3://bucket/qv-r4", "adapter_source": "s3"}, 422, None),
        ({"adapter_id": "escape"}, 404, "escape"),
        ({"adapter_id": str(outside)}, 404, str(outside)),
        ({"adapter_id": "../../etc"}, 404, "../../etc"),
        ({"merged_adapters": {"ids": ["qv-r4", "escape"], "weights": [1.0, 1.0]}}, 404, "escape"),
        ({"adapter_id": "redos"}, 422, None),
    ]
    for parameters, status, named in refused:
        started = time.monotonic()
        r = _generate(server.url, **parameters)
        assert r.status_code == status, (parameters, r.text)
        assert time.monotonic() - started < 30
        if named is not None:  # not found and not allowed read the same
            assert r.json()["error"] == not_found_message(named)
    assert "adapter_source" in _generate(server.url, adapter_id="x", adapter_source="hub").json()["error"]
    # Every spelling of an id is the one adapter, under its one name.
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "Hi"}]
    for model in ("qv-r4/.", "./qv-r4", "qv-r4/"):
        client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=2)
    names = [m.id for m in client.models.list().data]
    assert "qv-r4" in names and not {"qv-r4/.", "./qv-r4", "qv-r4/", "escape", "redos"} & set(names)
    assert Client(server.url).generate(PROMPT, adapter_id="all-r8", max_new_tokens=4).generated_text
    assert Client(server.url).generate(PROMPT, max_new_tokens=4).generated_text


def test_hub_adapters_are_isolated_per_token_where_weights_are_read(
    default_model_path: Path, adapter_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peft_greedy
) -> None:
    hub = tmp_path / "hub"
    for repo, folder in [
        ("acme/private-lora", "all-r8"),
        ("acme/public-lora", "qv-r4"),
        ("acme/server-only", "mlp-r16"),
        ("acme/slow", "qv-r4"),
    ]:
        hub_cache_from_folder(hub, repo, adapter_root / folder)  # every file is on local disk
    owner, server_token = "hf_tenant_a_secret_token", "hf_server_own_secret_token"
    with fake_hub() as fake:
        fake.readers = {
            "acme/private-lora": {owner},
            "acme/public-lora": {None, owner},
            "acme/server-only": {server_token},
            "acme/slow": {None},
        }
        fake.slow["acme/slow"] = 30.0
        for name, value in (
            ("HF_HUB_CACHE", str(hub)),
            ("HF_ENDPOINT", fake.url),
            ("HF_TOKEN", server_token),
        ):
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        args = ("--adapter-load-timeout-s", "3", "--max-concurrent-adapter-loads", "1")
        with launcher(default_model_path, tmp_path, *args) as s:
            _check_hub_tenants(s, fake, owner, peft_greedy)
            _check_tenants_share_no_cached_prefix(s, owner)
            _check_slow_loads_leave_others_served(s)
            log = s.log()
    assert owner not in log and server_token not in log


def _check_hub_tenants(s: Launcher, fake: Any, owner: str, peft_greedy) -> None:
    private = "acme/private-lora"
    # The first to ask, with some other token, gets a 404 and owns nothing.
    assert _generate(s.url, adapter_id=private, api_token="hf_attacker").status_code == 404
    served = Client(s.url).generate(
        PROMPT, adapter_id=private, api_token=owner, max_new_tokens=8, details=True
    )
    assert [t.id for t in served.details.tokens] == peft_greedy("all-r8", PROMPT, 8)
    refused = [
        {"adapter_id": private},
        {"adapter_id": private, "api_token": "hf_tenant_b_token"},
        {"adapter_id": "acme/private-lora/"},
        {"adapter_id": "./acme/private-lora"},
        {"merged_adapters": {"ids": ["acme/public-lora", private], "weights": [1.0, 1.0]}},
        {"adapter_id": "acme/server-only"},  # the server's own HF_TOKEN could: it is not lent out
    ]
    for parameters in refused:
        r = _generate(s.url, **parameters)
        assert r.status_code == 404, (parameters, r.text)
        assert r.json()["error"] in (not_found_message(private), not_found_message("acme/server-only"))
    assert _generate(s.url, adapter_id="acme/absent").json()["error"] == not_found_message("acme/absent")
    r = requests.post(
        s.url + "/v1/chat/completions",
        json={
            "model": "acme/private-lora/.",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2,
        },
        timeout=60,
    )
    assert r.status_code == 404
    assert ("acme/server-only", "hf_server_own_secret_token") not in fake.seen
    assert _generate(s.url, adapter_id="acme/public-lora").status_code == 200
    models = [m["id"] for m in requests.get(s.url + "/v1/models", timeout=10).json()["data"]]
    assert "acme/public-lora" in models and private not in models


def _check_tenants_share_no_cached_prefix(s: Launcher, owner: str) -> None:
    """A hub adapter read with the requester's token is per tenant in the prefix cache too: the
    anonymous tenant never takes the blocks the owner's requests left (and the reverse)."""

    def cache_hits() -> float:
        text = requests.get(s.url + "/metrics", timeout=10).text
        return next(
            float(v)
            for n, _, v in (line.partition(" ") for line in text.splitlines())
            if n == "lorax_prefix_cache_hits_total"
        )

    def tokens_and_hits(token: str | None) -> tuple[list[int], float]:
        before = cache_hits()
        parameters = {"max_new_tokens": 4, "adapter_id": "acme/public-lora", "details": True}
        if token is not None:
            parameters["api_token"] = token
        prompt = "Read this twice. " * 12 + PROMPT  # several full blocks of its own
        r = requests.post(s.url + "/generate", json={"inputs": prompt, "parameters": parameters}, timeout=120)
        assert r.status_code == 200, r.text
        return [t["id"] for t in r.json()["details"]["tokens"]], cache_hits() - before

    first, second, anonymous, anonymous_again = (tokens_and_hits(t) for t in (owner, owner, None, None))
    assert first[1] == 0 and second[1] >= 3  # the owner's own prefix
    assert anonymous[1] == 0 and anonymous_again[1] == second[1]  # not the owner's: its own, later
    assert first[0] == second[0] == anonymous[0] == anonymous_again[0]


def _check_slow_loads_leave_others_served(s: Launcher) -> None:
    """A hub that stalls holds at most --max-concurrent-adapter-loads loads (and as many waiting);
    the rest are refused at once, the held ones time out, and base requests never wait."""
    statuses: list[int] = []
    slow = [
        threading.Thread(
            target=lambda t=t: statuses.append(
                _generate(s.url, adapter_id="acme/slow", api_token=t).status_code
            )
        )
        for t in ("hf_1", "hf_2", "hf_3")
    ]
    started = time.monotonic()
    for thread in slow:
        thread.start()
    time.sleep(0.5)
    assert Client(s.url).generate(PROMPT, max_new_tokens=4).generated_text
    for thread in slow:
        thread.join(60)
    assert statuses == [429, 429, 429] and time.monotonic() - started < 20


def test_default_and_preloaded_adapters(
    default_model_path: Path, adapter_root: Path, tmp_path: Path, peft_greedy
) -> None:
    with launcher(
        default_model_path,
        tmp_path,
        "--adapter-root",
        str(adapter_root),
        "--adapter-source",
        "local",
        "--adapter-id",
        "qv-r4",
        "--preloaded-adapter-ids",
        "all-r8,mlp-r16",
    ) as s:
        models = [m["id"] for m in requests.get(s.url + "/v1/models", timeout=10).json()["data"]]
        assert {"qv-r4", "all-r8", "mlp-r16"} <= set(models)
        client = Client(s.url)
        default = client.generate(PROMPT, max_new_tokens=8, details=True)
        assert [t.id for t in default.details.tokens] == peft_greedy("qv-r4", PROMPT, 8)
        base_id = requests.get(s.url + "/info", timeout=10).json()["model_id"]
        base = client.generate(PROMPT, adapter_id=base_id, max_new_tokens=8, details=True)
        assert [t.id for t in base.details.tokens] == peft_greedy(None, PROMPT, 8)
