"""One worker batch mixing the base model with three PEFT adapters gives PEFT's greedy tokens per request."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from worker_driver import Driver, Request, worker_process

from loraxpy.proto import worker_pb2 as pb
from loraxpy.proto import worker_pb2_grpc
from loraxpy.proto.adapter_policy import not_found_message

# name → (rank, alpha, target modules, rsLoRA)
ADAPTERS = {
    "qv-r4": (4, 8, ["q_proj", "v_proj"], False),
    "all-r8-rslora": (
        8,
        16,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        True,
    ),
    "mlp-o-r16": (16, 4, ["o_proj", "gate_proj", "down_proj"], False),
    "head-r4": (4, 16, ["v_proj", "lm_head"], False),  # LoRA on the LM head too
}
INDEX = {name: i + 1 for i, name in enumerate(ADAPTERS)}


def make_adapters(base: Path, root: Path, model: torch.nn.Module | None = None) -> None:
    """ADAPTERS over the model in folder `base`, or over copies of `model` where given."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for seed, (name, (r, alpha, targets, rslora)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + seed)
        if model is None:
            base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        else:
            base_model = copy.deepcopy(model)
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=targets,
            use_rslora=rslora,
            init_lora_weights=False,
            lora_dropout=0.0,
        )
        get_peft_model(base_model, config).save_pretrained(root / name)


@pytest.fixture(scope="module")
def adapter_root(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    make_adapters(tiny_llama, root)
    return root


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str | None]:
    """A local S3 stand-in (moto's server); the worker finds it through boto3's environment variables.

    None where moto is not installed (the GPU image): only the S3 test needs it, the rest still run.
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def stub(
    tiny_llama: Path, adapter_root: Path, s3_endpoint: str | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[worker_pb2_grpc.WorkerStub]:
    with worker_process(
        tiny_llama,
        tmp_path_factory.mktemp("sock"),
        extra_args=(
            "--adapter-root",
            str(adapter_root),
            "--max-loras",
            "5",
            "--allowed-s3-buckets",
            "adapters",
        ),
    ) as s:
        s.Warmup(pb.WarmupRequest(max_prefill_tokens=128, max_num_seqs=8, num_blocks=64))
        yield s


def peft_greedy(base: Path, adapter_root: Path, name: str | None, prompt: list[int], n: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if name is not None:
        model = PeftModel.from_pretrained(model, adapter_root / name)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def load(stub: worker_pb2_grpc.WorkerStub, index: int, adapter_id: str) -> pb.LoadAdapterResponse:
    return stub.LoadAdapter(
        pb.LoadAdapterRequest(
            adapter=pb.AdapterSpec(adapter_id=adapter_id, source="local"), adapter_index=index
        )
    )


def test_mixed_batch_of_adapters_matches_peft(stub, tiny_llama: Path, adapter_root: Path) -> None:
    assert stub.Info(pb.InfoRequest()).num_adapter_slots == 5  # --max-loras 5 (CPU: no memory budget)
    for name, index in INDEX.items():
        assert load(stub, index, name).memory_bytes > 0
    rng = random.Random(3)
    plan = [
        (None, 9, 0),
        ("qv-r4", 21, 0),
        ("all-r8-rslora", 5, 1),
        ("mlp-o-r16", 14, 1),
        ("qv-r4", 30, 3),
        (None, 17, 4),
        ("all-r8-rslora", 12, 6),
        ("mlp-o-r16", 3, 6),
        ("head-r4", 8, 0),
        ("head-r4", 19, 5),
    ]
    requests = [
        Request(
            id=i + 1,
            prompt=[rng.randrange(320) for _ in range(n)],
            max_new_tokens=10,
            join_step=join,
            adapter_index=INDEX[name] if name else 0,
        )
        for i, (name, n, join) in enumerate(plan)
    ]
    Driver(stub, num_blocks=64, block_size=16, step_token_budget=128, chunk_size=16).run(requests)
    for (name, _, _), r in zip(plan, requests, strict=True):
        assert r.generated == peft_greedy(tiny_llama, adapter_root, name, r.prompt, 10), name
    distinct = {tuple(r.generated) for r in requests[:4]}
    assert len(distinct) == 4, "adapters change the output, so the comparison means something"
    head_only = peft_greedy(tiny_llama, adapter_root, "head-r4", requests[0].prompt, 10)
    assert head_only != requests[0].generated, "the LM head adapter changes the output"


def test_offloaded_slot_is_reused_and_the_old_adapter_leaves_no_trace(
    stub, tiny_llama: Path, adapter_root: Path
) -> None:
    stub.OffloadAdapter(pb.OffloadAdapterRequest(adapter_index=INDEX["all-r8-rslora"]))
    load(stub, 7, "qv-r4")  # takes the freed slot; the previous adapter touched every module
    prompt = [5, 6, 7, 8, 9, 10]
    r = Request(id=100, prompt=prompt, max_new_tokens=8, adapter_index=7)
    Driver(stub, num_blocks=64, block_size=16, step_token_budget=128).run([r])
    assert r.generated == peft_greedy(tiny_llama, adapter_root, "qv-r4", prompt, 8)


def _corrupt(root: Path) -> str:
    bad = root / "corrupt"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_text((root / "qv-r4" / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    return "corrupt"


def _wrong_shape(root: Path) -> str:
    from safetensors.torch import load_file, save_file

    bad = root / "wrong-shape"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_text((root / "qv-r4" / "adapter_config.json").read_text())
    tensors = load_file(str(root / "qv-r4" / "adapter_model.safetensors"))
    save_file(
        {k: torch.cat([v, v], dim=-1) if "lora_A" in k else v for k, v in tensors.items()},
        str(bad / "adapter_model.safetensors"),
    )
    return "wrong-shape"


def _retrained_head(root: Path) -> str:
    from safetensors.torch import load_file, save_file

    bad = root / "retrained-head"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_text((root / "head-r4" / "adapter_config.json").read_text())
    tensors = load_file(str(root / "head-r4" / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lm_head.base_layer.weight"))  # PEFT saves it ("auto")
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    return "retrained-head"


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("make", "code", "message"),
    [
        (_corrupt, INVALID, "unreadable"),
        (_wrong_shape, INVALID, "do not fit"),
        (_retrained_head, INVALID, "replaces the model's lm_head"),
        # Missing and out of bounds read the same: a refusal tells nothing about what exists.
        (lambda root: "missing-adapter", NOT_FOUND, not_found_message("missing-adapter")),
        (lambda root: "../../etc", NOT_FOUND, not_found_message("../../etc")),
        (lambda root: "/etc", NOT_FOUND, not_found_message("/etc")),
    ],
)
def test_bad_adapters_are_refused_clearly_and_the_worker_keeps_serving(
    stub, adapter_root: Path, make, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        load(stub, 9, make(adapter_root))
    assert e.value.code() == code
    assert e.value.details() == message if code == NOT_FOUND else message in e.value.details()
    r = Request(id=200, prompt=[1, 2, 3], max_new_tokens=3, adapter_index=INDEX["qv-r4"])
    Driver(stub, num_blocks=64, block_size=16, step_token_budget=128).run([r])
    assert len(r.generated) == 3


def test_a_step_naming_an_unloaded_adapter_is_refused(stub) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.Step(
            pb.StepRequest(
                new_requests=[
                    pb.NewRequest(
                        id=300, token_ids=[1], block_table=[0], num_scheduled_tokens=1, adapter_index=42
                    )
                ]
            )
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not loaded" in e.value.details()


def test_s3_adapter_is_fetched_once_and_matches_peft(
    stub, tiny_llama: Path, adapter_root: Path, s3_endpoint: str | None
) -> None:
    if s3_endpoint is None:
        pytest.skip("moto is not installed")
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="adapters")
    for f in (adapter_root / "qv-r4").iterdir():
        s3.upload_file(str(f), "adapters", f"team/qv-r4/{f.name}")
    spec = pb.AdapterSpec(adapter_id="s3://adapters/team/qv-r4", source="s3")
    assert stub.DownloadAdapter(pb.DownloadAdapterRequest(adapter=spec)).size_bytes > 0
    stub.LoadAdapter(pb.LoadAdapterRequest(adapter=spec, adapter_index=11))
    r = Request(id=400, prompt=[9, 8, 7, 6, 5], max_new_tokens=8, adapter_index=11)
    Driver(stub, num_blocks=64, block_size=16, step_token_budget=128).run([r])
    assert r.generated == peft_greedy(tiny_llama, adapter_root, "qv-r4", r.prompt, 8)
    s3.create_bucket(Bucket="elsewhere")  # readable with the worker's credentials, but not allowed
    for f in (adapter_root / "qv-r4").iterdir():
        s3.upload_file(str(f), "elsewhere", f"team/qv-r4/{f.name}")
    for adapter_id, code in [
        ("s3://adapters/team/absent", grpc.StatusCode.NOT_FOUND),
        ("s3://elsewhere/team/qv-r4", grpc.StatusCode.NOT_FOUND),
        (f"s3://adapters//{adapter_root}/qv-r4", grpc.StatusCode.INVALID_ARGUMENT),  # once an absolute path
        ("s3://adapters/team/../team/qv-r4", grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        spec = pb.AdapterSpec(adapter_id=adapter_id, source="s3")
        with pytest.raises(grpc.RpcError) as e:
            stub.LoadAdapter(pb.LoadAdapterRequest(adapter=spec, adapter_index=12))
        assert e.value.code() == code, adapter_id


def peft_logprobs(base: Path, adapter_root: Path, name: str | None, tokens: list[int]) -> list[float]:
    """fp32 HF (+ PEFT) log-probability of tokens[j] after tokens[:j], for j >= 1."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if name is not None:
        model = PeftModel.from_pretrained(model, adapter_root / name)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [lp[j - 1, tokens[j]].item() for j in range(1, len(tokens))]


# bf16 rounds every weight and activation (3 significant digits): against fp32 the tiny model's
# log-probabilities moved by 0.014 (base) to 0.055 (a large rank-8 adapter on every projection)
# when this was written. A wrong LoRA or attention path moves them by far more.
BF16_LOGPROB_TOL = 0.08


def test_bfloat16_worker_on_cpu_follows_peft_in_a_mixed_batch(
    tiny_llama: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """bf16 on CPU (--dtype bfloat16, fast where the cores have AVX512-BF16): adapters stay fp32 beside the
    bf16 base and attention runs in fp32, so a mixed batch stays close to fp32 HF + PEFT, teacher-forced
    on PEFT's own greedy continuation (bf16 may flip near-ties, so tokens are not compared)."""
    names = [None, "qv-r4", "all-r8-rslora", "head-r4"]
    rng = random.Random(11)
    full = {}
    for name in names:
        prompt = [rng.randrange(320) for _ in range(12)]
        full[name] = prompt + peft_greedy(tiny_llama, adapter_root, name, prompt, 8)
    with worker_process(
        tiny_llama,
        tmp_path_factory.mktemp("sock"),
        extra_args=("--dtype", "bfloat16", "--adapter-root", str(adapter_root), "--max-loras", "4"),
    ) as s:
        assert s.Info(pb.InfoRequest()).dtype == "bfloat16"
        s.Warmup(pb.WarmupRequest(max_prefill_tokens=128, max_num_seqs=8, num_blocks=32))
        for name in names[1:]:
            load(s, INDEX[name], name)
        requests = [
            Request(
                id=i + 1,
                prompt=full[name],
                max_new_tokens=1,
                adapter_index=INDEX[name] if name else 0,
                params=pb.SamplingParams(prompt_logprobs=True),
            )
            for i, name in enumerate(names)
        ]
        Driver(s, num_blocks=32, block_size=16, step_token_budget=128).run(requests)
    base_ref = peft_logprobs(tiny_llama, adapter_root, None, full[names[1]])
    for name, r in zip(names, requests, strict=True):
        ref = peft_logprobs(tiny_llama, adapter_root, name, full[name])
        ours = [r.prompt_logprobs[j] for j in range(1, len(full[name]))]
        worst = max(abs(a - b) for a, b in zip(ours, ref, strict=True))
        assert worst < BF16_LOGPROB_TOL, (name, worst)
    # The adapters move the same tokens' log-probabilities far beyond that tolerance.
    adapted = peft_logprobs(tiny_llama, adapter_root, names[1], full[names[1]])
    assert max(abs(a - b) for a, b in zip(adapted, base_ref, strict=True)) > 5 * BF16_LOGPROB_TOL
