"""Multi-LoRA through the launcher: PEFT adapters on the default model, served concurrently with base requests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests
import torch
from launcher_process import Launcher, launcher
from lorax import AsyncClient, Client
from lorax.errors import NotFoundError, ValidationError

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
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)  # random A and B: answers change


@pytest.fixture(scope="module")
def adapter_root(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, (r, alpha, targets)) in enumerate(ADAPTERS.items()):
        save_adapter(default_model_path, root / name, r, alpha, targets, seed)
    for i in range(NUM_CYCLED):
        save_adapter(default_model_path, root / f"cycled-{i}", 1 + i % 3, 8, ["q_proj", "v_proj"], 1000 + i)
    # Same rank as all-r8, fewer modules: the two merge.
    save_adapter(default_model_path, root / "qvd-r8", 8, 8, ["q_proj", "v_proj", "down_proj"], 77)
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
        ("../../etc", ValidationError, "outside --adapter-root"),
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


def hub_cache_from_folder(hub: Path, repo_id: str, folder: Path) -> None:
    """Lays out `folder` as huggingface_hub caches a repo: blobs, a snapshot of symlinks, refs/main."""
    commit = "f" * 40
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(folder.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_private_hub_adapter_is_served_only_to_its_token(
    default_model_path: Path, adapter_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peft_greedy
) -> None:
    hub = tmp_path / "hub"
    hub_cache_from_folder(hub, "acme/private-lora", adapter_root / "all-r8")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    token = "hf_tenant_a_secret_token"
    with launcher(default_model_path, tmp_path) as s:
        client = Client(s.url)
        owner = client.generate(
            PROMPT,
            adapter_id="acme/private-lora",
            adapter_source="hub",
            api_token=token,
            max_new_tokens=8,
            details=True,
        )
        assert [t.id for t in owner.details.tokens] == peft_greedy("all-r8", PROMPT, 8)
        for other in (None, "hf_tenant_b_token"):
            r = requests.post(
                s.url + "/generate",
                json={
                    "inputs": PROMPT,
                    "parameters": {
                        "adapter_id": "acme/private-lora",
                        "adapter_source": "hub",
                        "api_token": other,
                        "max_new_tokens": 4,
                    },
                },
                timeout=30,
            )
            assert r.status_code == 401 and "private" in r.json()["error"]
        missing = requests.post(
            s.url + "/generate",
            json={
                "inputs": PROMPT,
                "parameters": {"adapter_id": "acme/absent", "adapter_source": "hub", "max_new_tokens": 4},
            },
            timeout=30,
        )
        assert missing.status_code == 404
        metrics_text = requests.get(s.url + "/metrics", timeout=10).text
        log = s.log()
    assert token not in log and token not in metrics_text


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
