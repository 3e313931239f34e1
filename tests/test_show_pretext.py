"""nnssl_show_pretext (nnssl/training/pretext_preview.py) writes a PNG mosaic of one pretext batch, for
every registered method: the panels handed to the mosaic (nnssl/training/progress.py) are checked by
count and content, the PNG by size."""
import os

import matplotlib.image
import numpy as np
import pytest

import nnssl.ssl  # noqa: F401
import nnssl.training.pretext_preview as pretext_preview
from nnssl.cli.show_pretext import main
from nnssl.ssl.base import METHODS

DS = "Dataset001_Blobs"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_volume_fusion(panels, cfg):
    """Background and foreground (the two scans), the fused input, the label map k = alpha * K: where
    k = 0 the input is the background, where k = K the foreground."""
    titles = [t for t, _ in panels]
    assert len(panels) == 4
    assert [t.split(" ")[0] for t in titles] == ["background", "foreground", "fused", "label"]
    bg, fg, fused, label = (np.asarray(v) for _, v in panels)
    assert set(np.unique(label).tolist()) <= set(range(cfg.K + 2))
    assert (label == 0).any() and ((label >= 1) & (label <= cfg.K)).any()
    np.testing.assert_allclose(fused[label == 0], bg[label == 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused[label == cfg.K], fg[label == cfg.K], rtol=1e-5, atol=1e-5)


def check_masked_kmeans(panels, cfg):
    """Original, masked input (the original except where the voxel mask is 1, there mask_value), the
    voxel mask, the masked slice chains and clusterer 0's pseudo-labels (the label cache exists)."""
    assert len(panels) == 5
    assert [t.split(" ")[0] for t, _ in panels] == ["original", "masked", "voxel", "masked", "pseudo-label,"]
    original, masked, mask = (np.asarray(v) for _, v in panels[:3])
    assert set(np.unique(mask).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(masked[mask == 0], original[mask == 0])
    assert np.all(masked[mask == 1] == cfg.mask_value)


CONTENT = {"volume_fusion": check_volume_fusion, "masked_kmeans": check_masked_kmeans}


@pytest.mark.parametrize("method", METHODS.names())
def test_mosaic_png(pretrain_env, tmp_path, method, monkeypatch):
    seen = {}
    real_prepare, real_save = pretext_preview.prepare_method, pretext_preview.save_pretext_mosaic

    def prepare_method(*args, **kwargs):
        seen["setup"] = real_prepare(*args, **kwargs)
        return seen["setup"]

    def save(panels, path, **kwargs):
        seen["panels"] = list(panels)
        real_save(panels, path, **kwargs)

    monkeypatch.setattr(pretext_preview, "prepare_method", prepare_method)
    monkeypatch.setattr(pretext_preview, "save_pretext_mosaic", save)
    out = str(tmp_path / "pretext.png")
    with pytest.raises(SystemExit) as e:
        main(["-d", DS, "-m", method, "-o", out])
    assert e.value.code == 0

    setup, panels = seen["setup"], seen["panels"]
    assert panels and all(np.asarray(v).shape == tuple(setup.crop_size) for _, v in panels)
    assert all(np.isfinite(np.asarray(v)).all() for _, v in panels)
    if method in CONTENT:
        CONTENT[method](panels, setup.cfg)
    with open(out, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(out)
    # one row of (axial, coronal) per panel: 3.2 inch per row at 80 dpi, 7 inch wide
    assert image.shape[:2] == (int(round(3.2 * 80 * len(panels))), 7 * 80)
    assert float(np.std(image[..., :3])) > 0.05  # not a blank canvas
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []


def test_output_must_be_png(pretrain_env, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["-d", DS, "-m", METHODS.names()[0], "-o", str(tmp_path / "x.jpg")])
    assert e.value.code == 2 and ".png" in capsys.readouterr().err


def test_incompatible_architecture_is_refused(pretrain_env, tmp_path, capsys, monkeypatch):
    """The capability check runs before anything is read: a throwaway method needing a capability no
    architecture declares is refused for the default architecture, naming the capability."""
    from nnssl.architectures.spec import CAPABILITIES
    from nnssl.ssl.base import SSLMethod

    monkeypatch.setitem(CAPABILITIES, "telepathy", "reads the labeller's mind")
    cls = type("ThrowawayMethod", (SSLMethod,), {"requires": frozenset({"telepathy"})})
    monkeypatch.setitem(METHODS._items, "throwaway_test_method", cls)
    with pytest.raises(SystemExit) as e:
        main(["-d", DS, "-m", "throwaway_test_method", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "cannot run on architecture (-a) 'plainconvunet'" in err and "telepathy" in err
    assert not os.path.exists(tmp_path / "x.png")
