"""Test helpers: a `lorax-worker` process, tiny random HF models, and a small continuous-batching driver.

The driver is a deliberately simple scheduler (first come, first served; chunked prefill under a
token budget) that talks to a real worker over gRPC, so worker tests need no router.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loraxpy.proto import worker_pb2 as pb
from loraxpy.proto import worker_pb2_grpc
from loraxpy.router.kv_blocks import BlockAllocator

# The device the spawned workers run on: cpu here; `make gpu-check` sets cuda, so the same tests
# prove the CUDA paths equal HF transformers and PEFT (whose references stay on the CPU).
TEST_DEVICE = os.environ.get("LORAX_TEST_DEVICE", "cpu")


def _spawn(
    model_path: Path | str,
    address: str,
    log_path: Path,
    extra_args: tuple[str, ...],
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "loraxpy.worker.cli",
        "--listen",
        address,
        "--model-id",
        str(model_path),
        "--dtype",
        "float32",
        "--device",
        TEST_DEVICE,
        *extra_args,
    ]
    with open(log_path, "w") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )


def _wait_ready(
    procs: list[subprocess.Popen[bytes]], channels: list[grpc.Channel], logs: list[Path], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(range(len(procs)))
    while pending:
        for i in list(pending):
            if procs[i].poll() is not None:
                raise RuntimeError(f"worker exited with {procs[i].returncode}:\n{logs[i].read_text()}")
            try:
                grpc.channel_ready_future(channels[i]).result(timeout=0.5)
                pending.remove(i)
            except grpc.FutureTimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError("worker did not start") from None


def _stop(procs: list[subprocess.Popen[bytes]], channels: list[grpc.Channel]) -> None:
    for channel in channels:
        channel.close()
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def worker_process(
    model_path: Path | str,
    sock_dir: Path,
    *,
    extra_args: tuple[str, ...] = (),
    timeout_s: float = 180.0,
    address: str | None = None,
    env: dict[str, str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> Iterator[worker_pb2_grpc.WorkerStub]:
    """Starts `lorax-worker` (on a unix socket unless `address` is given; `env` on top of ours),
    waits until it answers (over TLS with `credentials`), yields a stub, then stops it."""
    address = address or f"unix://{sock_dir}/worker.sock"
    log = sock_dir / "worker.log"
    proc = _spawn(model_path, address, log, extra_args, env)
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    try:
        _wait_ready([proc], [channel], [log], timeout_s)
        yield worker_pb2_grpc.WorkerStub(channel)
    finally:
        _stop([proc], [channel])


@contextmanager
def sharded_workers(
    model_path: Path | str,
    sock_dir: Path,
    num_shard: int,
    *,
    extra_args: tuple[str, ...] = (),
    timeout_s: float = 180.0,
) -> Iterator[list[worker_pb2_grpc.WorkerStub]]:
    """`num_shard` workers of one model in a gloo group on this host; yields their stubs in rank order."""
    with worker_groups(
        model_path, sock_dir, (num_shard,), extra_args=extra_args, timeout_s=timeout_s
    ) as groups:
        yield groups[0]


@contextmanager
def worker_groups(
    model_path: Path | str,
    sock_dir: Path,
    shard_counts: tuple[int, ...],
    *,
    extra_args: tuple[str, ...] = (),
    timeout_s: float = 180.0,
) -> Iterator[list[list[worker_pb2_grpc.WorkerStub]]]:
    """Independent groups of one model's workers, `shard_counts[i]` shards in group i (gloo, this host),
    all started at once (their start-ups overlap); yields each group's stubs in rank order."""
    probes = [socket.socket() for _ in shard_counts]
    for probe in probes:  # all bound at once: each group's rendezvous port differs from the others'
        probe.bind(("127.0.0.1", 0))
    ports = [str(probe.getsockname()[1]) for probe in probes]
    for probe in probes:
        probe.close()
    procs, channels, logs, groups = [], [], [], []
    for group, (num_shard, port) in enumerate(zip(shard_counts, ports, strict=True)):
        prefix = f"g{group}-" if len(shard_counts) > 1 else ""
        first = len(channels)
        for rank in range(num_shard):
            address = f"unix://{sock_dir}/{prefix}shard-{rank}.sock"
            logs.append(sock_dir / f"{prefix}shard-{rank}.log")
            env = {
                "RANK": str(rank),
                "WORLD_SIZE": str(num_shard),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            }
            procs.append(_spawn(model_path, address, logs[-1], extra_args, env))
            channels.append(grpc.insecure_channel(address))
        groups.append(channels[first:])
    try:
        _wait_ready(procs, channels, logs, timeout_s)
        yield [[worker_pb2_grpc.WorkerStub(c) for c in group] for group in groups]
    finally:
        _stop(procs, channels)


@dataclass
class Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    join_step: int = 0
    params: pb.SamplingParams = field(default_factory=pb.SamplingParams)
    eos_token_ids: tuple[int, ...] = ()
    adapter_index: int = 0
    # filled in while running
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: dict[int, float] = field(default_factory=dict)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    is_sent: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def is_done(self) -> bool:
        return len(self.generated) >= self.max_new_tokens or bool(
            self.generated and self.generated[-1] in self.eos_token_ids
        )


class Driver:
    """Runs requests to completion on a worker, admitting each at its join step."""

    def __init__(
        self,
        stub: worker_pb2_grpc.WorkerStub | list[worker_pb2_grpc.WorkerStub],
        *,
        num_blocks: int,
        block_size: int,
        step_token_budget: int,
        chunk_size: int | None = None,
    ) -> None:
        # All shards of a model get every Step at once (they meet in collectives); rank 0 answers.
        self.stubs = stub if isinstance(stub, list) else [stub]
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.budget = step_token_budget
        self.chunk_size = chunk_size
        self.num_steps = 0

    def run(self, requests: list[Request], max_steps: int = 10_000) -> list[Request]:
        pending = sorted(requests, key=lambda r: r.join_step)
        running: list[Request] = []
        finished_ids: list[int] = []
        while pending or running:
            while pending and pending[0].join_step <= self.num_steps:
                running.append(pending.pop(0))
            step = self._schedule(running, finished_ids)
            finished_ids = []
            response = self._step(step)
            self._apply(response, running)
            for r in [r for r in running if r.is_done]:
                running.remove(r)
                self.allocator.free(r.blocks)
                r.blocks = []
                finished_ids.append(r.id)
            self.num_steps += 1
            if self.num_steps > max_steps:
                raise RuntimeError("driver did not finish")
        if finished_ids:
            self._step(pb.StepRequest(finished_ids=finished_ids))
        return requests

    def _step(self, step: pb.StepRequest) -> pb.StepResponse:
        replies = [f.result() for f in [s.Step.future(step) for s in self.stubs]]
        tokens = [[(o.id, o.token.token_id) for o in r.outputs] for r in replies]
        assert all(t == tokens[0] for t in tokens), "every shard samples the same tokens"
        return replies[0]

    def _schedule(self, running: list[Request], finished_ids: list[int]) -> pb.StepRequest:
        step = pb.StepRequest(finished_ids=finished_ids)
        budget = self.budget
        for r in running:
            n = min(r.num_tokens - r.num_computed, budget, self.chunk_size or budget)
            if n <= 0:
                continue
            new_blocks = self.allocator.allocate(
                self.allocator.blocks_needed(r.num_computed + n, len(r.blocks))
            )
            r.blocks.extend(new_blocks)
            budget -= n
            if r.is_sent:
                step.cached_requests.append(
                    pb.CachedRequest(id=r.id, new_block_ids=new_blocks, num_scheduled_tokens=n)
                )
            else:
                r.is_sent = True
                step.new_requests.append(
                    pb.NewRequest(
                        id=r.id,
                        token_ids=r.prompt,
                        params=r.params,
                        adapter_index=r.adapter_index,
                        block_table=r.blocks,
                        num_scheduled_tokens=n,
                    )
                )
            r.num_computed += n
        return step

    def _apply(self, response: pb.StepResponse, running: list[Request]) -> None:
        by_id = {r.id: r for r in running}
        for out in response.outputs:
            r = by_id[out.id]
            assert out.num_computed_tokens == r.num_computed
            for i, lp in enumerate(out.prompt_logprobs):
                r.prompt_logprobs[out.prompt_logprobs_start + i] = lp
            if out.HasField("token"):
                r.generated.append(out.token.token_id)
                r.logprobs.append(out.token.logprob)
                r.top_logprobs.append([(t.token_id, t.logprob) for t in out.top_logprobs])
