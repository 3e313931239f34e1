"""NT-Xent under DDP (nnssl.ssl.distributed): 2 gloo processes on CPU, each with half of a global batch,
give the single-process loss of that batch (mean over the processes) and its gradients (DDP's average)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nnssl.ssl.distributed import gather_with_grad
from nnssl.ssl.hybrid_mim import nt_xent

N, WORLD = 6, 2  # global pairs, processes


class _Pairs(nn.Module):
    """One linear embedding of both views; ``second_grad=False``: the second view without gradient
    (HybridMIM's second encoder pass)."""

    def __init__(self, second_grad: bool, exclude_positive: bool):
        super().__init__()
        self.embed = nn.Linear(5, 4)
        self.second_grad, self.exclude_positive = second_grad, exclude_positive

    def forward(self, x1, x2):
        with torch.set_grad_enabled(self.second_grad):
            z2 = self.embed(x2)
        return nt_xent(self.embed(x1), z2, 0.5, self.exclude_positive)


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(N, 5, generator=g), torch.randn(N, 5, generator=g)


def _cases():
    return [(True, False), (False, False), (True, True)]


def _worker(rank: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x1, x2 = _data()
        rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        results = []
        for second_grad, exclude in _cases():
            torch.manual_seed(0)
            model = nn.parallel.DistributedDataParallel(_Pairs(second_grad, exclude))
            loss = model(x1[rows], x2[rows])
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_loss_and_gradients(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    x1, x2 = _data()
    for i, (second_grad, exclude) in enumerate(_cases()):
        torch.manual_seed(0)
        single = _Pairs(second_grad, exclude)
        loss = single(x1, x2)
        loss.backward()
        losses = [ranks[r][i][0] for r in range(WORLD)]
        assert not torch.allclose(losses[0], losses[1])  # each process's anchors differ
        assert torch.allclose(sum(losses) / WORLD, loss, atol=1e-6), (i, losses, loss)
        for r in range(WORLD):
            for got, want in zip(ranks[r][i][1], (p.grad for p in single.parameters())):
                assert torch.allclose(got, want, atol=1e-6), (i, r)


def test_a_single_process_gathers_nothing():
    x = torch.randn(3, 2, requires_grad=True)
    gathered, offset = gather_with_grad(x)
    assert gathered is x and offset == 0


def test_rank_local_negatives_would_differ(tmp_path):
    """The check above can fail: each process's loss on its own half (no gathering) misses the other
    half's negatives and gives another value."""
    x1, x2 = _data()
    torch.manual_seed(0)
    model = _Pairs(True, False)
    halves = [model(x1[r * N // WORLD:(r + 1) * N // WORLD], x2[r * N // WORLD:(r + 1) * N // WORLD])
              for r in range(WORLD)]
    assert not torch.allclose(sum(halves) / WORLD, model(x1, x2), atol=1e-3)
