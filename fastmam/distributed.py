"""Process-group setup for DeepSpeed: the same code under the ``deepspeed`` launcher, ``torchrun``
or a plain ``python`` process (world size 1)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but no CUDA GPU is visible; use device=auto or device=cpu")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def setup(requested_device: str = "auto") -> DistInfo:
    """Initialize torch.distributed through DeepSpeed (nccl on GPU, gloo on CPU) and pick the device.

    A single process started without a launcher gets RANK=0, WORLD_SIZE=1 and a free local port,
    so that DeepSpeed does not go looking for MPI.
    """
    device = resolve_device(requested_device)
    if device.type == "cpu":
        # DeepSpeed would otherwise probe for accelerators; CPU is what we run on
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    return DistInfo(rank, local_rank, torch.distributed.get_world_size(), device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
