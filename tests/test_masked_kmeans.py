"""masked_kmeans method: loss (eq. 4-5), label lookup for crop boxes, prepare/make_batch/forward_loss
on a real network, previews, config validation."""
import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from torch import nn

from nnssl.errors import NnsslError
from nnssl.io import write_json
from nnssl.ssl import METHODS, pseudo_labels
from nnssl.ssl.masked_kmeans import MaskedKMeans, MaskedKMeansConfig, SliceClusterHead, multi_clusterer_ce

SIZES = [4, 6, 5]


def _labels_and_mask(seed=0, b=2, d=7):
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.randint(0, k, (b, d), generator=g) for k in SIZES], dim=-1).to(torch.int16)
    masked = torch.zeros(b, d, dtype=torch.bool)
    masked[0, 1:4] = True
    masked[1, 5:7] = True
    labels[1, 6] = -1  # a padded slice (inside a chain)
    return labels, masked


def test_loss_zero_for_perfect_head_and_log_k_for_uniform_logits():
    labels, masked = _labels_and_mask()
    perfect = torch.zeros(2, 7, sum(SIZES))
    starts = np.cumsum([0] + SIZES[:-1])
    for n, s in enumerate(starts):
        perfect.scatter_(2, s + labels[..., n].long().clamp(min=0)[..., None], 5.0)
    assert multi_clusterer_ce(perfect, SIZES, labels, masked, 0.1).item() < 1e-12
    uniform = torch.zeros(2, 7, sum(SIZES), requires_grad=True)
    loss = multi_clusterer_ce(uniform, SIZES, labels, masked, 0.1)
    # summed over clusterers, averaged over the 4 valid (masked, non-padded) slices
    assert loss.item() == pytest.approx(sum(math.log(k) for k in SIZES), rel=1e-6)
    loss.backward()
    g = uniform.grad.abs().sum(-1)
    assert (g[masked & (labels[..., 0] >= 0)] > 0).all() and (g[~masked] == 0).all() and g[1, 6] == 0


def test_sum_normalization_is_eq_4_as_written():
    labels, masked = _labels_and_mask()
    uniform = torch.zeros(2, 7, sum(SIZES))
    # 4 valid (masked, non-padded) slices, each contributing sum_n log K_n
    total = multi_clusterer_ce(uniform, SIZES, labels, masked, 0.1, normalization="sum")
    assert total.item() == pytest.approx(4 * sum(math.log(k) for k in SIZES), rel=1e-6)
    with pytest.raises(NnsslError, match="loss_normalization"):
        MaskedKMeansConfig(loss_normalization="mean")


def test_head_max_pooling_option():
    head = SliceClusterHead(3, 8, SIZES, pool="max")
    x = torch.zeros(1, 3, 2, 4, 4)
    x[0, :, 1, 2, 3] = 5.0  # one bright pixel in slice 1
    expected = head.mlp(torch.stack([torch.zeros(3), torch.full((3,), 5.0)])[None])
    torch.testing.assert_close(head(x), expected)
    with pytest.raises(NnsslError, match="head_pool"):
        MaskedKMeansConfig(head_pool="attention")


def test_temperature_scales_logits():
    labels, masked = _labels_and_mask(1)
    logits = torch.randn(2, 7, sum(SIZES), generator=torch.Generator().manual_seed(3))
    a = multi_clusterer_ce(logits, SIZES, labels, masked, 0.1)
    b = multi_clusterer_ce(logits * 10, SIZES, labels, masked, 1.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_loss_ignores_unmasked_and_padded_slices():
    labels, masked = _labels_and_mask(2)
    logits = torch.randn(2, 7, sum(SIZES), generator=torch.Generator().manual_seed(4))
    ref = multi_clusterer_ce(logits, SIZES, labels, masked, 0.1)
    changed = labels.clone()
    changed[0, 0] = (changed[0, 0] + 1) % torch.tensor(SIZES, dtype=torch.int16)  # unmasked slice
    changed[1, 2] = (changed[1, 2] + 1) % torch.tensor(SIZES, dtype=torch.int16)
    assert multi_clusterer_ce(logits, SIZES, changed, masked, 0.1).item() == ref.item()
    other = logits.clone()
    other[1, 6] += 100.0  # the padded slice's logits do not matter either
    other[0, 5] -= 50.0
    assert multi_clusterer_ce(other, SIZES, labels, masked, 0.1).item() == ref.item()
    changed = labels.clone()
    changed[0, 2, 1] = (changed[0, 2, 1] + 1) % SIZES[1]  # a masked slice: the loss must change
    assert multi_clusterer_ce(logits, SIZES, changed, masked, 0.1).item() != ref.item()
    none = torch.zeros_like(masked)
    z = multi_clusterer_ce(logits.requires_grad_(), SIZES, labels, none, 0.1)
    assert z.item() == 0.0
    z.backward()  # still differentiable


def test_head_pools_per_slice():
    head = SliceClusterHead(3, 8, SIZES)
    x = torch.randn(2, 3, 5, 4, 6)
    out = head(x)
    assert out.shape == (2, 5, sum(SIZES))
    x2 = x.clone()
    x2[:, :, 2] = x2[:, :, 2].flip(-1)  # permuting pixels inside one slice changes nothing
    x2[:, :, 3] += 1.0  # changing slice 3 changes only slice 3's logits
    out2 = head(x2)
    assert torch.allclose(out2[:, [0, 1, 2, 4]], out[:, [0, 1, 2, 4]], atol=1e-6)
    assert not torch.allclose(out2[:, 3], out[:, 3])


def _hand_cache(tmp_path):
    """Labels row r = [r, 100 + r, 200 + r]; case a: rows 0..5, case b: rows 6..9."""
    path = str(tmp_path / "cache.npy")
    np.save(path, (np.arange(10)[:, None] + np.array([0, 100, 200])[None]).astype(np.int16))
    write_json({"cluster_sizes": [300, 300, 300], "cases": {"a": [0, 6], "b": [6, 4]}}, path[:-4] + ".json")
    return path


def test_make_batch_aligns_labels_with_crop_boxes(tmp_path):
    cfg = MaskedKMeansConfig(label_cache=_hand_cache(tmp_path))
    images = np.random.default_rng(0).normal(size=(2, 1, 5, 8, 8)).astype(np.float32)
    meta = {"keys": ["b", "a"], "boxes": [[[-2, 3], [0, 8], [0, 8]], [[2, 7], [-1, 7], [0, 8]]]}
    batch = MaskedKMeans.make_batch(cfg, images, np.random.default_rng(1), meta)
    assert batch["labels"].dtype == torch.int16 and batch["labels"].shape == (2, 5, 3)
    assert batch["labels"][0, :, 0].tolist() == [-1, -1, 6, 7, 8]
    assert batch["labels"][1, :, 1].tolist() == [102, 103, 104, 105, -1]
    assert batch["masked_slices"].shape == (2, 5) and batch["masked_slices"].dtype == torch.bool
    same = MaskedKMeans.make_batch(cfg, images, np.random.default_rng(1), meta)
    assert torch.equal(same["data"], batch["data"])  # all randomness from the rng
    free = ~batch["masked_slices"]
    assert torch.equal(batch["data"].permute(0, 2, 1, 3, 4)[free], torch.from_numpy(images).permute(0, 2, 1, 3, 4)[free])
    with pytest.raises(RuntimeError, match="meta"):
        MaskedKMeans.make_batch(cfg, images, np.random.default_rng(1))


def _write_cases(folder, n=4, shape=(1, 12, 16, 16), seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        vol = rng.normal(size=shape).astype(np.float32) + rng.integers(0, 4, size=(1, shape[1], 1, 1))
        nnUNetDatasetBlosc2.save_case(vol, np.zeros(shape, np.int8), {}, os.path.join(folder, f"v{i}"),
                                      chunks=shape, blocks=shape)
    return [f"v{i}" for i in range(n)]


def test_prepare_then_train_step_on_plain_unet(tmp_path):
    torch.manual_seed(0)
    folder = str(tmp_path)
    ids = _write_cases(folder)
    cfg = MaskedKMeansConfig(n_clusterers=3, k_min=4, k_max=8, fit_fraction=0.5, fit_epochs=1,
                             feature_channels=8, head_hidden=16, chain_end_prob=0.5)
    assert METHODS.get("masked_kmeans") is MaskedKMeans and MaskedKMeans.transfer == "encoder+decoder"
    ready = MaskedKMeans.prepare(cfg, folder, ids, seed=0)
    assert cfg.label_cache is None and os.path.isfile(ready.label_cache)
    assert MaskedKMeans.prepare(cfg, folder, ids, seed=0).label_cache == ready.label_cache
    net = PlainConvUNet(1, 3, (4, 8, 16), nn.Conv3d, 3, (1, 2, 2), (2, 2, 2),
                        MaskedKMeans.network_output_channels(ready), (2, 2), False, nn.InstanceNorm3d,
                        {"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    method = MaskedKMeans(ready, net, (8, 16, 16), 1)
    assert method.cluster_sizes == pseudo_labels.cluster_sizes(ready.label_cache)
    assert not any(k.startswith("head") for k in net.state_dict())  # head lives on the method
    images = np.random.default_rng(2).normal(size=(2, 1, 8, 16, 16)).astype(np.float32)
    meta = {"keys": ["v3", "v1"], "boxes": [[[6, 14], [0, 16], [0, 16]], [[2, 10], [0, 16], [0, 16]]]}
    batch = MaskedKMeans.make_batch(ready, images, np.random.default_rng(3), meta)
    assert batch["masked_slices"].any()
    assert (batch["labels"][0, 6:] == -1).all() and (batch["labels"][:, :6] >= 0).all()
    losses = method.forward_loss(net, batch)
    assert set(losses) == {"ce", "loss"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert method.head.mlp[0].weight.grad.abs().sum() > 0
    assert next(net.encoder.parameters()).grad.abs().sum() > 0
    panels = MaskedKMeans.preview(ready, batch)
    assert [p[1].shape for p in panels] == [(8, 16, 16)] * 3
    assert panels[2][1][:, 3, 5].tolist() == batch["labels"][0, :, 0].tolist()  # per-slice label, -1 = padding
    from_images = MaskedKMeans.preview_from_images(ready, images, np.random.default_rng(3), meta)
    assert len(from_images) == 5 and np.array_equal(from_images[1][1], batch["data"][0, 0].numpy())
    assert np.array_equal(from_images[0][1], images[0, 0])
    assert len(MaskedKMeans.preview_from_images(cfg, images, np.random.default_rng(3))) == 4


def test_method_without_prepare_and_bad_config_rejected():
    with pytest.raises(RuntimeError, match="prepare"):
        MaskedKMeans(MaskedKMeansConfig(), nn.Identity(), (8, 8, 8), 1)
    for bad in ({"chain_end_prob": 1.5}, {"k_min": 1}, {"k_min": 10, "k_max": 5}, {"temperature": 0},
                {"patch_sizes": (0, 2)}, {"fit_fraction": 0.0}, {"chain_length": 0}, {"transfer": "heads"},
                {"grad_clip": -1.0}):
        with pytest.raises(NnsslError):
            MaskedKMeansConfig(**bad)
    cfg = dataclasses.replace(MaskedKMeansConfig(), patch_sizes=[2, 4])
    assert cfg.patch_sizes == (2, 4)
    assert MaskedKMeansConfig().warmup_fraction == 0.1 and MaskedKMeansConfig().warmup_iterations is None


def test_checkpoint_transfers_encoder_and_decoder(pretrain_env, tmp_path):
    """Paper Fig. 2: only the classification head is replaced, so fine-tuning loads the decoder too."""
    from nnssl.checkpoints import load_resume_checkpoint
    from nnssl.training.injection import LOADED, SKIPPED_NOT_TRANSFERABLE, transfer_weights
    from nnssl.training.pretrain_setup import prepare
    from nnssl.training.pretrainer import pretrain

    cfg = MaskedKMeansConfig()
    assert (cfg.transfer, cfg.grad_clip) == ("encoder+decoder", None)
    small = ["n_clusterers=2", "k_min=2", "k_max=3", "fit_fraction=1.0", "fit_epochs=1", "feature_channels=4",
             "head_hidden=8"]
    out = pretrain("Dataset001_Blobs", "masked_kmeans", iterations=1, iterations_per_epoch=1, batch_size=1,
                   device="cpu", num_workers=0, overrides=small, output_folder=str(tmp_path / "mk"))
    ckpt = load_resume_checkpoint(os.path.join(out, "checkpoint_final.pth"))
    assert ckpt["transfer"] == "encoder+decoder" and ckpt["method"]["config"]["transfer"] == "encoder+decoder"
    decoder = [k for k in ckpt["network_weights"] if k.startswith("decoder.") and ".seg_layers." not in k]
    assert decoder  # the checkpoint carries decoder weights ...
    torch.manual_seed(1)
    fresh = prepare("Dataset001_Blobs", "masked_kmeans", overrides=small).build_network()
    report = transfer_weights(fresh, ckpt["network_weights"], ckpt["transfer"])
    loaded = report.keys(LOADED)
    assert any(k.startswith("decoder.") for k in loaded) and not report.keys(SKIPPED_NOT_TRANSFERABLE)
    state = fresh.state_dict()
    assert all(torch.equal(state[k], ckpt["network_weights"][k]) for k in decoder if k in loaded)  # ... and injects them
    with open(os.path.join(out, "training_log.txt"), encoding="utf-8") as f:
        assert "Gradient clipping off" in f.read()  # the paper clips nothing
