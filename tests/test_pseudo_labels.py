"""k-means pseudo-labels: slice vectors, fitting, the on-disk cache (reuse, invalidation), K reduction,
bounded memory."""
import dataclasses
import json
import os
import weakref

import numpy as np
import pytest
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from sklearn.cluster import MiniBatchKMeans

from nnssl.errors import NnsslError
from nnssl.ssl import pseudo_labels as pl
from nnssl.ssl.masked_kmeans import MaskedKMeansConfig

CFG = MaskedKMeansConfig(n_clusterers=3, k_min=4, k_max=8, fit_fraction=0.5, fit_epochs=2, fit_chunk_slices=8,
                         slice_vector_size=4)


def write_case(folder, ident, volume):
    """volume: [C, D, H, W] float32 -> nnU-Net blosc2 case files in folder."""
    shape = volume.shape
    nnUNetDatasetBlosc2.save_case(volume, np.zeros(shape, np.int8), {}, os.path.join(folder, ident),
                                  chunks=shape, blocks=shape)


def synthetic_volumes(seed=0):
    """Five volumes of different depth and in-plane size; slices are noisy constant levels.
    case_4 is a copy of case_0 (so their label rows must be identical)."""
    rng = np.random.default_rng(seed)
    vols = {}
    for i, (d, h, w) in enumerate([(10, 12, 16), (12, 10, 10), (9, 16, 12), (11, 12, 12)]):
        levels = rng.integers(0, 6, size=d).astype(np.float32) * 10
        vols[f"case_{i}"] = (levels[None, :, None, None] + rng.normal(0, 0.5, (1, d, h, w))).astype(np.float32)
    vols["case_4"] = vols["case_0"].copy()
    return vols


@pytest.fixture
def data_folder(tmp_path):
    folder = tmp_path / "nnUNetPlans_3d_fullres"
    folder.mkdir()
    vols = synthetic_volumes()
    for ident, v in vols.items():
        write_case(str(folder), ident, v)
    return str(folder), vols


def test_slice_vectors_area_resampling_by_hand():
    vol = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    vec = pl.slice_vectors(vol, 2)
    assert vec.shape == (3, 2 * 2 * 2) and vec.dtype == np.float32
    # slice 1, channel 1, top-left 2x2 block mean
    block = vol[1, 1, :2, :2].mean()
    assert vec[1, 4] == pytest.approx(block)
    assert vec[2].tolist() == pytest.approx([vol[c, 2, r * 2:r * 2 + 2, q * 2:q * 2 + 2].mean()
                                             for c in range(2) for r in range(2) for q in range(2)])
    tiny = np.array([[[[5.0]]]], np.float32)  # a 1x1 slice is replicated
    assert pl.slice_vectors(tiny, 3).tolist() == [[5.0] * 9]


def test_kmeans_plusplus_seeds_are_distinct_data_rows():
    x = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32)
    seeds = pl._kmeans_plusplus_f32(x, 6, random_state=3)
    assert seeds.dtype == np.float32 and seeds.shape == (6, 5)
    rows = [int(np.argmin(np.abs(x - s).sum(1))) for s in seeds]
    assert len(set(rows)) == 6 and np.allclose(x[rows], seeds)
    assert np.array_equal(seeds, pl._kmeans_plusplus_f32(x, 6, random_state=3))


def test_build_writes_cache_with_consistent_labels(data_folder):
    folder, vols = data_folder
    ids = list(vols)
    path = pl.build_or_load_cache(folder, ids[::-1], seed=0, cfg=CFG, show_progress=False)
    assert os.path.dirname(path) == os.path.join(folder, pl.CACHE_DIR)
    labels = np.load(path)
    with open(path[:-4] + ".json", encoding="utf-8") as f:
        index = json.load(f)
    depths = {k: v.shape[1] for k, v in vols.items()}
    assert labels.shape == (sum(depths.values()), 3) and labels.dtype == np.int16
    assert [index["cases"][k][1] for k in ids] == [depths[k] for k in ids]
    assert [len(set(p)) for p in index["fit_passes"]] == [2, 2]  # fit_epochs passes of round(0.5 * 5) volumes
    sizes = index["cluster_sizes"]
    assert len(sizes) == 3 and all(4 <= k <= 8 for k in sizes)
    assert (labels >= 0).all() and (labels < np.array(sizes)).all()
    o0, o4 = index["cases"]["case_0"][0], index["cases"]["case_4"][0]
    assert np.array_equal(labels[o0:o0 + 10], labels[o4:o4 + 10])  # identical volumes -> identical labels
    # Slices of one intensity level are near-identical vectors, levels 10 apart are far apart:
    # every clusterer separates the lowest from the highest level.
    levels = np.concatenate([np.round(vols[k][0].mean(axis=(1, 2)) / 10) for k in sorted(vols, key=index["cases"].get)])
    lo_rows, hi_rows = labels[levels == levels.min()], labels[levels == levels.max()]
    for n in range(3):
        assert not set(lo_rows[:, n]) & set(hi_rows[:, n])
    # crop lookup: rows of the case, -1 where the crop box leaves the volume
    o1 = index["cases"]["case_1"][0]
    crop = pl.crop_labels(path, "case_1", -2, 5)
    assert (crop[:2] == -1).all() and np.array_equal(crop[2:], labels[o1:o1 + 5])
    crop = pl.crop_labels(path, "case_1", 9, 15)
    assert np.array_equal(crop[:3], labels[o1 + 9:o1 + 12]) and (crop[3:] == -1).all()
    with pytest.raises(NnsslError):
        pl.crop_labels(path, "not_a_case", 0, 2)


def test_cache_reused_without_refit(data_folder, monkeypatch):
    folder, vols = data_folder
    path = pl.build_or_load_cache(folder, list(vols), seed=1, cfg=CFG, show_progress=False)
    mtime = os.stat(path).st_mtime_ns

    def boom(self, X, y=None, sample_weight=None):
        raise AssertionError("refit although the cache exists")

    monkeypatch.setattr(MiniBatchKMeans, "partial_fit", boom)
    assert pl.build_or_load_cache(folder, list(vols), seed=1, cfg=CFG, show_progress=False) == path
    assert os.stat(path).st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="refit"):  # a new seed is a new cache: it must fit
        pl.build_or_load_cache(folder, list(vols), seed=2, cfg=CFG, show_progress=False)


def test_cache_key_changes_with_data_seed_and_config(data_folder):
    folder, vols = data_folder
    ids = list(vols)
    key = pl.cache_key(folder, ids, 0, CFG)
    assert pl.cache_key(folder, ids[::-1], 0, CFG) == key  # order does not matter
    assert pl.cache_key(folder, ids, 1, CFG) != key
    assert pl.cache_key(folder, ids, 0, dataclasses.replace(CFG, k_max=9)) != key
    assert pl.cache_key(folder, ids, 0, dataclasses.replace(CFG, slice_vector_size=8)) != key
    assert pl.cache_key(folder, ids, 0, dataclasses.replace(CFG, kmeans_init="random")) != key
    assert pl.cache_key(folder, ids[:-1], 0, CFG) != key
    assert pl.cache_key(folder, ids, 0, dataclasses.replace(CFG, temperature=0.5)) == key  # not a clustering field
    path = pl.build_or_load_cache(folder, ids, seed=0, cfg=CFG, show_progress=False)
    for ending in (".b2nd", "_seg.b2nd", ".pkl"):  # a case file is rewritten -> new key, rebuilt
        os.remove(os.path.join(folder, "case_2" + ending))
    write_case(folder, "case_2", vols["case_2"] + 1)
    assert pl.cache_key(folder, ids, 0, CFG) != key
    new_path = pl.build_or_load_cache(folder, ids, seed=0, cfg=CFG, show_progress=False)
    assert new_path != path and os.path.isfile(new_path) and os.path.isfile(path)  # old cache kept


def test_k_reduced_with_warning_when_too_few_slices(tmp_path):
    folder = str(tmp_path)
    rng = np.random.default_rng(0)
    for i in range(2):
        write_case(folder, f"c{i}", rng.normal(size=(1, 6, 8, 8)).astype(np.float32))
    cfg = dataclasses.replace(CFG, k_min=20, k_max=30, fit_fraction=0.5)  # fit on 1 volume = 6 slices
    with pytest.warns(UserWarning, match=r"3 of 3 clusterers .*K=2\d\) than the 6 slices"):
        path = pl.build_or_load_cache(folder, ["c0", "c1"], seed=0, cfg=cfg, show_progress=False)
    assert pl.cluster_sizes(path) == [6, 6, 6]
    assert np.load(path).max() < 6


def test_fewer_than_two_fit_slices_refused(tmp_path):
    folder = str(tmp_path)
    write_case(folder, "only", np.ones((1, 1, 8, 8), np.float32))
    with pytest.raises(NnsslError, match="at least 2"):
        pl.build_or_load_cache(folder, ["only"], seed=0, cfg=CFG, show_progress=False)
    with pytest.raises(NnsslError, match="no cases"):
        pl.build_or_load_cache(folder, [], seed=0, cfg=CFG, show_progress=False)


def test_fitting_streams_one_volume_at_a_time(data_folder, monkeypatch):
    folder, vols = data_folder
    live, peak, loads = [0], [0], []
    original_load = pl._load_volume

    def counting_load(dataset, identifier):
        vol = original_load(dataset, identifier)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        loads.append(identifier)
        weakref.finalize(vol, lambda: live.__setitem__(0, live[0] - 1))
        return vol

    chunk_rows = []
    original_fit = MiniBatchKMeans.partial_fit

    def recording_fit(self, X, y=None, sample_weight=None):
        chunk_rows.append(len(X))
        return original_fit(self, X)

    monkeypatch.setattr(pl, "_load_volume", counting_load)
    monkeypatch.setattr(MiniBatchKMeans, "partial_fit", recording_fit)
    cfg = dataclasses.replace(CFG, fit_fraction=1.0, fit_epochs=3)
    pl.build_or_load_cache(folder, list(vols), seed=0, cfg=cfg, show_progress=False)
    assert peak[0] == 1 and live[0] == 0
    assert len(loads) == 5 * 3 + 5  # 3 fit passes over all 5 volumes, then one labelling pass
    # A chunk closes as soon as it holds >= max(fit_chunk_slices, max K) slices: < that + one volume.
    max_depth = max(v.shape[1] for v in vols.values())
    assert max(chunk_rows) < max(cfg.fit_chunk_slices, cfg.k_max) + max_depth
    assert len(chunk_rows) >= 3 * 3 * 2  # several partial_fit steps per clusterer and pass


def test_every_fit_pass_draws_a_fresh_subset():
    cfg = dataclasses.replace(CFG, fit_fraction=0.1, fit_epochs=50)
    draw = pl.draw_clustering(100, seed=0, cfg=cfg)
    assert len(draw.pass_cases) == 50
    assert all(len(set(p.tolist())) == 10 for p in draw.pass_cases)  # 10 % of 100, no volume twice in a pass
    assert len({tuple(sorted(p.tolist())) for p in draw.pass_cases}) == 50  # one fixed subset would give 1
    seen = np.bincount(np.concatenate(draw.pass_cases), minlength=100)
    assert (seen > 0).sum() > 90  # 50 passes of 10 % reach nearly every volume (expected 99.5)


def test_fit_reads_the_recorded_passes(data_folder, monkeypatch):
    folder, vols = data_folder
    loads, original_load = [], pl._load_volume
    monkeypatch.setattr(pl, "_load_volume", lambda ds, ident: loads.append(ident) or original_load(ds, ident))
    cfg = dataclasses.replace(CFG, fit_fraction=0.4, fit_epochs=6)
    path = pl.build_or_load_cache(folder, list(vols), seed=0, cfg=cfg, show_progress=False)
    with open(path[:-4] + ".json", encoding="utf-8") as f:
        passes = json.load(f)["fit_passes"]
    assert len(passes) == 6 and all(len(set(p)) == 2 for p in passes)
    assert len({tuple(sorted(p)) for p in passes}) > 1  # not one subset for every pass
    assert loads[:12] == [i for p in passes for i in p]  # fitting read exactly these, then labelling all 5
    assert sorted(loads[12:]) == sorted(vols)
