"""Joins the shards of one model into a torch.distributed group: NCCL on CUDA, gloo on CPU.

Rank, world size and the rendezvous come from the environment as torch's own launchers set them
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so shards may live on several hosts.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


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
