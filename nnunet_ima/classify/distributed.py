"""Multi-process data parallelism under torchrun (gloo on CPU, nccl on CUDA).

Gradients are averaged with one all-reduce per step (what DDP does, without DDP's restriction to a
single forward per backward: IMA forwards clean and noisy batches separately). Weights start equal
(broadcast from rank 0) and stay equal; IMA's margins are merged with ``MarginStore.merge``.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: str = "cpu") -> tuple[int, int]:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1); returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if str(device).startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not str(device).startswith("cuda"):
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return rank(), world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_model(model: torch.nn.Module) -> None:
    if active():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)


def average_gradients(model: torch.nn.Module) -> None:
    if not active():
        return
    w = world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(w)


def average_buffers(model: torch.nn.Module) -> None:
    """Average float buffers (batch-norm running statistics) across ranks, once per epoch."""
    if not active():
        return
    for b in model.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b.div_(world_size())


def check_equal(t: torch.Tensor, what: str) -> None:
    """Raise if ``t`` differs between ranks (a cheap consistency check of margins and weights)."""
    if not active():
        return
    t = t.detach().double().cpu().flatten()
    stats = torch.stack([t.sum(), (t * torch.arange(1, t.numel() + 1, dtype=t.dtype)).sum(), torch.tensor(t.numel())])
    lo, hi = stats.clone(), stats.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"{what} differ between ranks (checksums {lo.tolist()} vs {hi.tolist()})")
