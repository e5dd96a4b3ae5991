"""torchrun / DistributedDataParallel plumbing: one process per device, rank 0 writes files."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init(device: str | None) -> tuple[World, torch.device]:
    """Joins the process group torchrun describes (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    target = torch.device(kind, world.local_rank) if kind == "cuda" else torch.device(kind)
    if kind == "cuda":
        torch.cuda.set_device(target)
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return world, target


def mean(value: float, world: World, device: torch.device) -> float:
    """The mean of a per-rank float over all ranks."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world.size


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when any rank's flag is set (e.g. Ctrl-C), so all ranks stop at the same step."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item())


def average_gradients(module: torch.nn.Module, world: World) -> None:
    """All-reduce mean of the gradients of a module that is not wrapped in DDP (the discriminator)."""
    if not world.distributed:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world.size


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
