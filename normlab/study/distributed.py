"""Single process or ``torchrun`` data parallel: rank, world size, device, collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str | None = None) -> DistInfo:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE > 1``): gloo on CPU, nccl on
    CUDA. ``device=None`` picks CUDA when available."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank, world, device)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_across(value: float | torch.Tensor, info: DistInfo) -> float:
    """The mean of a scalar over the ranks (itself in a single process)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone().reshape(1)
    if info.enabled:
        t = t.to(info.device) if info.device.startswith("cuda") else t
        dist.all_reduce(t)
        t = t / info.world
    return t.item()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (used to share an error raised on rank 0)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main_then_share(fn, info: DistInfo) -> None:
    """Run ``fn()`` on rank 0; a ``ValueError`` it raises is raised on every rank (no rank is left waiting
    at the next collective)."""
    err = None
    if info.is_main:
        try:
            fn()
        except ValueError as e:
            err = (type(e), str(e))
    err = broadcast_object(err, info)
    if err is not None:
        raise err[0](err[1])
