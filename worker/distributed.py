"""Joins the shards of one model into a torch.distributed group: NCCL on CUDA, gloo on CPU.

Rank, world size and the rendezvous come from the environment as torch's own launchers set them
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so shards may live on several hosts.

A group that loses a member cannot serve again, and a new process cannot join it: every shard then
exits (EXIT_GROUP_BROKEN) so that all of them restart together (lorax-launcher restarts its group;
split pods restart through their restart policy). A shard notices when a step fails mid-forward
(worker/server.py) or, between steps, when its heartbeat (a barrier on a gloo group of its own,
every HEARTBEAT_S) fails.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_GROUP_BROKEN = 3  # the exit status of a shard whose tensor-parallel group broke
HEARTBEAT_S = 2.0
# A peer that died is noticed at once (its connections close); one that hangs, after this long.
HEARTBEAT_TIMEOUT_S = 60.0


def init_distributed(rank: int, world_size: int, device: torch.device, timeout_s: float = 600.0) -> None:
    if world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    logger.info("rank %d/%d joined the %s group", rank, world_size, backend)
    heartbeat = dist.new_group(backend="gloo", timeout=timedelta(seconds=HEARTBEAT_TIMEOUT_S))
    threading.Thread(target=_beat, args=(heartbeat,), name="group-heartbeat", daemon=True).start()


def _beat(group: dist.ProcessGroup) -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        try:
            dist.barrier(group=group)
        except Exception as e:  # a peer is gone: the group is broken for good
            leave_broken_group(f"the group heartbeat failed: {e}")


def leave_broken_group(reason: str) -> None:
    """Exits this shard, so that the whole group restarts."""
    logger.critical("%s: exiting so that every shard of the group restarts", reason)
    logging.shutdown()
    os._exit(EXIT_GROUP_BROKEN)
