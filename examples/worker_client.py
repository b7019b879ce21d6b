"""Drive one `lorax-worker` over gRPC directly, without the router: a worked example of the protocol.

The router normally does all of this: it owns the KV block allocator and the schedule, and the
worker only runs the steps it is sent (proto/worker.proto documents every field). Here one client
plays the router for a few greedy requests:

1. Info (what the worker serves), then Warmup (allocate the paged KV cache);
2. optionally LoadAdapter: a PEFT adapter into a device slot under an index of our choosing;
3. Steps: each request is sent once in full (NewRequest, with the blocks it needs for its prompt),
   then as a diff (CachedRequest, one token at a time, with a new block whenever it fills one);
4. a last Step whose `finished_ids` releases the requests on the worker.

Start a worker, then run this against its socket:

    lorax-worker --listen unix:///tmp/lorax-worker.sock --adapter-root /srv/adapters
    python examples/worker_client.py --address unix:///tmp/lorax-worker.sock --prompt-ids 1,2,3 \\
        --adapter-id my-finetune --max-new-tokens 8

A worker on TCP requires a shared secret (WORKER_SECRET in both environments); it goes into every
call's metadata as `authorization: Bearer <secret>`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc

from loraxpy.proto import worker_pb2 as pb
from loraxpy.proto import worker_pb2_grpc


class Blocks:
    """The simplest KV block allocator: a free list. The router's does the same, plus preemption."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.free = list(range(num_blocks))
        self.block_size = block_size

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"the KV cache has {len(self.free)} free blocks, {n} needed")
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def needed(self, num_tokens: int, have: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - have)


def generate(
    stub: worker_pb2_grpc.WorkerStub,
    metadata: tuple[tuple[str, str], ...],
    blocks: Blocks,
    prompts: list[tuple[list[int], int]],
    max_new_tokens: int,
) -> list[list[int]]:
    """Greedy tokens for each (prompt, adapter index), all in one continuous batch."""
    tables = [blocks.take(blocks.needed(len(p), 0)) for p, _ in prompts]
    generated: list[list[int]] = [[] for _ in prompts]
    step = pb.StepRequest(
        new_requests=[
            pb.NewRequest(
                id=i + 1,
                token_ids=prompt,
                params=pb.SamplingParams(),  # all unset: greedy
                adapter_index=adapter_index,
                block_table=table,
                num_scheduled_tokens=len(prompt),  # the whole prompt in this step
            )
            for i, ((prompt, adapter_index), table) in enumerate(zip(prompts, tables, strict=True))
        ]
    )
    while True:
        reply = stub.Step(step, metadata=metadata)
        for out in reply.outputs:
            generated[out.id - 1].append(out.token.token_id)
        if all(len(g) >= max_new_tokens for g in generated):
            break
        cached = []
        for i, ((prompt, _), table) in enumerate(zip(prompts, tables, strict=True)):
            # The sampled token is computed next: its K/V needs a slot, maybe in a new block.
            new = blocks.take(blocks.needed(len(prompt) + len(generated[i]), len(table)))
            table.extend(new)
            cached.append(pb.CachedRequest(id=i + 1, new_block_ids=new, num_scheduled_tokens=1))
        step = pb.StepRequest(cached_requests=cached)
    stub.Step(pb.StepRequest(finished_ids=[i + 1 for i in range(len(prompts))]), metadata=metadata)
    for table in tables:
        blocks.free.extend(table)
    return generated


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="the worker's --listen: unix:///path.sock or host:port")
    p.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument(
        "--adapter-id", help="also run the prompt with this adapter (a folder under --adapter-root)"
    )
    p.add_argument("--adapter-source", default="local", help="local, hub or s3")
    args = p.parse_args(argv)

    secret = os.environ.get("WORKER_SECRET")
    metadata = (("authorization", f"Bearer {secret}"),) if secret else ()
    with grpc.insecure_channel(args.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        info = stub.Info(pb.InfoRequest(), metadata=metadata, wait_for_ready=True, timeout=300)
        warm = stub.Warmup(
            pb.WarmupRequest(max_prefill_tokens=256, max_num_seqs=4, num_blocks=64), metadata=metadata
        )
        blocks = Blocks(warm.num_blocks, warm.block_size)
        prompt = [int(t) for t in args.prompt_ids.split(",")]
        prompts = [(prompt, 0)]  # adapter index 0: the base model
        if args.adapter_id:
            spec = pb.AdapterSpec(adapter_id=args.adapter_id, source=args.adapter_source)
            loaded = stub.LoadAdapter(pb.LoadAdapterRequest(adapter=spec, adapter_index=1), metadata=metadata)
            print(f"loaded {args.adapter_id} under index 1 ({loaded.memory_bytes} bytes)", file=sys.stderr)
            prompts.append((prompt, 1))
        tokens = generate(stub, metadata, blocks, prompts, args.max_new_tokens)
    result = {"model_type": info.model_type, "base": tokens[0]}
    if args.adapter_id:
        result["adapter"] = tokens[1]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
