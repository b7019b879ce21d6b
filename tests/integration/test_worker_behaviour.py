"""Worker behaviour over gRPC: bad input is refused without harm, seeds are batch-independent."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from worker_driver import Driver, Request, worker_process

from loraxpy.proto import worker_pb2 as pb
from loraxpy.proto import worker_pb2_grpc
from loraxpy.proto.auth import call_metadata, new_secret

NUM_BLOCKS = 32
BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def stub(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[worker_pb2_grpc.WorkerStub]:
    with worker_process(tiny_llama, tmp_path_factory.mktemp("sock")) as s:
        yield s


def _new(rid: int, tokens: list[int], blocks: list[int], **params: object) -> pb.NewRequest:
    return pb.NewRequest(
        id=rid,
        token_ids=tokens,
        block_table=blocks,
        num_scheduled_tokens=len(tokens),
        params=pb.SamplingParams(**params),
    )


def test_step_before_warmup_is_refused(stub: worker_pb2_grpc.WorkerStub) -> None:
    assert not stub.Health(pb.HealthRequest()).ready
    with pytest.raises(grpc.RpcError) as e:
        stub.Step(pb.StepRequest(new_requests=[_new(1, [1, 2], [0])]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    warm = stub.Warmup(pb.WarmupRequest(max_prefill_tokens=64, max_num_seqs=4, num_blocks=NUM_BLOCKS))
    assert (warm.num_blocks, warm.block_size) == (NUM_BLOCKS, BLOCK_SIZE)
    assert stub.Health(pb.HealthRequest()).ready
    assert stub.Info(pb.InfoRequest()).num_blocks == NUM_BLOCKS


BAD_STEPS = {
    "unknown cached id": (
        pb.StepRequest(cached_requests=[pb.CachedRequest(id=99, num_scheduled_tokens=1)]),
        "unknown",
    ),
    "unknown finished id": (pb.StepRequest(finished_ids=[98]), "unknown"),
    "token out of vocabulary": (pb.StepRequest(new_requests=[_new(1, [1, 100000], [0])]), "vocabulary"),
    "block out of range": (pb.StepRequest(new_requests=[_new(1, [1, 2], [NUM_BLOCKS])]), "out of range"),
    "too few blocks": (pb.StepRequest(new_requests=[_new(1, list(range(20)), [0])]), "need 2 blocks"),
    "empty prompt": (pb.StepRequest(new_requests=[_new(1, [], [0])]), "empty"),
    "scheduling past the prompt": (
        pb.StepRequest(
            new_requests=[pb.NewRequest(id=1, token_ids=[1], block_table=[0], num_scheduled_tokens=2)]
        ),
        "waiting to be computed",
    ),
    "nothing scheduled": (
        pb.StepRequest(new_requests=[pb.NewRequest(id=1, token_ids=[1], block_table=[0])]),
        "at least 1",
    ),
    "negative temperature": (
        pb.StepRequest(new_requests=[_new(1, [1], [0], do_sample=True, temperature=-1.0)]),
        "temperature",
    ),
    "top_p above one": (pb.StepRequest(new_requests=[_new(1, [1], [0], top_p=1.5)]), "top_p"),
    # inf on the wire (the router refuses 1e39 as not finite in float32): the sampler would get NaNs.
    "infinite repetition penalty": (
        pb.StepRequest(new_requests=[_new(1, [1], [0], repetition_penalty=float("inf"))]),
        "repetition_penalty",
    ),
    "temperature that divides logits into inf": (
        pb.StepRequest(new_requests=[_new(1, [1], [0], do_sample=True, temperature=1e-40)]),
        "temperature",
    ),
    "too many alternatives": (
        pb.StepRequest(new_requests=[_new(1, [1], [0], top_logprobs=1000)]),
        "top_logprobs",
    ),
    "duplicate new ids": (pb.StepRequest(new_requests=[_new(1, [1], [0]), _new(1, [2], [1])]), "unique"),
    "adapter not loaded": (
        pb.StepRequest(
            new_requests=[
                pb.NewRequest(id=1, token_ids=[1], block_table=[0], num_scheduled_tokens=1, adapter_index=3)
            ]
        ),
        "adapter",
    ),
    "mask of the wrong size": (
        pb.StepRequest(
            new_requests=[
                pb.NewRequest(
                    id=1, token_ids=[1], block_table=[0], num_scheduled_tokens=1, allowed_token_mask=b"\xff"
                )
            ]
        ),
        "allowed_token_mask",
    ),
    "more tokens than profiled": (
        pb.StepRequest(new_requests=[_new(1, list(range(100)), list(range(7)))]),
        "profiled",
    ),
}


def _only(token: int, vocab_size: int = 320) -> bytes:
    """The packed mask allowing one token of the tiny llama's vocabulary (4 bytes per 32 tokens)."""
    mask = bytearray(4 * ((vocab_size + 31) // 32))
    mask[token // 8] |= 1 << (token % 8)
    return bytes(mask)


def test_an_allowed_token_mask_decides_greedy_and_sampled_tokens_in_a_mixed_batch(
    stub: worker_pb2_grpc.WorkerStub,
) -> None:
    plain = stub.Step(pb.StepRequest(new_requests=[_new(1, [5, 6, 7], [0])])).outputs[0].token.token_id
    stub.Step(pb.StepRequest(finished_ids=[1]))
    forced = [t for t in (17, 300) if t != plain]
    step = pb.StepRequest(
        new_requests=[
            _new(1, [5, 6, 7], [0]),  # unconstrained: the same token as alone
            pb.NewRequest(
                id=2,
                token_ids=[5, 6, 7],
                block_table=[1],
                num_scheduled_tokens=3,
                allowed_token_mask=_only(forced[0]),
            ),
            pb.NewRequest(
                id=3,
                token_ids=[5, 6, 7],
                block_table=[2],
                num_scheduled_tokens=3,
                params=pb.SamplingParams(do_sample=True, temperature=1.5, seed=9),
                allowed_token_mask=_only(forced[1]),
            ),
        ]
    )
    outputs = stub.Step(step).outputs
    assert [o.token.token_id for o in outputs] == [plain, forced[0], forced[1]]
    # The next step's mask travels with the cached request.
    cached = pb.StepRequest(
        cached_requests=[pb.CachedRequest(id=2, num_scheduled_tokens=1, allowed_token_mask=_only(42))]
    )
    assert stub.Step(cached).outputs[0].token.token_id == 42
    stub.Step(pb.StepRequest(finished_ids=[1, 2, 3]))


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_bad_step_gets_invalid_argument_and_worker_keeps_serving(
    stub: worker_pb2_grpc.WorkerStub, case: str
) -> None:
    request, message = BAD_STEPS[case]
    with pytest.raises(grpc.RpcError) as e:
        stub.Step(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()
    # Nothing was admitted: the same id works now, and its blocks are all usable.
    ok = stub.Step(pb.StepRequest(new_requests=[_new(1, [5, 6, 7], [0])]))
    assert ok.outputs[0].HasField("token")
    stub.Step(pb.StepRequest(finished_ids=[1]))


def test_local_adapters_are_refused_without_an_adapter_root(stub: worker_pb2_grpc.WorkerStub) -> None:
    spec = pb.AdapterSpec(adapter_id="/tmp", source="local")
    with pytest.raises(grpc.RpcError) as e:
        stub.LoadAdapter(pb.LoadAdapterRequest(adapter=spec, adapter_index=1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--adapter-root" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.DownloadAdapter(pb.DownloadAdapterRequest(adapter=spec))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--adapter-root" in e.value.details()


def _sampled(seed: int, rid: int) -> Request:
    return Request(
        id=rid,
        prompt=[3, 1, 4, 1, 5, 9, 2, 6],
        max_new_tokens=16,
        params=pb.SamplingParams(do_sample=True, temperature=1.3, top_k=50, seed=seed),
    )


def test_seeded_sampling_does_not_depend_on_batch_composition(stub: worker_pb2_grpc.WorkerStub) -> None:
    def run(requests: list[Request]) -> list[Request]:
        driver = Driver(stub, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, step_token_budget=64)
        done = driver.run(requests)
        assert driver.allocator.num_free == NUM_BLOCKS
        return done

    alone = run([_sampled(seed=42, rid=10)])[0].generated
    again = run([_sampled(seed=42, rid=11)])[0].generated
    crowd = run(
        [
            Request(
                id=20, prompt=[7, 7, 7], max_new_tokens=5, params=pb.SamplingParams(do_sample=True, seed=1)
            ),
            Request(id=21, prompt=list(range(30)), max_new_tokens=20),
            _sampled(seed=42, rid=22),
            _sampled(seed=43, rid=23),
        ]
    )
    assert alone == again
    assert crowd[2].generated == alone
    assert crowd[3].generated != alone


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_worker_runs(tiny_llama: Path, tmp_path: Path, dtype: str) -> None:
    with worker_process(tiny_llama, tmp_path, extra_args=("--dtype", dtype)) as s:
        assert s.Info(pb.InfoRequest()).dtype == dtype
        warm = s.Warmup(pb.WarmupRequest(max_prefill_tokens=64, max_num_seqs=4, num_blocks=16))
        driver = Driver(s, num_blocks=warm.num_blocks, block_size=warm.block_size, step_token_budget=64)
        done = driver.run(
            [
                Request(id=1, prompt=list(range(10)), max_new_tokens=8),
                Request(id=2, prompt=[4, 5], max_new_tokens=8, join_step=2),
            ]
        )
    for r in done:
        assert len(r.generated) == 8 and all(0 <= t < 320 for t in r.generated)
        assert all(lp <= 0 and lp == lp for lp in r.logprobs)


# Every RPC, each with a request that would change the worker's state (or fetch with its
# credentials) if it were served.
UNAUTHENTICATED_CALLS = {
    "Info": pb.InfoRequest(),
    "Health": pb.HealthRequest(),
    "Warmup": pb.WarmupRequest(max_prefill_tokens=64, max_num_seqs=4, num_blocks=NUM_BLOCKS),
    "Step": pb.StepRequest(new_requests=[_new(1, [1, 2], [0])]),
    "DownloadAdapter": pb.DownloadAdapterRequest(adapter=pb.AdapterSpec(adapter_id="org/x", source="hub")),
    "LoadAdapter": pb.LoadAdapterRequest(adapter=pb.AdapterSpec(adapter_id="/x"), adapter_index=1),
    "OffloadAdapter": pb.OffloadAdapterRequest(adapter_index=1),
}


def test_worker_on_tcp_serves_only_calls_carrying_its_secret(tiny_llama: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    secret = new_secret()
    env = {"WORKER_SECRET": secret}
    with worker_process(tiny_llama, tmp_path, address=f"127.0.0.1:{port}", env=env) as s:
        for metadata in (None, call_metadata(new_secret())):
            for method, request in UNAUTHENTICATED_CALLS.items():
                with pytest.raises(grpc.RpcError) as e:
                    getattr(s, method)(request, metadata=metadata)
                assert (e.value.code(), e.value.details()) == (
                    grpc.StatusCode.UNAUTHENTICATED,
                    "unauthenticated",
                )
        ok = call_metadata(secret)
        assert not s.Health(pb.HealthRequest(), metadata=ok).ready  # the refused Warmup never ran
        assert s.Info(pb.InfoRequest(), metadata=ok).model_type == "llama"
        s.Warmup(UNAUTHENTICATED_CALLS["Warmup"], metadata=ok)
        reply = s.Step(UNAUTHENTICATED_CALLS["Step"], metadata=ok)
        assert [o.id for o in reply.outputs if o.HasField("token")] == [1]
        with pytest.raises(grpc.RpcError) as e:  # past the secret, the worker's own checks
            s.LoadAdapter(UNAUTHENTICATED_CALLS["LoadAdapter"], metadata=ok)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    log = (tmp_path / "worker.log").read_text()
    assert "refused" in log and "clear text" in log and secret not in log


def test_worker_refuses_a_missing_model_with_a_clear_message(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="does not exist"),
        worker_process(tmp_path / "no-such-model", tmp_path),
    ):
        pass
