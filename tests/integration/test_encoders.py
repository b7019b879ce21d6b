"""BERT-family encoders (BERT, DistilBERT, XLM-RoBERTa) served with LoRA, against HF transformers and
PEFT on tiny random checkpoints: the worker's embeddings equal HF's hidden states pooled as the
model's sentence-transformers config says (or LoRAX's [CLS] without one), with PEFT adapters equal to
the PEFT-wrapped model, in one mixed batch as alone; classification heads' logits equal HF's. Over
a real launcher: /classify and /classify_batch equal HF's token-classification pipeline (simple
aggregation) with and without an adapter, /embed and the openai SDK's embeddings equal HF, and an
encoder refuses generation (and the task it lacks) with a 4xx naming its routes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import tiny_encoders as te
import torch
from launcher_process import Launcher, launcher

from loraxpy.worker.adapters import AdapterError, load_peft_adapter
from loraxpy.worker.batch import NewRequestData, StepInput, WorkerInputError
from loraxpy.worker.encoder import EncoderRunner
from loraxpy.worker.runner import RunnerOptions
from loraxpy.worker.sampling import SamplingParams

pytestmark = pytest.mark.slow

TEXTS = ["anna lives in paris .", "new york city", "the big londoner lives in new york , w3 w7 w9 w11 w0"]
# pooling per family: no sentence-transformers config (LoRAX's raw [CLS]), normalised [CLS], normalised mean
POOLING = {"bert": None, "distilbert": ("cls_token", True), "xlm-roberta": ("mean_tokens", True)}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("encoders")


def _ids(model_path: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(model_path)(text)["input_ids"])


def _pooled(hidden: torch.Tensor, pooling: tuple[str, bool] | None) -> torch.Tensor:
    """The independent reference of the pooling: sentence-transformers' modes over HF's states."""
    if pooling is None:
        return hidden[0]
    mode, normalize = pooling
    vector = hidden[0] if mode == "cls_token" else hidden.mean(dim=0)
    return torch.nn.functional.normalize(vector, dim=0) if normalize else vector


def _runner(path: Path) -> EncoderRunner:
    runner = EncoderRunner(path, RunnerOptions(dtype=torch.float32, device=torch.device("cpu"), max_loras=2))
    runner.warmup(256, 8)
    return runner


def _run(runner: EncoderRunner, inputs: list[tuple[list[int], int]]) -> list[torch.Tensor]:
    """One step computing every (ids, adapter index) input, then one releasing them; their outputs."""
    bs, block, new = runner.options.block_size, 0, []
    for i, (ids, adapter) in enumerate(inputs):
        blocks = tuple(range(block, block + -(-len(ids) // bs)))
        block += len(blocks)
        params = SamplingParams()
        new.append(
            NewRequestData(i, tuple(ids), len(ids), params, adapter, blocks, len(ids), is_embedding=True)
        )
    outputs = runner.step(StepInput(new_requests=tuple(new)))
    runner.step(StepInput(finished_ids=tuple(range(len(inputs)))))
    return [torch.tensor(o.embedding) for o in outputs]


@pytest.mark.parametrize("family", te.FAMILIES)
def test_embeddings_equal_hf_pooled_with_peft_adapters_batched_or_alone(root: Path, family: str) -> None:
    path = te.build(root / family, family)
    if POOLING[family] is not None:
        te.sentence_transformers_pooling(path, *POOLING[family])  # type: ignore[misc]
    adapters = [te.adapter(path, family, root / f"{family}-lora{seed}", seed) for seed in (1, 2)]
    runner = _runner(path)
    for index, adapter in enumerate(adapters, start=1):
        runner.install_adapter(index, load_peft_adapter(adapter, runner.config, 64))
    ids = [_ids(path, text) for text in TEXTS]
    mixed = [(x, index) for index in (0, 1, 2) for x in ids]  # every input under each adapter, one step
    batched = _run(runner, mixed)
    for (x, index), got in zip(mixed, batched, strict=True):
        adapter = adapters[index - 1] if index else None
        expected = _pooled(te.hf_hidden(path, family, x, adapter), POOLING[family])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(_run(runner, [(x, index)])[0], got, rtol=0, atol=1e-5)
    n = len(ids)
    for i in range(n):  # the base model and the two adapters give three different vectors
        base, first, second = batched[i], batched[n + i], batched[2 * n + i]
        assert (
            min((base - first).abs().max(), (base - second).abs().max(), (first - second).abs().max()) > 1e-3
        )


@pytest.mark.parametrize("family", te.FAMILIES)
@pytest.mark.parametrize("head", ["token", "sequence"])
def test_classification_heads_give_hfs_logits_with_and_without_an_adapter(
    root: Path, family: str, head: str
) -> None:
    path = te.build(root / f"{family}-{head}", family, head)
    adapter = te.adapter(path, family, root / f"{family}-{head}-lora", 3, head)
    runner = _runner(path)
    runner.install_adapter(1, load_peft_adapter(adapter, runner.config, 64))
    ids = [_ids(path, text) for text in TEXTS]
    got = _run(runner, [(x, index) for index in (0, 1) for x in ids])
    for k, (x, index) in enumerate((x, index) for index in (0, 1) for x in ids):
        expected = te.hf_logits(path, family, head, x, adapter if index else None)
        torch.testing.assert_close(got[k], expected.flatten(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_labels", [3, 1])
def test_a_sequence_classifiers_answer_equals_hfs_text_classification_pipeline(
    root: Path, num_labels: int
) -> None:
    """The router's answer from the head's logits (proven equal to HF's above): the pipeline's top
    label and score (softmax; sigmoid for one label), as one entity over the whole input."""
    from transformers import AutoTokenizer, BertForSequenceClassification, pipeline

    from loraxpy.proto.model_task import ModelTask
    from loraxpy.router.classification import Spans, classify_answer
    from loraxpy.router.text import Tokenizer

    labels = ("negative", "neutral", "positive") if num_labels == 3 else ("relevance",)
    path = te.build(root / f"sequence-{num_labels}", "bert", "sequence", labels=labels)
    model = BertForSequenceClassification.from_pretrained(path).eval()
    classifier = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(path))
    task = ModelTask.from_folder(path)
    assert len(task.labels) == num_labels
    for text in TEXTS:
        ids = _ids(path, text)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        spans = Spans(text, tuple(ids), (), ())
        got = classify_answer(spans, tuple(logits.tolist()), task, Tokenizer(path))
        expected = classifier(text)[0]
        assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in got] == [
            (expected["label"], text, 0, len(text))
        ]
        assert got[0]["score"] == pytest.approx(expected["score"], abs=1e-6)


def test_an_encoder_runner_has_every_attribute_a_decoders_runner_sets(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EncoderRunner builds its own state instead of ModelRunner's: whatever the servicer may read
    (Info, the adapter RPCs) must exist on both."""
    from conftest import build_tiny_model

    from loraxpy.worker.runner import ModelRunner

    monkeypatch.setenv("LORAX_CPU_FUSED", "0")  # the decoder's fused CPU ops: no build needed here

    decoder = ModelRunner(
        build_tiny_model("llama", root / "llama"),
        RunnerOptions(dtype=torch.float32, device=torch.device("cpu"), max_loras=2, kv_cache_bytes=1 << 20),
    )
    encoder = _runner(te.build(root / "attributes", "bert"))
    assert set(vars(decoder)) - set(vars(encoder)) == set()


def test_an_encoder_refuses_generation_and_adapters_it_cannot_serve(root: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import BertForTokenClassification

    path = te.build(root / "refusals", "bert", "token")
    runner = _runner(path)
    generate = NewRequestData(0, (2, 5, 3), 3, SamplingParams(), 0, (0,), 3)
    with pytest.raises(WorkerInputError, match="encoder"):
        runner.step(StepInput(new_requests=(generate,)))
    # PEFT's token-classification task saves the classifier beside the LoRA (modules_to_save)
    model = BertForTokenClassification.from_pretrained(path)
    config = LoraConfig(r=2, target_modules=["query"], task_type="TOKEN_CLS", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(root / "with-classifier")
    with pytest.raises(AdapterError, match="modules_to_save"):
        load_peft_adapter(root / "with-classifier", runner.config, 64)
    # a DistilBERT adapter's module names are not BERT's
    distil = te.build(root / "distil", "distilbert")
    with pytest.raises(AdapterError, match="cannot adapt on a bert model"):
        load_peft_adapter(te.adapter(distil, "distilbert", root / "distil-lora", 1), runner.config, 64)


# ---- over a real launcher ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ner(root: Path) -> Iterator[tuple[Launcher, Path]]:
    """A BERT token classifier (NER labels) served with one adapter."""
    path = te.build(root / "served-ner", "bert", "token", seed=1)
    te.adapter(path, "bert", root / "served-adapters" / "ner-lora", 6, "token")
    with launcher(
        path,
        root,
        *("--adapter-source", "local", "--adapter-root", str(root / "served-adapters")),
    ) as server:
        yield server, path


@pytest.fixture(scope="module")
def embedder(root: Path) -> Iterator[tuple[Launcher, Path]]:
    """A BERT embedding model (normalised mean, sentence-transformers' config) with one adapter."""
    path = te.build(root / "served-embedder", "bert", seed=7)
    te.sentence_transformers_pooling(path, "mean_tokens", True)
    te.adapter(path, "bert", root / "embed-adapters" / "embed-lora", 8)
    with launcher(
        path, root, *("--adapter-source", "local", "--adapter-root", str(root / "embed-adapters"))
    ) as server:
        yield server, path


def _pipeline_entities(path: Path, adapter: Path | None, text: str) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer, BertForTokenClassification, pipeline

    model = BertForTokenClassification.from_pretrained(path).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()  # type: ignore[assignment]
    ner = pipeline(
        "token-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(path),
        aggregation_strategy="simple", device="cpu",
    )  # fmt: skip
    return [{**e, "score": float(e["score"])} for e in ner(text)]


def _assert_same_entities(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in got] == [
        (e["entity_group"], e["word"], e["start"], e["end"]) for e in expected
    ]
    torch.testing.assert_close(
        torch.tensor([e["score"] for e in got]),
        torch.tensor([e["score"] for e in expected]),
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.parametrize("adapter", [None, "ner-lora"])
def test_classify_equals_hfs_token_classification_pipeline(
    ner: tuple[Launcher, Path], root: Path, adapter: str | None
) -> None:
    server, path = ner
    parameters = {"adapter_id": adapter} if adapter else None
    batch = requests.post(
        server.url + "/classify_batch", json={"inputs": TEXTS, "parameters": parameters}, timeout=60
    )
    assert batch.status_code == 200, batch.text
    groups = [e["entity_group"] for entities in batch.json() for e in entities]
    assert len(groups) > len(TEXTS) and len(set(groups)) > 1  # the random model finds several entities
    if adapter is not None:  # the adapter changes the answers, so serving without it would fail here
        base = requests.post(server.url + "/classify_batch", json={"inputs": TEXTS}, timeout=60).json()
        assert base != batch.json()
    single = {}  # each text alone: a batch's rows may round differently (the linears' kernel per row count)
    for text, from_batch in zip(TEXTS, batch.json(), strict=True):
        r = requests.post(
            server.url + "/classify", json={"inputs": text, "parameters": parameters}, timeout=60
        )
        assert r.status_code == 200, r.text
        single[text] = r.json()
        expected = _pipeline_entities(path, root / "served-adapters" / adapter if adapter else None, text)
        _assert_same_entities(r.json(), expected)
        _assert_same_entities(from_batch, expected)
    if adapter is None:  # SageMaker's /invocations takes LoRAX's body to /classify on a classifier
        invoked = requests.post(server.url + "/invocations", json={"inputs": TEXTS[0]}, timeout=60)
        assert invoked.status_code == 200 and invoked.json() == single[TEXTS[0]]
        from lorax import Client  # lorax-client's classify and classify_batch, unchanged

        client = Client(server.url)
        assert client.classify(TEXTS[0]).entities == single[TEXTS[0]]
        assert [r.entities for r in client.classify_batch(TEXTS)] == batch.json()


def test_a_classifier_refuses_generation_embeddings_and_bad_inputs_with_4xx(
    ner: tuple[Launcher, Path],
) -> None:
    server, _ = ner

    def post(route: str, body: Any) -> requests.Response:
        return requests.post(server.url + route, json=body, timeout=60)

    for route, body in [
        ("/generate", {"inputs": "anna", "parameters": {"max_new_tokens": 2}}),
        ("/generate_stream", {"inputs": "anna"}),
        ("/embed", {"inputs": "anna"}),
    ]:
        r = post(route, body)
        assert r.status_code == 422 and "/classify" in r.json()["error"], (route, r.text)
    for route, body in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "anna"}]}),
        ("/v1/embeddings", {"input": "anna"}),
    ]:
        r = post(route, body)
        assert r.status_code == 400 and "token-classification" in r.json()["error"]["message"], (
            route,
            r.text,
        )
    for route, body in [
        ("/classify", {"inputs": ""}),
        ("/classify", {"inputs": 7}),
        ("/classify", {}),
        ("/classify", {"inputs": " ".join(["w1"] * 200)}),  # longer than the model's 80 positions
        ("/classify_batch", {"inputs": []}),
        ("/classify_batch", {"inputs": "anna"}),
        ("/classify", {"inputs": "anna", "parameters": {"adapter_id": "nowhere"}}),
    ]:
        r = post(route, body)
        assert 400 <= r.status_code < 500 and isinstance(r.json()["error"], str), (route, body, r.text)


@pytest.mark.parametrize("adapter", [None, "embed-lora"])
def test_embed_and_the_openai_sdk_equal_hf_on_an_encoder(
    embedder: tuple[Launcher, Path], root: Path, adapter: str | None
) -> None:
    import openai

    server, path = embedder
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    batched = client.embeddings.create(model=adapter or "base", input=TEXTS) if adapter else None
    if batched is None:
        model_id = requests.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        batched = client.embeddings.create(model=model_id, input=TEXTS)
    for i, text in enumerate(TEXTS):
        ids = _ids(path, text)
        hidden = te.hf_hidden(path, "bert", ids, root / "embed-adapters" / adapter if adapter else None)
        expected = _pooled(hidden, ("mean_tokens", True))
        body = {"inputs": text, "parameters": {"adapter_id": adapter}}
        alone = requests.post(server.url + "/embed", json=body, timeout=60)
        assert alone.status_code == 200, alone.text
        torch.testing.assert_close(torch.tensor(alone.json()["embeddings"]), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(batched.data[i].embedding), expected, rtol=0, atol=1e-5)
    assert batched.usage.prompt_tokens == sum(len(_ids(path, t)) for t in TEXTS)
    if adapter is None:
        from lorax import Client  # lorax-client's embed, unchanged

        vector = Client(server.url).embed(TEXTS[0]).embeddings
        assert vector == pytest.approx(batched.data[0].embedding, abs=1e-6)
        invoked = requests.post(server.url + "/invocations", json={"inputs": TEXTS[0]}, timeout=60)
        assert invoked.status_code == 200 and invoked.json()["embeddings"] == pytest.approx(
            batched.data[0].embedding, abs=1e-6
        )


def test_an_embedding_encoder_refuses_generation_and_classification(embedder: tuple[Launcher, Path]) -> None:
    server, _ = embedder
    r = requests.post(server.url + "/generate", json={"inputs": "anna"}, timeout=30)
    assert r.status_code == 422 and "/embed" in r.json()["error"], r.text
    r = requests.post(server.url + "/classify", json={"inputs": "anna"}, timeout=30)
    assert r.status_code == 422 and "embedding model" in r.json()["error"], r.text
    r = requests.post(server.url + "/v1/completions", json={"prompt": "anna", "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("this model serves no generation")
