"""The deterministic per-iteration pretraining loader.

Batch number ``i`` is a pure function of ``(seed, rank, i)``: its generator is
``np.random.default_rng([seed, rank, i])``, which draws the cases (the method's ``draw_cases``:
with replacement by default, two different scans for every Volume Fusion pair), the crop
positions and everything the method's ``make_batch`` randomizes. With W background workers, worker ``w``
produces ``i = start + w, start + w + W, ...`` and batchgenerators' (deterministic)
``MultiThreadedAugmenter`` returns them round-robin, so the i-th batch is the same for any
worker count and after a resume that starts at ``start``. Every item carries its iteration
number so the engine can check that.

Crops are read directly from nnU-Net's blosc2 files (only the chunks the crop touches are
decompressed) and padded with 0 where a volume is smaller than the crop, as nnU-Net's own
loader does (0 is the normalized intensity nnU-Net pads with, so fine-tuning sees the same).
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2


PAD_VALUE = 0.0


def batch_rng(seed: int, rank: int, iteration: int) -> np.random.Generator:
    """The generator of batch ``iteration`` on process ``rank``."""
    return np.random.default_rng([int(seed), int(rank), int(iteration)])


def draw_crop_box(rng: np.random.Generator, shape: Sequence[int], crop_size: Sequence[int]) -> List[List[int]]:
    """A half-open box [[start, end], ...] of ``crop_size`` for a volume of spatial ``shape``.

    Larger axes: the crop lies inside the volume, start uniform. Smaller axes: the volume lies
    inside the crop at a uniform offset (the rest is padding).
    """
    box = []
    for s, c in zip(shape, crop_size):
        lo, hi = min(0, s - c), max(0, s - c)
        start = int(rng.integers(lo, hi + 1))
        box.append([start, start + int(c)])
    return box


def image_region(box: Sequence[Sequence[int]], shape: Sequence[int]) -> List[List[int]]:
    """The half-open box [[lo, hi], ...] of crop voxels that hold image data, for a crop ``box`` (volume
    coordinates, see :func:`draw_crop_box`) of a volume of spatial ``shape``; the rest is padding."""
    return [[max(0, -lo), min(hi, s) - lo] for (lo, hi), s in zip(box, shape)]


def sample_images(dataset: nnUNetDatasetBlosc2, identifiers: Sequence[str], cases: Sequence[int],
                  crop_size: Sequence[int], rng: np.random.Generator) -> Tuple[np.ndarray, dict]:
    """Random crops of the cases ``identifiers[c]`` for c in ``cases`` (one sample each).

    Returns images: [B, C, *crop_size] float32 and meta ``{"keys": [case per sample], "boxes":
    [per sample [[lo, hi] per spatial axis]], "image_region": [per sample [[lo, hi] per axis]]}``
    (the SSLMethod.make_batch ``meta`` contract).
    """
    volumes = [dataset.load_case(identifiers[c])[0] for c in cases]  # blosc2 arrays [C, X, Y, Z], not read yet
    boxes = [draw_crop_box(rng, v.shape[1:], crop_size) for v in volumes]
    crops = [crop_and_pad_nd(v, box, PAD_VALUE, cast_cropped_to=np.float32) for v, box in zip(volumes, boxes)]
    meta = {"keys": [identifiers[c] for c in cases], "boxes": boxes,
            "image_region": [image_region(box, v.shape[1:]) for v, box in zip(volumes, boxes)]}
    return np.ascontiguousarray(np.stack(crops), dtype=np.float32), meta


class PretrainLoader(DataLoader):
    """Yields ``{"iteration": i, "batch": make_batch(cfg, images, rng_i)}`` for i = start, start + 1, ...

    (tensors as numpy arrays; :func:`batch_from_item` turns an item back into the method's batch).
    """

    def __init__(self, folder: str, batch_size: int, crop_size: Sequence[int], method_cls, cfg, seed: int,
                 rank: int = 0, start_iteration: int = 0, num_workers: int = 0,
                 identifiers: Optional[Sequence[str]] = None):
        # identifiers: the cases to draw from (default: every case in the folder), in this order
        dataset = nnUNetDatasetBlosc2(folder, None if identifiers is None else list(identifiers))
        super().__init__(dataset, batch_size, max(1, num_workers), None, return_incomplete=False,
                         shuffle=False, infinite=True)
        self.identifiers = list(dataset.identifiers)
        self.indices = list(range(len(self.identifiers)))
        self.crop_size = tuple(int(c) for c in crop_size)
        self.method_cls, self.cfg = method_cls, cfg
        self.seed, self.rank, self.start = int(seed), int(rank), int(start_iteration)
        self._produced = 0  # batches this worker produced so far
        self._in_worker = num_workers > 0  # copies of this loader run in background processes
        # The method refuses data it cannot make a batch from here, in the main process, rather
        # than in every worker (e.g. Volume Fusion with a single scan).
        method_cls.draw_cases(cfg, len(self.identifiers), batch_size, np.random.default_rng(0))

    def generate_train_batch(self):
        if self._produced == 0 and self._in_worker:
            # In a worker process: one intra-op thread. The workers already run in parallel, and
            # torch ops on several threads in a forked child are slow under load and can deadlock
            # when the parent had used its thread pool before forking.
            torch.set_num_threads(1)
        i = self.start + self.thread_id + self._produced * self.number_of_threads_in_multithreaded
        self._produced += 1
        return {"iteration": i, "batch": map_tensors(self.make(i), lambda t: t.numpy())}

    def images(self, iteration: int) -> Tuple[np.ndarray, dict, np.random.Generator]:
        """Crops [B, C, *crop] and meta of batch ``iteration``, and the generator positioned where
        make_batch continues."""
        rng = batch_rng(self.seed, self.rank, iteration)
        cases = self.method_cls.draw_cases(self.cfg, len(self.identifiers), self.batch_size, rng)
        images, meta = sample_images(self._data, self.identifiers, cases, self.crop_size, rng)
        return images, meta, rng

    def make(self, iteration: int):
        images, meta, rng = self.images(iteration)
        return self.method_cls.make_batch(self.cfg, images, rng, meta=meta)


def map_tensors(obj, fn, kind=torch.Tensor):
    """``fn`` applied to every ``kind`` instance in nested dicts/lists/tuples."""
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn, kind) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn, kind) for v in obj)
    return obj


def batch_from_item(item) -> dict:
    """The method's batch (torch tensors again) from a loader item.

    Tensors travel from the workers as numpy arrays, pickled by value: torch's shared-memory
    hand-over needs the producing worker alive until the batch is unpickled, which the
    augmenter's shutdown cannot guarantee (a crash-like traceback at the end of every run).
    """
    return map_tensors(item["batch"], torch.from_numpy, np.ndarray)


def make_loader(loader: PretrainLoader, num_workers: int):
    """Background workers (deterministic MultiThreadedAugmenter) or, with 0 workers, the same process."""
    if num_workers == 0:
        return SingleThreadedAugmenter(loader, None)
    return MultiThreadedAugmenter(loader, None, num_workers, num_cached_per_queue=2, seeds=None)


def shutdown(augmenter) -> None:
    """Stop background workers (no-op for the single-threaded augmenter)."""
    if isinstance(augmenter, MultiThreadedAugmenter):
        augmenter._finish()
