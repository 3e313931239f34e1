"""Gathering rows across DDP processes with gradient, for losses whose candidates are the whole
global batch (HybridMIM's NT-Xent: every sample of every process is a negative, so ``--batch_size``
is the contrastive batch too).

:func:`gather_with_grad` concatenates every process's rows in rank order. Its backward sums the
gradient of the gathered tensor over the processes and hands each process the slice of its own rows:
a process's rows also appear in the other processes' loss terms (as their negatives), and those
terms' gradients reach the rows' owner this way. With each process's loss the mean over its own
anchors, DDP's gradient average then equals the gradient of the global batch's loss. Not
distributed (no process group, or one process): the identity.
"""
from typing import Tuple

import torch
import torch.distributed as dist


def world() -> Tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = (dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every process's loss terms that read these rows
        return grad[ctx.rows[0]:ctx.rows[1]]


def gather_with_grad(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """x: [n, ...] this process's rows (n equal on every process, as the engine's per-process batch)
    -> ([world * n, ...] every process's rows in rank order, the index of this process's first row)."""
    rank, size = world()
    if size == 1:
        return x, 0
    return _GatherWithGrad.apply(x), rank * x.shape[0]
