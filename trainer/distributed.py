"""Who this process is in the job, read from the environment the Training Operator (or torchrun) sets.

One process per pod: the operator injects MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK, where RANK is
the pod's node index and no LOCAL_RANK is set, so RANK is the global rank and the local rank is 0.
Several processes per pod: the pod runs torchrun, which reads the PET_* variables and sets RANK,
LOCAL_RANK and WORLD_SIZE per process. Both arrive here as plain env:// rendezvous.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(timeout_s: float = 1800) -> World:
    """Join the job's process group; timeout_s bounds how long any collective waits for the slowest rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # DeepSpeed reads LOCAL_RANK even for one process per pod, where the operator does not set it
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank, world_size, local_rank, device, backend)


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when any rank says so (stop requests must be acted on together)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(count: int, world: World) -> np.ndarray:
    """This rank's contiguous share of samples 0..count-1 (shares differ by at most one sample)."""
    return np.array_split(np.arange(count), world.world_size)[world.rank]
