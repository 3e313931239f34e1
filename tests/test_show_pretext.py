"""nnssl_show_pretext writes a PNG mosaic of one pretext batch, for every registered method."""
import os

import matplotlib.image
import numpy as np
import pytest

import nnssl.ssl  # noqa: F401
from nnssl.cli.show_pretext import main
from nnssl.ssl.base import METHODS
from nnssl.training.pretrain_data import PretrainLoader
from nnssl.training.pretrain_setup import prepare, prepare_method

DS = "Dataset001_Blobs"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def expected_panels(method: str) -> int:
    s = prepare_method(prepare(DS, method), seed=0)
    images, meta, rng = PretrainLoader(s.data_folder, s.batch_size, s.crop_size, s.method_cls, s.cfg, 0).images(0)
    if hasattr(s.method_cls, "preview_from_images"):
        return len(s.method_cls.preview_from_images(s.cfg, images, rng, meta=meta))
    return len(s.method_cls.preview(s.cfg, s.method_cls.make_batch(s.cfg, images, rng, meta=meta)))


@pytest.mark.parametrize("method", METHODS.names())
def test_mosaic_png(pretrain_env, tmp_path, method):
    out = str(tmp_path / "pretext.png")
    with pytest.raises(SystemExit) as e:
        main(["-d", DS, "-m", method, "-o", out])
    assert e.value.code == 0
    with open(out, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(out) > 5000
    image = matplotlib.image.imread(out)
    n = expected_panels(method)
    # one row of (axial, coronal) per panel: 3.2 inch per row at 80 dpi, 7 inch wide
    assert image.shape[:2] == (int(round(3.2 * 80 * n)), 7 * 80)
    assert float(np.std(image[..., :3])) > 0.05  # not a blank canvas
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []


def test_output_must_be_png(pretrain_env, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["-d", DS, "-m", METHODS.names()[0], "-o", str(tmp_path / "x.jpg")])
    assert e.value.code == 2 and ".png" in capsys.readouterr().err
