"""Data-parallel training under torchrun: who this process is, the process group, the few collectives used.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address); without them the trainer runs
as the one and only rank and nothing here talks to another process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bmoe_runtime.errors import BmoeError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone evaluates, logs, shows progress and writes checkpoints."""
        return self.rank == 0


def ranks_from_env() -> Ranks:
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if "WORLD_SIZE" not in os.environ:
        return Ranks()
    try:
        rank, world, local = (int(os.environ.get(n, "0")) for n in names)
    except ValueError:
        raise BmoeError("RANK/WORLD_SIZE/LOCAL_RANK are not integers: start data-parallel runs with torchrun") from None
    if not 0 <= rank < world or local < 0:
        raise BmoeError(f"RANK {rank} is outside WORLD_SIZE {world}: start data-parallel runs with torchrun")
    return Ranks(rank, world, local)


def start(ranks: Ranks, device: str) -> str:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns this rank's device."""
    if device == "cuda" and ranks.world > 1:
        if ranks.local >= torch.cuda.device_count():
            raise BmoeError(f"LOCAL_RANK {ranks.local} but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(ranks.local)
        device = f"cuda:{ranks.local}"
    if ranks.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                device_id=torch.device(device) if device.startswith("cuda") else None)
    return device


def stop(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def mean(value: torch.Tensor, ranks: Ranks) -> float:
    """The mean of a scalar over the ranks (each rank's own value when alone)."""
    value = value.detach().float().reshape(1)
    if ranks.world > 1:
        dist.all_reduce(value)
        value /= ranks.world
    return value.item()


def any_rank(flag: bool, ranks: Ranks, device: str) -> bool:
    """True on every rank when `flag` is true on at least one."""
    if ranks.world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather(obj, ranks: Ranks) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if ranks.world == 1:
        return [obj]
    out = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def share(obj, ranks: Ranks):
    """Rank 0's `obj`, on every rank."""
    if ranks.world == 1:
        return obj
    box = [obj if ranks.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
