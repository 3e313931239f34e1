"""Multi-clusterer k-means pseudo-labels for every slice (Masked LoGoNet, paper 000 §3.3.2, app. 8.1).

N clusterers (scikit-learn ``MiniBatchKMeans``), clusterer n with K_n ~ U{k_min..k_max}
clusters, are fitted in ``fit_epochs`` passes, each over a fresh random ``fit_fraction`` of the
pretraining volumes (at least one; paper appendix 8.1: "each iteration utilizing a randomly
selected 10% subset"), then label every slice (along D of the preprocessed [C, D, H, W] volume) of every volume. The
clusterers see unmasked data. The labels are stored once, in a single int16 array
``[total slices, N]`` under ``<data folder>/nnssl_kmeans_cache/<key>.npy`` plus ``<key>.json``
(case id -> [row offset, n slices], the K_n, the fit cases of every pass), and looked up per crop in the loader
workers through a read-only memory map.

Scaling: fitting streams over each pass's volumes (one volume in memory at a time; its slice
vectors go into a chunk of at least ``max(fit_chunk_slices, max K_n)`` slices, and each full chunk
is one ``partial_fit`` step of every clusterer); labelling streams over all
volumes into a memory-mapped output. Memory does not grow with the number of volumes; it is one
volume, one chunk and the centres (N·ΣK_n·C·size² float32: ~90 MiB for the defaults, C = 1).

Cache key: a hash of the sorted case ids with each case file's size and mtime, the data folder
name (it encodes the plans' data identifier), the seed and the clustering config fields. Any
change gives a new key and a rebuild; old cache files are left in place (delete the
``nnssl_kmeans_cache`` folder to reclaim the space). Files are written atomically (temporary
name, then rename), the index last, so an interrupted build is simply redone.

Assumptions (the paper does not say):
- slice vectors: the paper flattens a C×X×Y slice into one vector, which needs equal slice
  sizes; preprocessed volumes differ in-plane, so every slice is first area-resampled
  (adaptive average pooling; replication where a slice is smaller) to
  ``slice_vector_size``² pixels -> vectors of length C·size² (default 32 -> 1024 per channel);
- the subset of a pass is shared by all clusterers (one read of a volume feeds all N of them);
  the clusterers differ in K_n and in their random state;
- ``fit_epochs`` = 5 passes (the paper's "350 iterations, each on a random 10%" does not say
  whether an iteration is a pass over the subset or one minibatch step); minibatch = one chunk of
  ``fit_chunk_slices`` slices (sklearn's default batch is 1024);
- K_n larger than the number of slices of the first pass (which initializes the centres) is
  reduced to it, with a warning;
- centres seeded with sklearn's default k-means++ on the first chunk (``kmeans_init``; "random"
  is much faster for large K and large chunks, at some cost in cluster quality).
"""
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from sklearn.cluster import MiniBatchKMeans, kmeans_plusplus
from tqdm import tqdm

from nnssl.errors import NnsslError
from nnssl.io import atomic_path, write_json

CACHE_DIR = "nnssl_kmeans_cache"
CACHE_VERSION = 2  # bump when the label computation changes, so old caches are not reused (2: fresh subsets)
CLUSTERING_FIELDS = ("n_clusterers", "k_min", "k_max", "fit_fraction", "fit_epochs", "fit_chunk_slices",
                     "slice_vector_size", "kmeans_init")
CASE_FILE_ENDINGS = (".b2nd", ".pkl")  # nnU-Net's blosc2 case: data + properties
PADDED = -1  # label of slices outside the volume (padding): ignored by the loss


@dataclass
class ClusteringDraw:
    """The random choices: K_n [N], random_state_n [N], and per fit pass the indices of its volumes
    (a fresh random subset of ``fit_fraction`` of them, in reading order)."""

    cluster_sizes: np.ndarray
    random_states: np.ndarray
    pass_cases: List[np.ndarray]


def draw_clustering(n_volumes: int, seed: int, cfg) -> ClusteringDraw:
    """All randomness of the clustering, from ``seed`` alone (no global RNG)."""
    rng = np.random.default_rng([int(seed), 0x6B6D65616E73])  # a tag so this stream differs from the loader's
    sizes = rng.integers(cfg.k_min, cfg.k_max + 1, size=cfg.n_clusterers)
    states = rng.integers(0, 2 ** 31 - 1, size=cfg.n_clusterers)
    n_fit = min(n_volumes, max(1, int(round(cfg.fit_fraction * n_volumes))))
    passes = [rng.permutation(n_volumes)[:n_fit] for _ in range(cfg.fit_epochs)]
    return ClusteringDraw(sizes, states, passes)


def slice_vectors(volume: np.ndarray, size: int) -> np.ndarray:
    """volume: [C, D, H, W] -> float32 [D, C·size·size], each slice area-resampled to size×size."""
    v = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).transpose(0, 1)  # [D, C, H, W]
    pooled = F.adaptive_avg_pool2d(v, (size, size))
    return np.ascontiguousarray(pooled.reshape(v.shape[0], -1).numpy())


def _load_volume(dataset: nnUNetDatasetBlosc2, identifier: str) -> np.ndarray:
    """The whole preprocessed volume [C, D, H, W] in memory (decompressed)."""
    return np.asarray(dataset.load_case(identifier)[0][:], dtype=np.float32)


def _volume_vectors(dataset, identifier: str, size: int) -> np.ndarray:
    # A function of its own so the volume is freed on return: one volume in memory at a time.
    return slice_vectors(_load_volume(dataset, identifier), size)


def volume_depths(dataset, identifiers: Sequence[str]) -> List[int]:
    """Number of slices (D) of each case, from the file headers (nothing is decompressed)."""
    return [int(dataset.load_case(i)[0].shape[1]) for i in identifiers]


def cache_key(data_folder: str, identifiers: Sequence[str], seed: int, cfg) -> str:
    """Hex digest identifying the exact inputs of a cache (see module docstring)."""
    files = []
    for ident in sorted(identifiers):
        for ending in CASE_FILE_ENDINGS:
            p = os.path.join(data_folder, ident + ending)
            st = os.stat(p) if os.path.exists(p) else None
            files.append([ident + ending, st.st_size if st else None, st.st_mtime_ns if st else None])
    payload = {"version": CACHE_VERSION, "folder": os.path.basename(os.path.normpath(data_folder)),
               "seed": int(seed), "config": {f: _plain(getattr(cfg, f)) for f in CLUSTERING_FIELDS}, "files": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def cache_paths(data_folder: str, key: str) -> Tuple[str, str]:
    """(labels .npy, index .json) of cache ``key``."""
    base = os.path.join(data_folder, CACHE_DIR, key)
    return base + ".npy", base + ".json"


def _chunks(dataset, order: Sequence[str], size: int, min_rows: int, bar) -> Iterator[np.ndarray]:
    """Slice vectors of the volumes in ``order``, grouped into chunks of >= min_rows (the last may be smaller)."""
    pending, rows = [], 0
    for ident in order:
        vec = _volume_vectors(dataset, ident, size)
        pending.append(vec)
        rows += len(vec)
        bar.update(1)
        if rows >= min_rows:
            yield np.concatenate(pending)
            pending, rows = [], 0
    if pending:
        yield np.concatenate(pending)


def fit_clusterers(dataset, identifiers: Sequence[str], draw: ClusteringDraw, cluster_sizes: Sequence[int],
                   cfg, show_progress: bool = True) -> List[MiniBatchKMeans]:
    """Stream the ``fit_epochs`` passes (each over its own subset); each chunk is one partial_fit step per
    clusterer."""
    models = [MiniBatchKMeans(n_clusters=int(k), init=cfg.kmeans_init, random_state=int(s), n_init=1,
                              compute_labels=False, batch_size=int(cfg.fit_chunk_slices))
              for k, s in zip(cluster_sizes, draw.random_states)]
    min_rows = max(int(cfg.fit_chunk_slices), int(max(cluster_sizes)))  # the first step initializes K_n centres
    total = sum(len(o) for o in draw.pass_cases)
    with tqdm(total=total, desc="k-means fit (volumes)", disable=not show_progress, leave=False) as bar:
        for order in draw.pass_cases:
            for chunk in _chunks(dataset, [identifiers[i] for i in order], cfg.slice_vector_size, min_rows, bar):
                for m in models:
                    if cfg.kmeans_init == "k-means++" and not hasattr(m, "cluster_centers_"):
                        m.init = _kmeans_plusplus_f32(chunk, m.n_clusters, m.random_state)
                        m.partial_fit(chunk)
                        m.init = cfg.kmeans_init  # drop the seed array: it would double the models' memory
                    else:
                        m.partial_fit(chunk)
    return models


def _kmeans_plusplus_f32(x: np.ndarray, k: int, random_state: int) -> np.ndarray:
    """sklearn's k-means++ seeding of ``x`` [n, dim] float32 -> centres [k, dim] float32, what partial_fit
    would do on its first batch (the chunk is below sklearn's init_size of 3 batches), but run in float64:
    sklearn's float32 path re-converts the data at every seeding step and is ~2-10x slower."""
    centres, _ = kmeans_plusplus(x.astype(np.float64), k, random_state=random_state)
    return centres.astype(np.float32)


def build_or_load_cache(data_folder: str, identifiers: Sequence[str], seed: int, cfg,
                        show_progress: bool = True) -> str:
    """Path of the labels .npy for these inputs; fitted and written only if not cached yet."""
    identifiers = sorted(identifiers)
    if not identifiers:
        raise NnsslError(f"masked_kmeans: the pretraining data folder {data_folder} holds no cases; run "
                         f"nnssl_plan_and_preprocess with -pd for the pretraining data first.")
    key = cache_key(data_folder, identifiers, seed, cfg)
    labels_path, index_path = cache_paths(data_folder, key)
    if os.path.isfile(labels_path) and os.path.isfile(index_path):
        return labels_path
    try:
        os.makedirs(os.path.dirname(labels_path), exist_ok=True)
    except OSError as e:
        raise NnsslError(f"masked_kmeans: cannot create the pseudo-label cache folder {os.path.dirname(labels_path)} "
                         f"({e}); the pretraining data folder must be writable.") from None
    dataset = nnUNetDatasetBlosc2(data_folder, identifiers)
    n_slices = volume_depths(dataset, identifiers)
    draw = draw_clustering(len(identifiers), seed, cfg)
    n_fit = int(sum(n_slices[i] for i in draw.pass_cases[0]))  # the first pass initializes the centres
    if n_fit < 2:
        raise NnsslError(f"masked_kmeans: the k-means fit cases in {data_folder} have only {n_fit} slice(s); "
                         f"clustering needs at least 2. Add pretraining volumes or raise --set fit_fraction.")
    sizes = [min(int(k), n_fit) for k in draw.cluster_sizes]
    reduced = [int(k) for k in draw.cluster_sizes if k > n_fit]
    if reduced:
        warnings.warn(f"masked_kmeans: {len(reduced)} of {len(sizes)} clusterers drew more clusters (up to "
                      f"K={max(reduced)}) than the {n_fit} slices available for fitting; they use K={n_fit}. "
                      f"Lower --set k_min/k_max or raise --set fit_fraction to avoid this.")
    models = fit_clusterers(dataset, identifiers, draw, sizes, cfg, show_progress)
    offsets = write_labels(dataset, identifiers, n_slices, models, labels_path, cfg, show_progress)
    write_json({"key": key, "seed": int(seed), "cluster_sizes": sizes,
                "config": {f: _plain(getattr(cfg, f)) for f in CLUSTERING_FIELDS},
                "fit_passes": [[identifiers[i] for i in order] for order in draw.pass_cases],
                "cases": {i: [int(o), int(n)] for i, o, n in zip(identifiers, offsets, n_slices)}}, index_path)
    return labels_path


def write_labels(dataset, identifiers: Sequence[str], n_slices: Sequence[int], models: Sequence[MiniBatchKMeans],
                 labels_path: str, cfg, show_progress: bool = True) -> List[int]:
    """Label every slice of every volume (streamed) into int16 [sum n_slices, N] at ``labels_path``
    (atomically); returns each case's row offset."""
    offsets = np.concatenate([[0], np.cumsum(n_slices)]).astype(int)
    with atomic_path(labels_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=(int(offsets[-1]), len(models)))
        row = 0
        with tqdm(total=len(identifiers), desc="k-means labels (volumes)", disable=not show_progress,
                  leave=False) as bar:
            # chunks of several volumes (rows stay in case order): fewer, larger predict calls
            for chunk in _chunks(dataset, identifiers, cfg.slice_vector_size, int(cfg.fit_chunk_slices), bar):
                out[row:row + len(chunk)] = np.stack([m.predict(chunk) for m in models], axis=1)
                row += len(chunk)
        out.flush()
        del out
    return [int(o) for o in offsets[:-1]]


# --- lookup, in the loader workers: one memory map and index per cache file and process ---
_OPEN: Dict[str, Tuple[np.ndarray, dict]] = {}


def open_cache(labels_path: str) -> Tuple[np.ndarray, dict]:
    """(labels memmap [total slices, N] int16, index dict), opened once per process."""
    if labels_path not in _OPEN:
        index_path = labels_path[:-len(".npy")] + ".json"
        if not (os.path.isfile(labels_path) and os.path.isfile(index_path)):
            raise NnsslError(f"masked_kmeans: the pseudo-label cache {labels_path} (or its .json index) is missing; "
                             f"it is rebuilt when pretraining starts -- rerun nnssl_pretrain.")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        _OPEN[labels_path] = (np.load(labels_path, mmap_mode="r"), index)
    return _OPEN[labels_path]


def cluster_sizes(labels_path: str) -> List[int]:
    """K_n of every clusterer of a cache."""
    return list(open_cache(labels_path)[1]["cluster_sizes"])


def crop_labels(labels_path: str, identifier: str, lo: int, hi: int) -> np.ndarray:
    """Labels of volume slices lo..hi-1 of a case: int16 [hi - lo, N]; slices outside the volume -> -1."""
    labels, index = open_cache(labels_path)
    if identifier not in index["cases"]:
        raise NnsslError(f"masked_kmeans: case '{identifier}' is not in the pseudo-label cache {labels_path}; the "
                         f"cache belongs to other data. Remove {os.path.dirname(labels_path)} and rerun.")
    offset, n = index["cases"][identifier]
    out = np.full((hi - lo, labels.shape[1]), PADDED, dtype=np.int16)
    a, b = max(lo, 0), min(hi, n)
    if b > a:
        out[a - lo:b - lo] = labels[offset + a:offset + b]
    return out
