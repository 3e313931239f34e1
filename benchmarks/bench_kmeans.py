"""Masked LoGoNet pseudo-labels: k-means fitting and labelling throughput (slices/s) and peak memory
for growing numbers of synthetic volumes (default 50 and 200 volumes of 40x64x64 float32, nnU-Net
blosc2 files in a temporary folder), with the paper's N = 80 clusterers, K ~ U{80..500}, 10% fit subset.

Memory: ``tracemalloc`` peak of each phase (numpy buffers and Python objects) and the growth of the
process's peak RSS over the whole build; each volume count runs in a fresh process so the RSS numbers
do not mix. They include the fitted centres (``centres_mib`` = N · ΣK_n · C·32² floats, bounded by
k_max, smaller while K_n is clipped to few fit slices); the rest must stay flat as the number of
volumes grows (streaming: one volume in memory at a time).

Run: ``python benchmarks/bench_kmeans.py [--volumes 50 200] [--clusterers 80] [--shape 40 64 64]``.
"""
import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time
import tracemalloc
import warnings

import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from threadpoolctl import threadpool_limits

from nnssl.ssl import pseudo_labels as pl
from nnssl.ssl.masked_kmeans import MaskedKMeansConfig


def write_volumes(folder: str, n: int, shape, seed: int = 0) -> list:
    """n single-channel volumes [1, *shape]: smooth per-slice structure plus noise (so clusters exist)."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    ids = []
    for i in range(n):
        radius = 0.3 + 0.5 * np.abs(np.sin(np.linspace(0, 3, d) + rng.uniform(0, 6)))  # per-slice "body" size
        vol = (xx[None] ** 2 + yy[None] ** 2 < radius[:, None, None] ** 2).astype(np.float32)
        vol += rng.normal(0, 0.2, (d, h, w)).astype(np.float32)
        ident = f"vol_{i:04d}"
        nnUNetDatasetBlosc2.save_case(vol[None], np.zeros((1, d, h, w), np.int8), {}, os.path.join(folder, ident),
                                      chunks=(1, d, h, w), blocks=(1, min(d, 8), h, w))
        ids.append(ident)
    return ids


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(n_volumes: int, n_clusterers: int, shape, threads, init: str, queue) -> None:
    if threads:
        threadpool_limits(threads)
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        ids = write_volumes(folder, n_volumes, shape)
        cfg = MaskedKMeansConfig(n_clusterers=n_clusterers, kmeans_init=init)
        dataset = nnUNetDatasetBlosc2(folder, ids)
        rss0 = _rss_mib()
        depths = pl.volume_depths(dataset, ids)
        draw = pl.draw_clustering(len(ids), 0, cfg)
        n_fit = int(sum(depths[i] for i in draw.pass_cases[0]))  # the pass that initializes the centres
        sizes = [min(int(k), n_fit) for k in draw.cluster_sizes]

        tracemalloc.start()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn's duplicate-point warnings on tiny fit sets
            models = pl.fit_clusterers(dataset, ids, draw, sizes, cfg, show_progress=False)
        t_fit = time.perf_counter() - t0
        fit_peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        pl.write_labels(dataset, ids, depths, models, os.path.join(folder, "labels.npy"), cfg, show_progress=False)
        t_label = time.perf_counter() - t0
        label_peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.stop()
        queue.put({"volumes": n_volumes, "slices": sum(depths), "fit_slices_per_epoch": n_fit,
                   "fit_epochs": cfg.fit_epochs, "K_mean": float(np.mean(sizes)), "K_reduced": int(sum(
                       k < d for k, d in zip(sizes, draw.cluster_sizes))), "fit_s": t_fit,
                   "fit_slices_per_s": n_fit * cfg.fit_epochs / t_fit, "label_s": t_label,
                   "label_slices_per_s": sum(depths) / t_label, "fit_peak_mib": fit_peak,
                   "label_peak_mib": label_peak, "rss_growth_mib": _rss_mib() - rss0,
                   "centres_mib": sum(m.cluster_centers_.nbytes for m in models) / 2 ** 20})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, nargs="+", default=[50, 200], help="volume counts to benchmark")
    parser.add_argument("--clusterers", type=int, default=80, help="number of clusterers N (paper: 80)")
    parser.add_argument("--shape", type=int, nargs=3, default=[40, 64, 64], help="volume size D H W")
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS/OpenMP/torch threads (default: library default; use 1 on a shared machine, "
                             "where spinning BLAS threads slow k-means down many times)")
    parser.add_argument("--init", default="k-means++", choices=["k-means++", "random"], help="k-means seeding")
    args = parser.parse_args(argv)
    if min(args.volumes) < 1 or args.clusterers < 1 or min(args.shape) < 1:
        parser.error("--volumes, --clusterers and --shape must be positive")
    ctx = mp.get_context("spawn")
    print(f"N={args.clusterers} clusterers, K ~ U{{80..500}}, {args.init} seeding, fit on 10% of the volumes, "
          f"volumes 1x{'x'.join(map(str, args.shape))} float32, {os.cpu_count()} CPU cores, threads "
          f"{args.threads or 'default'}")
    header = ("volumes", "slices", "fit_slices_per_epoch", "K_mean", "K_reduced", "fit_s", "fit_slices_per_s",
              "label_s", "label_slices_per_s", "centres_mib", "fit_peak_mib", "label_peak_mib", "rss_growth_mib")
    print(" | ".join(header))
    for n in args.volumes:
        queue = ctx.Queue()
        proc = ctx.Process(target=run_one, args=(n, args.clusterers, args.shape, args.threads, args.init, queue))
        proc.start()
        row = queue.get()
        proc.join()
        print(" | ".join(f"{row[k]:.1f}" if isinstance(row[k], float) else str(row[k]) for k in header), flush=True)


if __name__ == "__main__":
    main()
