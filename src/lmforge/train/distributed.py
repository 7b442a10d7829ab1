"""Multi-process training: DDP (gloo on CPU, nccl on CUDA) or FSDP, set up from torchrun's environment.

    torchrun --nproc_per_node=2 -m lmforge pretrain ...                      # one machine, 2 processes
    torchrun --nnodes=2 --node_rank=R --rdzv_endpoint=HOST:29500 ...        # several machines

Without torchrun's variables everything here is a no-op and training runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    torch_device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", device_id=torch_device if use_cuda else None
        )
    return DistInfo(rank, world, local_rank, torch_device)


def wrap(model: nn.Module, info: DistInfo, fsdp: bool) -> nn.Module:
    if not info.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel

        # device_id also on CPU (FSDP refuses a CPU module without it); use_orig_params so the optimizer,
        # built on the model's own parameters (with weight-decay groups), is the one that trains them.
        return FullyShardedDataParallel(model, device_id=info.device, use_orig_params=True)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.device] if info.device.type == "cuda" else None)


def sum_across(value: torch.Tensor, info: DistInfo) -> float:
    """The sum of a scalar over all processes (the value itself when there is one)."""
    if info.distributed:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return float(value)


def mean_across(value: torch.Tensor, info: DistInfo) -> float:
    """The mean of a scalar over all processes (the value itself when there is one)."""
    return sum_across(value, info) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
