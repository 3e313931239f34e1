"""The pretraining engine: one trainer for every SSL method (taken by name from the registry).

Per step: the loader's batch for iteration ``it`` (see ``pretrain_data``), lr from the schedule
(a pure function of ``it``), ``torch.manual_seed`` from (seed, rank, it) so dropout is
reproducible after a resume, ``method.forward_loss``, backward of ``losses["loss"]``, gradient
clipping, optimizer step. AMP (fp16 autocast + GradScaler) and ``torch.compile`` on CUDA only;
on the CPU ``--cpu_precision`` (as in ``nnssl_train``; "auto": bf16 autocast where the CPU has
native bf16) runs ``forward_loss`` under bf16 autocast. Either way only the network and the
heads run in low precision: every method computes its loss terms in float32 outside autocast
(``nnssl.ssl.base.float32_loss``). The precision is saved with the run (``config.json``, the
resume state) and ``--c`` continues in it (an explicit different ``--cpu_precision`` is refused).
``checkpoint_latest.pth`` is written every epoch (every ``iterations_per_epoch`` iterations and
at the end), ``checkpoint_final.pth`` at the end; ``--c`` resumes bit-exactly on CPU.

DDP: under ``torchrun`` (WORLD_SIZE > 1) every process trains on its own data (its rank is in
the batch rng key); the batch size is global and each process gets ``batch_size / world_size``
samples; rank 0 writes checkpoints and logs; at the end the ranks check that their weights agree.

Tracking (W&B through nnU-Net's ``nnUNet_wandb_enabled``, TensorBoard): see ``loggers.py``.
"""
import contextlib
import dataclasses
import json
import math
import os
import time
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from nnssl import locks, paths
from nnssl.checkpoints import (checkpoint_metadata, load_resume_checkpoint, publish_final, restore_network,
                               save_pretraining_checkpoint, split_network_state, to_plain, weights_sha256)
from nnssl.devices import cpu_autocast_dtype, resolve_device
from nnssl.errors import NnsslError
from nnssl.io import check_writable, write_json
from nnssl.training.loggers import Trackers, wanted
from nnssl.training.pretrain_data import PretrainLoader, batch_from_item, make_loader, map_tensors, shutdown
from nnssl.training.pretrain_setup import PretrainSetup, prepare, prepare_method
from nnssl.training.pretraining_cases import case_record
from nnssl.training.progress import ProgressLog
from nnssl.training.schedules import schedule_from_config

# Assumption: when neither --iterations nor the method config's `iterations` is given, train
# 100k iterations (the lower end of Volume Fusion's 100k-400k).
DEFAULT_ITERATIONS = 100_000
DEFAULT_LR, DEFAULT_WEIGHT_DECAY = 1e-4, 1e-5  # AdamW defaults when a method sets no optimizer fields
DEFAULT_GRAD_CLIP = 12.0  # nnU-Net's max gradient norm
LATEST, FINAL = "checkpoint_latest.pth", "checkpoint_final.pth"
# What the forward pass runs in: the saved name of each autocast dtype (None: float32 throughout).
PRECISIONS = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16_amp"}


def changed_keys(saved, now, key: str) -> List[str]:
    """``"key.sub: checkpoint X, now Y"`` for each leaf that differs (not two whole config dicts)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now), key=str)
                for d in changed_keys(saved.get(k, "(absent)"), now.get(k, "(absent)"), f"{key}.{k}")]
    return [] if saved == now else [f"{key}: checkpoint {saved!r}, now {now!r}"]


def output_folder_for(setup: PretrainSetup) -> str:
    fold = "" if setup.fold is None else f"__fold{setup.fold}"
    return os.path.join(paths.results(), setup.target, f"nnsslPretrain__{setup.method_name}__{setup.arch.name}__"
                        f"{setup.plans_manager.plans_name}__{setup.configuration}{fold}")


def step_seed(seed: int, rank: int, iteration: int) -> int:
    """torch seed of step ``iteration`` (dropout, any torch randomness inside forward_loss)."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(iteration), 1]).generate_state(1)[0])


class _PretrainModel(nn.Module):
    """Network + method heads as one module, so DDP/compile see every trained parameter."""

    def __init__(self, network: nn.Module, method: nn.Module):
        super().__init__()
        self.network, self.method = network, method

    def forward(self, batch):
        return self.method.forward_loss(self.network, batch)


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    name = str(getattr(cfg, "optimizer", "adamw")).lower()
    lr, wd = float(getattr(cfg, "lr", DEFAULT_LR)), float(getattr(cfg, "weight_decay", DEFAULT_WEIGHT_DECAY))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "sgd":  # nnU-Net's SGD settings
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(getattr(cfg, "momentum", 0.99)),
                               nesterov=True)
    raise NnsslError(f"Unknown optimizer '{name}'; choose adam, adamw or sgd (--set optimizer=adamw).")


class Pretrainer:
    """One pretraining run: network from the plans, the method (heads), optimizer, schedule, and the
    loop; ``load`` continues from a resume checkpoint, ``run`` trains up to ``total_iterations``."""

    def __init__(self, setup: PretrainSetup, output_folder: str, total_iterations: int, iterations_per_epoch: int,
                 device: torch.device, seed: int, num_workers: int, compile_network: bool,
                 rank: int = 0, world_size: int = 1, cpu_precision: Optional[str] = None,
                 trackers: Sequence[str] = (), show_progress: bool = True):
        self.s, self.folder = setup, output_folder
        self.tracker_names, self.show_progress = list(trackers), show_progress
        self.trackers = Trackers([], output_folder, {}, resume=False)  # opened in run()
        self.total, self.ipe = int(total_iterations), int(iterations_per_epoch)
        self.device, self.seed, self.num_workers = device, int(seed), int(num_workers)
        self.rank, self.world = rank, world_size
        self.is_main = rank == 0
        self.log = ProgressLog(output_folder, enabled=self.is_main)
        torch.manual_seed(self.seed)  # identical initialization on every rank and in every rerun
        self.network = setup.build_network()
        self.method = setup.method_cls(setup.cfg, self.network, setup.crop_size, setup.input_channels)
        self.model = _PretrainModel(self.network, self.method).to(device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(setup.cfg, self.params)
        self.schedule = schedule_from_config(setup.cfg, self.total, DEFAULT_LR)
        self.amp = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        # None: "auto" for a new run, the saved precision for a resumed one (see load)
        self.cpu_precision_given = cpu_precision is not None
        self.autocast_dtype = torch.float16 if self.amp else cpu_autocast_dtype(cpu_precision or "auto", device)
        clip = getattr(setup.cfg, "grad_clip", DEFAULT_GRAD_CLIP)
        self.grad_clip = float(clip) if clip else None
        self.train_model = self.model
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            # Some methods leave parts unused (encoder-only methods never touch the decoder).
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                                   find_unused_parameters=True)
        self.compile_ignored = compile_network and device.type != "cuda"
        if compile_network and device.type == "cuda":
            self.train_model = torch.compile(self.train_model)
        self.iteration, self.history = 0, []
        self.first_batch_sha256 = None  # digest of this rank's first batch: the DDP check shows ranks differ

    # --- checkpoints ---
    def metadata(self) -> dict:
        s = self.s
        return {**checkpoint_metadata(
            architecture_name=s.arch.name, plans_manager=s.plans_manager, configuration_name=s.configuration,
            input_channels=s.input_channels, method_name=s.method_name, method_config=s.cfg,
            transfer=getattr(s.cfg, "transfer", s.method_cls.transfer), pretraining_data=s.source, dataset=s.target,
            iteration=self.iteration, seed=self.seed), **case_record(s.cases)}

    @property
    def precision(self) -> str:
        return PRECISIONS[self.autocast_dtype]

    def save(self, name: str) -> None:
        resume = {"precision": self.precision, "optimizer": self.optimizer.state_dict(),
                  "method_state": self.method.state_dict(),
                  "grad_scaler": self.scaler.state_dict(), "loss_history": self.history,
                  "schedule": self.schedule.to_dict()}
        save_pretraining_checkpoint(os.path.join(self.folder, name), self.network, self.metadata(), resume)

    def load(self, path: str) -> None:
        ckpt = load_resume_checkpoint(path)
        mine = self.metadata()
        # --iterations may grow on --c (it is mirrored in a method's `iterations` field, if any)
        for meta in (ckpt, mine):
            meta["method"]["config"].pop("iterations", None)
        diffs = [d for k in ("architecture", "plans_name", "configuration", "input_channels", "method",
                             "pretraining_data", "seed") for d in changed_keys(to_plain(ckpt[k]), mine[k], k)]
        if ckpt.get("pretraining_cases_sha256", mine["pretraining_cases_sha256"]) != mine["pretraining_cases_sha256"]:
            diffs.append(f"pretraining cases: checkpoint {ckpt.get('pretraining_cases_count')}, now "
                         f"{mine['pretraining_cases_count']} (another --fold or changed pretraining data)")
        if diffs:
            raise NnsslError(f"--c continues the run in {self.folder} with its saved settings, but these differ: "
                             + "; ".join(diffs) + ". Drop the changed flags (--set, --batch_size, --seed, -pd), "
                             "or start a new run with -o NEW_FOLDER.")
        self._continue_precision(ckpt["resume"])
        restore_network(self.network, ckpt)
        self.method.load_state_dict(ckpt["resume"]["method_state"])
        self.optimizer.load_state_dict(ckpt["resume"]["optimizer"])
        if self.amp and ckpt["resume"]["grad_scaler"]:
            self.scaler.load_state_dict(ckpt["resume"]["grad_scaler"])
        self.iteration, self.history = int(ckpt["iteration"]), list(ckpt["resume"]["loss_history"])
        self.log.log(f"Resuming from {path} at iteration {self.iteration}.")
        saved = ckpt["resume"].get("schedule") or {}
        if saved and to_plain(saved) != to_plain(self.schedule.to_dict()):
            # Schedule lengths are shares of --iterations: a longer run stretches the whole curve.
            self.log.log(f"Note: the lr schedule now spans {self.total} iterations instead of "
                         f"{saved.get('total_iterations')}; the steps from {self.iteration} on follow the new curve.")

    def _continue_precision(self, resume: dict) -> None:
        """Keep the run in the precision it was started in: adopt it on the CPU when --cpu_precision
        was not given, refuse a different one otherwise."""
        # Checkpoints from before the precision was saved: fp16 AMP left a GradScaler state, fp32 none.
        saved = resume.get("precision") or ("fp16_amp" if resume.get("grad_scaler") else "fp32")
        if saved == self.precision:
            return
        if self.device.type == "cpu" and not self.cpu_precision_given and saved in ("fp32", "bf16"):
            self.autocast_dtype = cpu_autocast_dtype(saved, self.device)
            return
        fix = (f"-device cpu --cpu_precision {saved}" if saved != "fp16_amp" else "-device cuda (fp16 AMP)")
        raise NnsslError(f"--c continues the run in {self.folder}, which was trained in {saved}, but this run would "
                         f"train in {self.precision}; mixing precisions in one run is refused. Continue with {fix}, "
                         f"or start a new run with -o NEW_FOLDER.")

    def write_config(self, world_size: int, num_workers: int) -> None:
        """``config.json``: the final method config and everything the run was started with."""
        if not self.is_main:
            return
        s = self.s
        write_json({"dataset": s.target, "method": s.method_name, "config": to_plain(s.cfg),
                    "architecture": s.arch.name, "plans": s.plans_manager.plans_name,
                    "configuration": s.configuration, "pretraining_data": s.source,
                    "pretraining_data_folder": s.data_folder, **s.crop_choice.record(), "pretraining_fold": s.fold,
                    "pretraining_includes_test_images": s.includes_test_images, **case_record(s.cases),
                    "pretraining_cases": list(s.cases),
                    "batch_size_per_process": s.batch_size, "world_size": world_size, "seed": self.seed,
                    "iterations": self.total, "iterations_per_epoch": self.ipe, "device": str(self.device),
                    "num_workers": int(num_workers), "amp": self.amp, "precision": self.precision,
                    "optimizer": type(self.optimizer).__name__,
                    "lr_schedule": self.schedule.to_dict()}, os.path.join(self.folder, "config.json"))

    # --- training ---
    def _step(self, it: int, batch) -> Dict[str, float]:
        lr = self.schedule.lr(it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(self.seed, self.rank, it))
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            losses = self.train_model(batch)
        names = sorted(k for k, v in losses.items() if torch.is_tensor(v) and v.numel() == 1)
        vec = torch.stack([losses[k].detach().float().reshape(()) for k in names])
        if self.world > 1:  # every rank sees the same numbers, so all stop together on a non-finite loss
            dist.all_reduce(vec)
            vec /= self.world
        values = dict(zip(names, vec.cpu().tolist()))
        if not all(math.isfinite(v) for v in values.values()):
            self._non_finite(it, values)
        self.scaler.scale(losses["loss"]).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step(it, self.total)  # e.g. EMA target networks
        return values

    def _non_finite(self, it: int, values: Dict[str, float]):
        latest = os.path.join(self.folder, LATEST)
        kept = (f"The last good checkpoint {latest} is kept." if os.path.isfile(latest)
                else "No checkpoint had been written yet.")
        terms = ", ".join(f"{k}={v}" for k, v in values.items())
        raise NnsslError(f"Non-finite loss at iteration {it} ({terms}); training stopped. {kept} Lower the learning "
                         f"rate (--set lr=...) or check the data, and start a new run (-o NEW_FOLDER or after "
                         f"removing {self.folder}).")

    def run(self) -> None:
        s = self.s
        if self.compile_ignored:
            self.log.log("--compile is ignored on CPU (torch.compile is only used on CUDA).")
        loader = make_loader(PretrainLoader(s.data_folder, s.batch_size, s.crop_size, s.method_cls, s.cfg, self.seed,
                                            self.rank, self.iteration, self.num_workers, s.cases),
                             self.num_workers)
        self.model.train()
        config = {}
        if self.is_main:
            with open(os.path.join(self.folder, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
        self.trackers = Trackers(self.tracker_names, self.folder, config, self.iteration > 0, self.is_main)
        try:
            while self.iteration < self.total:
                self._epoch(loader)
        finally:
            shutdown(loader)
            self.trackers.close()
        if self.is_main:  # the last epoch just wrote checkpoint_latest at this very iteration
            publish_final(os.path.join(self.folder, LATEST), os.path.join(self.folder, FINAL))
        if self.world > 1:
            self._check_ranks_agree()
        self.log.log(f"Finished: {self.iteration} iterations; {os.path.join(self.folder, FINAL)}")

    def _epoch(self, loader) -> None:
        epoch = self.iteration // self.ipe
        end = min((epoch + 1) * self.ipe, self.total)
        first, start_time, wait, sums, lr = self.iteration, time.perf_counter(), 0.0, defaultdict(float), 0.0
        for it in tqdm(range(first, end), desc=f"epoch {epoch}", disable=not (self.is_main and self.show_progress),
                       leave=False):
            t0 = time.perf_counter()
            item = next(loader)  # the time blocked here is the data wait
            waited = time.perf_counter() - t0
            wait += waited
            if item["iteration"] != it:
                raise RuntimeError(f"loader returned batch {item['iteration']} for iteration {it}")
            batch = map_tensors(batch_from_item(item), lambda x: x.to(self.device, non_blocking=True))
            if self.world > 1 and self.first_batch_sha256 is None:
                self.first_batch_sha256 = weights_sha256({k: v for k, v in batch.items() if torch.is_tensor(v)})
            values = self._step(it, batch)
            for k, v in values.items():
                sums[k] += v
            lr, self.iteration = self.schedule.lr(it), it + 1
            self.trackers.iteration(it, values, lr, waited)
        n = end - first
        elapsed = time.perf_counter() - start_time
        record = {"epoch": epoch, "iteration": self.iteration, "lr": lr, "epoch_time": elapsed, "data_wait": wait,
                  "data_wait_fraction": wait / max(elapsed, 1e-12), "losses": {k: v / n for k, v in sums.items()}}
        self.history.append(record)
        self.trackers.epoch(end - 1, elapsed, record["data_wait_fraction"])
        self.log.epoch(record, self.history, final=self.iteration >= self.total, schedule=self.schedule)
        for message in self.method.epoch_messages(record):  # e.g. a collapse warning
            self.log.log(message)
        if self.is_main:
            self.save(LATEST)

    def _check_ranks_agree(self) -> None:
        mine = weights_sha256(split_network_state(self.network)[0])
        hashes = [None] * self.world
        dist.all_gather_object(hashes, mine)
        self.log.log(f"DDP check: network weights sha256 per rank: {hashes}")
        data = [None] * self.world
        dist.all_gather_object(data, self.first_batch_sha256)
        self.log.log(f"DDP check: first batch sha256 per rank (each rank draws its own data): {data}")
        if len(set(hashes)) != 1:
            raise RuntimeError(f"DDP ranks ended with different weights: {hashes}")


def pretrain(dataset, method: str, architecture: str = "plainconvunet", pretraining_data: str = "intask",
             configuration: str = "3d_fullres", iterations: Optional[int] = None, iterations_per_epoch: int = 250,
             batch_size: Optional[int] = None, device: Optional[str] = None, resume: bool = False, seed: int = 0,
             overrides: Sequence[str] = (), num_workers: Optional[int] = None, compile_network: bool = False,
             output_folder: Optional[str] = None, fold: Optional[int] = None,
             cpu_precision: Optional[str] = None, tensorboard: bool = False, show_progress: bool = True) -> str:
    """Run (or with ``resume`` continue) a pretraining; returns the output folder.

    ``fold``: in-task pretraining on fold ``fold``'s training cases only (``nnssl_pretrain --fold``;
    output folder ``...__fold<K>``), so fine-tuning that fold validates on unseen cases.
    ``cpu_precision`` ("auto" | "fp32" | "bf16", ``--cpu_precision``): the CPU's autocast dtype
    (:func:`nnssl.devices.cpu_autocast_dtype`); None: "auto" for a new run, the saved one with ``resume``.
    ``tensorboard``: also log to TensorBoard (W&B and TensorBoard switches: ``loggers.py``);
    ``show_progress=False``: no progress bars.

    The engine seeds torch's global generator (initialization, per-step dropout seeds); the caller's
    generator state (CPU and CUDA) is restored on return, so calling this from Python leaves the
    caller's random streams where they were."""
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices):
        return _pretrain(dataset, method, architecture, pretraining_data, configuration, iterations,
                         iterations_per_epoch, batch_size, device, resume, seed, overrides, num_workers,
                         compile_network, output_folder, fold, cpu_precision, tensorboard, show_progress)


def _pretrain(dataset, method, architecture, pretraining_data, configuration, iterations, iterations_per_epoch,
              batch_size, device, resume, seed, overrides, num_workers, compile_network, output_folder, fold,
              cpu_precision, tensorboard, show_progress) -> str:
    if cpu_precision is not None:
        cpu_autocast_dtype(cpu_precision, torch.device("cpu"))  # an unknown value is refused before any work
    trackers = wanted(tensorboard)  # a switched-on tracker that is not installed is refused before anything runs
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:  # where the output folder will be (-o, else under nnUNet_results), before any slow work
        check_writable(output_folder or paths.results(), "The pretraining output folder (-o, default: under "
                                                         "nnUNet_results)")
        setup = prepare(dataset, method, architecture, pretraining_data, configuration, overrides, batch_size, world,
                        fold)
        total = int(iterations if iterations is not None else getattr(setup.cfg, "iterations", DEFAULT_ITERATIONS))
        if total < 1 or iterations_per_epoch < 1:
            raise NnsslError(f"--iterations ({total}) and --iterations_per_epoch ({iterations_per_epoch}) must be "
                             f">= 1.")
        if hasattr(setup.cfg, "iterations"):  # the saved config tells the length actually trained
            setup = dataclasses.replace(setup, cfg=dataclasses.replace(setup.cfg, iterations=total))
        schedule_from_config(setup.cfg, total, DEFAULT_LR)  # refuse a bad schedule before prepare's slow work
        setup = prepare_method(setup, seed, distributed=world > 1)
        if num_workers is None:
            from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
            num_workers = get_allowed_n_proc_DA()
        folder = os.path.abspath(output_folder or output_folder_for(setup))
        check_writable(folder, "The pretraining output folder")
        # rank 0 speaks for the run (under torchrun, a refused rank 0 stops the other ranks too)
        with locks.exclusive(folder, f"The pretraining folder {folder}") if rank == 0 else contextlib.nullcontext():
            return _train_in(folder, setup, resume, total, iterations_per_epoch, dev, seed, num_workers,
                             compile_network, rank, world, cpu_precision, trackers,
                             show_progress)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train_in(folder: str, setup: PretrainSetup, resume: bool, total: int, iterations_per_epoch: int, dev, seed: int,
              num_workers: int, compile_network: bool, rank: int, world: int, cpu_precision: Optional[str],
              trackers: Sequence[str] = (), show_progress: bool = True) -> str:
    """Train (or resume) in ``folder``, which this run holds the lock of."""
    existing = [p for p in (os.path.join(folder, LATEST), os.path.join(folder, FINAL)) if os.path.isfile(p)]
    if resume and not existing:
        raise NnsslError(f"--c was given but {folder} has no {LATEST} or {FINAL} to resume from; "
                         f"run without --c to start a new pretraining.")
    if not resume and existing:
        raise NnsslError(f"{folder} already holds a pretraining ({os.path.basename(existing[0])}). Pass --c to "
                         f"continue it (with a larger --iterations to train longer), or remove the folder "
                         f"(or choose another with -o) to start over. Nothing was overwritten.")
    # built before anything is written: a bad optimizer/schedule setting leaves nothing behind (the folder
    # made for the lock alone is removed again)
    trainer = Pretrainer(setup, folder, total, iterations_per_epoch, dev, seed, num_workers, compile_network,
                         rank, world, cpu_precision, trackers, show_progress)
    if world > 1:  # nobody writes before every rank has checked the folder
        dist.barrier()
    os.makedirs(folder, exist_ok=True)
    if resume:
        trainer.load(existing[0])
    trainer.write_config(world, num_workers)
    if trainer.iteration >= total:
        trainer.log.log(f"Already trained {trainer.iteration} of {total} iterations; pass a larger --iterations "
                        f"with --c to train longer.")
        if trainer.is_main and not os.path.isfile(os.path.join(folder, FINAL)):
            trainer.save(FINAL)
        return folder
    n_params = sum(p.numel() for p in trainer.params)
    trainer.log.log(f"Pretraining {setup.method_name} on {setup.arch.name} ({n_params} trained parameters), "
                    f"data {setup.source} ({setup.data_folder}), crop {list(setup.crop_size)}, batch "
                    f"{setup.batch_size} x {world} process(es), {total} iterations, device {dev}, "
                    f"{num_workers} data workers, config {to_plain(setup.cfg)}")
    trainer.log.log(setup.crop_choice.describe())
    fold_note = "" if setup.fold is None else f" (fold {setup.fold}'s training cases)"
    trainer.log.log(f"Pretraining cases: {len(setup.cases)}{fold_note}, sha256 "
                    f"{trainer.metadata()['pretraining_cases_sha256'][:16]}... (the list is in config.json)")
    if setup.includes_test_images:
        trainer.log.log(f"WARNING: the pretraining data holds {setup.target}'s imagesTs (--intask_include_test): "
                        f"test results on them are not independent of this pretraining.")
    trainer.log.log(trainer.schedule.describe())
    if trainer.precision == "bf16":
        trainer.log.log("CPU mixed precision: the network and heads run under bf16 autocast, every loss in "
                        "float32 (--cpu_precision fp32 turns it off).")
    clip = f"on, max gradient norm {trainer.grad_clip:g}" if trainer.grad_clip else "off"
    trainer.log.log(f"Gradient clipping {clip} (config field grad_clip; --set grad_clip=VALUE, or none for off).")
    trainer.run()
    return folder
