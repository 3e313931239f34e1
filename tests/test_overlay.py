"""segmentation.png: the slice it shows, the per-case Dice in its titles, refusals."""
import numpy as np
import pytest

from conftest import write_image
from nnssl.errors import NnsslError
from nnssl.evaluation.overlay import case_dice, choose_slice, write_segmentation_figure


def _reference():
    ref = np.zeros((4, 8, 8), np.uint8)
    ref[1, :6, :6] = 1  # one class, 36 voxels
    ref[2, 0, 0], ref[2, 1, 1], ref[2, 2, 2] = 1, 2, 3  # three classes, 3 voxels: wins
    ref[3, 0, :3] = (1, 2, 3)  # also three classes, 3 voxels: the lower z wins the tie
    return ref


def test_slice_with_most_classes():
    assert choose_slice(_reference()) == 2
    assert choose_slice(np.zeros((3, 4, 4), np.uint8)) == 0


def test_case_dice_by_hand():
    ref = np.zeros((1, 4, 4), np.uint8)
    ref[0, 0, :4] = 1  # 4 voxels of class 1
    ref[0, 1, :2] = 2  # 2 voxels of class 2
    pred = np.zeros_like(ref)
    pred[0, 0, :2] = 1  # 2 of the 4 found: 2*2 / (4+2) = 2/3
    pred[0, 3, :3] = 3  # a class the reference lacks: not averaged in; class 2 missed: 0
    dice, n = case_dice(ref, pred)
    assert n == 2 and dice == pytest.approx((2 / 3 + 0.0) / 2)


def test_figure_written_with_case_dice(tmp_path):
    ref = _reference()
    img = np.full(ref.shape, 40, np.int16)
    write_image(tmp_path / "img.nii.gz", img)
    write_image(tmp_path / "ref.nii.gz", ref)
    write_image(tmp_path / "perfect.nii.gz", ref)
    write_image(tmp_path / "empty.nii.gz", np.zeros_like(ref))
    out = tmp_path / "segmentation.png"
    info = write_segmentation_figure(str(tmp_path / "img.nii.gz"), str(tmp_path / "ref.nii.gz"),
                                     [("perfect", str(tmp_path / "perfect.nii.gz")),
                                      ("empty", str(tmp_path / "empty.nii.gz"))],
                                     {1: "spleen", 2: "kidney", 3: "liver"}, str(out))
    assert info == {"slice": 2, "dice": {"perfect": 1.0, "empty": 0.0}, "classes": 3}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prediction_in_another_geometry_is_refused(tmp_path):
    write_image(tmp_path / "img.nii.gz", np.zeros((4, 8, 8), np.int16))
    write_image(tmp_path / "ref.nii.gz", _reference())
    write_image(tmp_path / "small.nii.gz", np.zeros((4, 6, 6), np.uint8))
    with pytest.raises(NnsslError, match=r"small.nii.gz has shape \(4, 6, 6\) but the image"):
        write_segmentation_figure(str(tmp_path / "img.nii.gz"), str(tmp_path / "ref.nii.gz"),
                                  [("run", str(tmp_path / "small.nii.gz"))], {}, str(tmp_path / "s.png"))
    assert not (tmp_path / "s.png").exists()
