"""``nnssl_train -num_gpus N``: one fold trained by N processes with DDP, as ``nnUNetv2_train -num_gpus``.

The launch is nnU-Net's (``run_training``): ``MASTER_ADDR=localhost``, a free ``MASTER_PORT``
from nnU-Net's ``find_free_network_port`` unless set, ``torch.multiprocessing.spawn`` of N
ranks, each of which initializes the process group and runs the whole training of
:func:`nnssl.training.finetune.train` (nnU-Net's trainer splits the global batch over the ranks,
wraps the network in DDP and lets rank 0 write the checkpoints and the log).

Differences from nnU-Net's ``run_ddp``, which supports CUDA/NCCL only:

- ``-device cpu`` runs N CPU processes on the gloo backend (testing DDP without GPUs; slower
  than one process on the same cores). nnU-Net's trainer assumes DDP means CUDA in two places,
  both adjusted in the rank processes only: its constructor moves the trainer to
  ``cuda:<rank>`` (``finetune.build_trainer`` puts it back on the CPU, without a GradScaler),
  and ``initialize`` passes ``device_ids=[rank]`` to DDP, which CPU modules refuse
  (:func:`_ddp_for_cpu_modules` drops it). Networks with BatchNorm need CUDA here: nnU-Net
  converts BatchNorm to SyncBatchNorm, which has no CPU kernel.
- with ``-pretrained`` every rank injects the checkpoint and the ranks' weights are compared
  before training (``same_start.py``).
- nnssl's errors in a rank are re-raised in the launching process (exit code 2 at the CLI).
"""
import json
import os
import shutil
import tempfile
from typing import Optional

import torch

from nnssl.devices import resolve_device
from nnssl.errors import NnsslError


def _ddp_for_cpu_modules(ddp_class):
    """DDP constructor that ignores ``device_ids`` for modules on the CPU (nnU-Net always passes them)."""
    def make(module, device_ids=None, **kwargs):
        on_cpu = all(p.device.type == "cpu" for p in module.parameters())
        return ddp_class(module, device_ids=None if on_cpu else device_ids, **kwargs)
    return make


def _rank_main(rank: int, world_size: int, backend: str, train_kwargs: dict, result_dir: str) -> None:
    import torch.distributed as dist
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    from nnssl.training.finetune import train

    dist.init_process_group(backend, rank=rank, world_size=world_size)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:
        nnunet_trainer_module.DDP = _ddp_for_cpu_modules(nnunet_trainer_module.DDP)
    try:
        outcome = {"result": train(**train_kwargs)}
    except NnsslError as e:
        outcome = {"error": str(e)}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(outcome, f)


def check_num_processes(num_gpus: int, device: Optional[str]) -> str:
    """The process-group backend for ``-num_gpus`` on ``device``; NnsslError where it cannot run."""
    if num_gpus < 1:
        raise NnsslError(f"-num_gpus must be at least 1 (got {num_gpus}).")
    dev = resolve_device(device)
    if dev.type == "mps":
        raise NnsslError("-num_gpus > 1 with -device mps: torch.distributed has no MPS backend; use -num_gpus 1.")
    if dev.type == "cuda" and torch.cuda.device_count() < num_gpus:
        raise NnsslError(f"-num_gpus {num_gpus}: torch sees {torch.cuda.device_count()} CUDA GPU(s). Lower -num_gpus, "
                         f"or choose the GPUs with CUDA_VISIBLE_DEVICES (or -device cpu for CPU processes).")
    return "nccl" if dev.type == "cuda" else "gloo"


def train_ddp(num_gpus: int, dataset, configuration: str = "3d_fullres", fold="all", **train_kwargs) -> dict:
    """:func:`nnssl.training.finetune.train` in ``num_gpus`` DDP processes; returns rank 0's result."""
    import torch.multiprocessing as mp
    from nnunetv2.run.run_training import find_free_network_port
    from nnssl.training.finetune import _load_plans, resolve_run

    backend = check_num_processes(num_gpus, train_kwargs.get("device"))
    ds, plans_name, _, spec = resolve_run(dataset, configuration, train_kwargs.get("architecture"),
                                          train_kwargs.get("plans"), train_kwargs.get("trainer"))
    batch = _load_plans(ds, plans_name, configuration, spec.name)["configurations"][configuration]["batch_size"]
    if batch < num_gpus:
        raise NnsslError(f"-num_gpus {num_gpus}: the plans' batch size {batch} ({plans_name}, {configuration}) is "
                         f"split over the processes and must be at least the number of processes.")
    os.environ["MASTER_ADDR"] = "localhost"
    os.environ.setdefault("MASTER_PORT", str(find_free_network_port()))
    result_dir = tempfile.mkdtemp(prefix="nnssl_ddp_")
    try:
        kwargs = dict(train_kwargs, dataset=dataset, configuration=configuration, fold=fold)
        mp.spawn(_rank_main, args=(num_gpus, backend, kwargs, result_dir), nprocs=num_gpus, join=True)
        outcomes = []
        for rank in range(num_gpus):
            with open(os.path.join(result_dir, f"rank{rank}.json"), encoding="utf-8") as f:
                outcomes.append(json.load(f))
    finally:
        shutil.rmtree(result_dir, ignore_errors=True)
    errors = [o["error"] for o in outcomes if "error" in o]
    if errors:
        raise NnsslError(errors[0])
    return outcomes[0]["result"]
