"""The data of ``nnssl_benchmark_ssl`` (:mod:`nnssl.benchmark.runs`): split, own nnU-Net tree, pretraining sets.

``prepare_data`` only reads and checks (a label budget larger than the pool is refused before
anything is written); ``BenchmarkData.materialize`` then writes, each step skipped when done:

- ``<out>/nnunet/{nnUNet_raw,nnUNet_preprocessed}``: the target, planned and preprocessed with the
  benchmark's preset for every architecture. Its ``imagesTr``/``labelsTr`` hold symbolic links to
  the **pool and validation cases only** of the source (synthetic phantoms converted as BTCV
  under ``<out>/source``, or the user's raw dataset folder, which is only read), so nnU-Net's
  fingerprint (intensity statistics of the normalization, spacing, patch size) never sees a test case;
- the pretraining sets as unlabeled datasets: ``InTask`` (links to the pool cases' images)
  and ``Pool`` (synthetic unlabeled volumes, or a link to the user's ``--pool`` dataset),
  preprocessed with the target's plans (``-pd``);
- ``splits_final.json``: fold k = (label budget n, seed s): n pool cases drawn with
  ``default_rng(s)`` for training, the validation cases for validation;
- ``<out>/data/test_{images,labels}``: links to the test cases' image and label files.
"""
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from nnssl.errors import NnsslError
from nnssl.io import write_json

# The benchmark's own tree: these IDs are free there (a user dataset with one of them is refused).
SYNTHETIC_TARGET, INTASK, POOL = "Dataset901_BTCV", "Dataset902_InTask", "Dataset903_Pool"


@dataclass
class BenchmarkData:
    settings: object
    out_dir: str
    methods: List[str]
    user_raw: Optional[str]  # the user's raw dataset folder (None: synthetic)
    user_pool: Optional[str]
    cases: List[str]  # every labeled case identifier, sorted
    file_ending: str
    target: str = ""
    pool: Tuple[str, ...] = ()
    val: Tuple[str, ...] = ()
    test: Tuple[str, ...] = ()

    def __post_init__(self):
        s = self.settings
        n_test, n_val = s.test_cases, s.val_cases
        if len(self.cases) < n_test + n_val + 1:
            raise NnsslError(f"The dataset has {len(self.cases)} labeled cases; the benchmark needs {n_test} test + "
                             f"{n_val} validation cases and at least one for training. Lower --test_cases/--val_cases.")
        self.test = tuple(self.cases[-n_test:])
        self.val = tuple(self.cases[-n_test - n_val:-n_test])
        self.pool = tuple(self.cases[:-n_test - n_val])
        too_big = [n for n in s.n_labeled if n > len(self.pool) or n < 1]
        if too_big:
            raise NnsslError(f"--n_labeled {' '.join(map(str, too_big))}: the labeled pool has {len(self.pool)} cases "
                             f"({len(self.cases)} labeled minus {n_test} test and {n_val} validation cases); give "
                             f"label budgets from 1 to {len(self.pool)}.")

    @property
    def tree(self) -> str:
        return os.path.join(self.out_dir, "nnunet")

    @property
    def test_images(self) -> str:
        return os.path.join(self.out_dir, "data", "test_images")

    @property
    def test_labels(self) -> str:
        return os.path.join(self.out_dir, "data", "test_labels")

    def folds(self) -> List[Tuple[int, int]]:
        s = self.settings
        return [(n, seed) for n in s.n_labeled for seed in s.seeds]

    def fold_of(self, n: int, seed: int) -> int:
        return self.folds().index((n, seed))

    def training_cases(self, n: int, seed: int) -> List[str]:
        order = np.random.default_rng(seed).permutation(len(self.pool))
        return sorted(self.pool[i] for i in order[:n])

    def pretraining_dataset(self, kind: str) -> str:
        return INTASK if kind == "intask" else POOL

    def dataset_json(self) -> dict:
        import json
        from nnssl import paths
        with open(os.path.join(paths.preprocessed(), self.target, "dataset.json"), encoding="utf-8") as f:
            return json.load(f)

    def materialize(self) -> "BenchmarkData":
        from nnssl.dataset_conversion.unlabeled import convert_unlabeled
        from nnssl.datasets import known_datasets
        from nnssl.demo import use_folder_tree
        from nnssl.planning.api import plan_and_preprocess

        s = self.settings
        if self.user_raw is None:
            source_raw, pool_src = self._synthetic_source()
        else:
            source_raw, pool_src = self.user_raw, None
        tree = use_folder_tree(self.tree)
        raw = tree["nnUNet_raw"]
        existing = known_datasets(("raw",))
        if self.user_pool is not None:
            _link(self.user_pool, os.path.join(raw, POOL))
        self.target = SYNTHETIC_TARGET if self.user_raw is None else os.path.basename(self.user_raw)
        self._write_target(source_raw, os.path.join(raw, self.target))
        pretraining = []
        if "intask" in s.data:
            intask_src = os.path.join(self.out_dir, "data", "intask_images")
            for c in self.pool:
                _link(os.path.join(source_raw, "imagesTr", f"{c}_0000{self.file_ending}"),
                      os.path.join(intask_src, f"{c}{self.file_ending}"))
            if INTASK not in existing:
                convert_unlabeled(intask_src, dataset_id=902, name="InTask", progress=False)
            pretraining.append(INTASK)
        if "pool" in s.data:
            if pool_src is not None and POOL not in existing:
                convert_unlabeled(pool_src, dataset_id=903, name="Pool", progress=False)
            pretraining.append(POOL)
        for c in self.test:
            _link(os.path.join(source_raw, "imagesTr", f"{c}_0000{self.file_ending}"),
                  os.path.join(self.test_images, f"{c}_0000{self.file_ending}"))
            _link(os.path.join(source_raw, "labelsTr", f"{c}{self.file_ending}"),
                  os.path.join(self.test_labels, f"{c}{self.file_ending}"))
        ready = os.path.join(self.out_dir, "data", "preprocessed.json")
        if not os.path.isfile(ready):
            os.environ.setdefault("nnUNet_n_proc_DA", "0")
            plan_and_preprocess(self.target, architectures=list(s.architectures), pretraining=pretraining,
                                preset=s.preset, num_processes=1, show_progress=False)
            write_json({"target": self.target, "pretraining": pretraining}, ready)
        splits = [{"train": self.training_cases(n, seed), "val": list(self.val)} for n, seed in self.folds()]
        write_json(splits, os.path.join(tree["nnUNet_preprocessed"], self.target, "splits_final.json"))
        # nnU-Net's augmentation runs in the main process: seeded, and the fastest on 2 cores (bench_iteration_profile)
        os.environ["nnUNet_n_proc_DA"] = "0"
        return self

    def _synthetic_source(self) -> Tuple[str, str]:
        """The phantoms converted as BTCV in their own tree ``<out>/source``; (raw dataset folder, unlabeled folder)."""
        from nnssl.dataset_conversion.btcv import convert_btcv
        from nnssl.dataset_conversion.synthetic import write_synthetic_btcv
        from nnssl.demo import use_folder_tree

        s = self.settings
        src = write_synthetic_btcv(os.path.join(self.out_dir, "synthetic"), cases=len(self.cases), test_cases=0,
                                   unlabeled=s.unlabeled, seed=s.seeds[0], shape=tuple(s.shape))
        source_raw = os.path.join(use_folder_tree(os.path.join(self.out_dir, "source"))["nnUNet_raw"],
                                  SYNTHETIC_TARGET)
        if not os.path.isdir(source_raw):
            convert_btcv(src["raw_data"], dataset_id=901, progress=False)
        return source_raw, src["unlabeled"]

    def _write_target(self, source_raw: str, target_raw: str) -> None:
        """The target dataset: links to the pool and validation cases of ``source_raw``, its dataset.json
        with their number (the test cases stay out of nnU-Net's fingerprint and preprocessing)."""
        import json

        if os.path.islink(target_raw):
            raise NnsslError(f"{target_raw} links the whole dataset, test cases included (an output folder of an "
                             f"older nnssl_benchmark_ssl). Pass another -o.")
        kept = self.pool + self.val
        for c in kept:
            _link(os.path.join(source_raw, "imagesTr", f"{c}_0000{self.file_ending}"),
                  os.path.join(target_raw, "imagesTr", f"{c}_0000{self.file_ending}"))
            _link(os.path.join(source_raw, "labelsTr", f"{c}{self.file_ending}"),
                  os.path.join(target_raw, "labelsTr", f"{c}{self.file_ending}"))
        if not os.path.isfile(os.path.join(target_raw, "dataset.json")):
            with open(os.path.join(source_raw, "dataset.json"), encoding="utf-8") as f:
                dj = json.load(f)
            dj["numTraining"] = len(kept)
            dj["nnssl_benchmark"] = (f"pool and validation cases of {source_raw}; its {len(self.test)} test cases "
                                     f"are left out (linked under data/test_images)")
            write_json(dj, os.path.join(target_raw, "dataset.json"))


def _link(src: str, dst: str) -> None:
    if not os.path.exists(src):
        raise NnsslError(f"{src} does not exist (the benchmark links the dataset's files, it needs them in place).")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if not os.path.lexists(dst):
        os.symlink(os.path.abspath(src), dst)


def _user_cases(raw_folder: str) -> Tuple[List[str], str]:
    import json
    with open(os.path.join(raw_folder, "dataset.json"), encoding="utf-8") as f:
        dj = json.load(f)
    ending = dj.get("file_ending", ".nii.gz")
    if len(dj.get("channel_names", {"0": ""})) != 1:
        raise NnsslError(f"{raw_folder}: the benchmark handles single-channel datasets only (its in-task "
                         f"pretraining set takes channel 0); this one has {len(dj['channel_names'])} channels.")
    labels = os.path.join(raw_folder, "labelsTr")
    cases = sorted(f[:-len(ending)] for f in os.listdir(labels) if f.endswith(ending))
    missing = [c for c in cases if not os.path.isfile(os.path.join(raw_folder, "imagesTr", f"{c}_0000{ending}"))]
    if missing:
        raise NnsslError(f"{raw_folder}: labelsTr has cases without an image in imagesTr ({', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}); the benchmark needs imagesTr/CASE_0000{ending} "
                         f"for every labeled case.")
    return cases, ending


def prepare_data(s, out_dir: str, methods: List[str]) -> BenchmarkData:
    """Resolve and check the data (reads only); :meth:`BenchmarkData.materialize` writes."""
    from nnssl import paths
    from nnssl.datasets import resolve

    if s.dataset is None:
        n = s.labeled_pool + s.val_cases + s.test_cases
        return BenchmarkData(s, out_dir, list(methods), None, None, [f"BTCV_{i:04d}" for i in range(1, n + 1)],
                             ".nii.gz")
    paths.ensure_paths()
    user_raw = os.path.join(paths.raw(), resolve(s.dataset, where=("raw",)))
    user_pool = os.path.join(paths.raw(), resolve(s.pool_dataset, where=("raw",))) if s.pool_dataset else None
    if os.path.basename(user_raw)[:10] in (INTASK[:10], POOL[:10]):
        raise NnsslError(f"-d {s.dataset}: IDs 902 and 903 are the benchmark's own pretraining sets; convert the "
                         f"dataset under another ID.")
    cases, ending = _user_cases(user_raw)
    return BenchmarkData(s, out_dir, list(methods), user_raw, user_pool, cases, ending)

