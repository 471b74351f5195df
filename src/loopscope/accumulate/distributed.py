"""More than one process: which batches a rank runs, and bringing every batch's Part to rank 0.

Started by `torchrun --nproc_per_node N loopscope analyze …` (or `python -m torch.distributed.run …`), each process
calls `init_distributed(device)`, which joins the process group torchrun describes in the environment (RANK,
WORLD_SIZE, MASTER_ADDR/PORT; gloo for the CPU, nccl for CUDA). Rank r runs the batches i with i mod N = r;
`gather_parts` sends each Part (bytes, see `parts.py`) to rank 0 with torch.distributed's own point-to-point
collectives, in batch order, so rank 0 folds exactly what a single process would have folded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from loopscope.errors import InputError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"  # where message tensors live (nccl needs CUDA tensors)

    @classmethod
    def current(cls) -> World:
        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            return cls(dist.get_rank(), dist.get_world_size(), device)
        return cls()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> World:
    """Join torchrun's process group if this process was started by torchrun (else a world of one)."""
    if not launched_by_torchrun():
        return World()
    if not dist.is_available():
        raise InputError("this torch build has no torch.distributed; run in one process")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return World.current()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather_parts(local: dict[int, dict], n_batches: int, world: World) -> dict[int, dict] | None:
    """Every batch's Part on rank 0 (returned there, in full), None on the other ranks. Parts cross processes as
    bytes (`encode_part`: safetensors, no pickle)."""
    from loopscope.accumulate.parts import decode_part, encode_part

    if world.size == 1:
        missing = [i for i in range(n_batches) if i not in local]
        if missing:
            raise InputError(f"batches {missing[:5]} were not run")
        return local
    out: dict[int, dict] = {}
    for i in range(n_batches):
        owner = i % world.size
        if owner == 0:
            if world.rank == 0:
                out[i] = local[i]
            continue
        if world.rank == owner:
            blob = torch.frombuffer(bytearray(encode_part(local[i])), dtype=torch.uint8).to(world.device)
            dist.send(torch.tensor([blob.numel()], dtype=torch.int64, device=world.device), dst=0)
            dist.send(blob, dst=0)
        elif world.rank == 0:
            size = torch.zeros(1, dtype=torch.int64, device=world.device)
            dist.recv(size, src=owner)
            blob = torch.empty(int(size), dtype=torch.uint8, device=world.device)
            dist.recv(blob, src=owner)
            out[i] = decode_part(blob.cpu().numpy().tobytes())
    return out if world.rank == 0 else None
