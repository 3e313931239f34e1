"""``segmentation.png``: what the segmentations look like. One axial slice of a test case: the
CT, the reference labels and every run's prediction drawn over it, each prediction titled with
its Dice on that case.

The slice is the one where the reference shows the most classes (ties: the most labeled
voxels), so one picture covers as many organs as a slice can. Arrays are read in the files' own
voxel order ([Z, Y, X], as nnU-Net's predictions are written in the reference's geometry).
"""
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from nnssl.errors import NnsslError

# Assumption: the usual abdominal soft-tissue window (level 40, width 400 HU) for CT display.
CT_WINDOW = (-160.0, 240.0)


def choose_slice(reference: np.ndarray) -> int:
    """Index z of the axial slice of ``reference`` [Z, Y, X] with the most classes > 0, ties broken
    by the most labeled voxels (then the lowest z)."""
    scores = [(np.unique(s[s > 0]).size, int((s > 0).sum())) for s in reference]
    return max(range(len(scores)), key=lambda z: (scores[z], -z))


def case_dice(reference: np.ndarray, prediction: np.ndarray) -> Tuple[float, int]:
    """(mean Dice over the classes present in ``reference``, how many classes that is)."""
    classes = [int(c) for c in np.unique(reference) if c > 0]
    if not classes:
        return float("nan"), 0
    dice = []
    for c in classes:
        r, p = reference == c, prediction == c
        dice.append(2.0 * np.logical_and(r, p).sum() / (r.sum() + p.sum()))
    return float(np.mean(dice)), len(classes)


def _read(path: str) -> np.ndarray:
    import SimpleITK as sitk
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(path))
    except RuntimeError as e:
        raise NnsslError(f"Cannot read {path} for the segmentation picture: {e}") from None


def _label_colours(n_classes: int):
    """Class k (1..n) -> a fixed colour of tab20 (then repeated); 0 is transparent."""
    import matplotlib
    from matplotlib.colors import ListedColormap
    tab20 = matplotlib.colormaps["tab20"]
    colours = [(0, 0, 0, 0)] + [tab20(k % 20) for k in range(n_classes)]
    return ListedColormap(colours), colours


def write_segmentation_figure(image_file: str, reference_file: str, predictions: Sequence[Tuple[str, str]],
                              class_names: Dict[int, str], path: str, window=CT_WINDOW,
                              title: Optional[str] = None) -> dict:
    """Write the picture to ``path`` (.png or .svg); ``predictions``: (run label, segmentation file).

    Returns {"slice": z, "dice": {label: case Dice}, "classes": number of reference classes}."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from nnssl.evaluation.report_figure import report_style, write_figure

    image, reference = _read(image_file), _read(reference_file)
    preds = [(label, _read(f), f) for label, f in predictions]
    for name, arr in [(reference_file, reference)] + [(f, a) for _, a, f in preds]:
        if arr.shape != image.shape:
            raise NnsslError(f"{name} has shape {arr.shape} but the image {image_file} has {image.shape}; the "
                             f"segmentation picture needs predictions in the image's geometry (nnssl_predict "
                             f"writes them so).")
    z = choose_slice(reference)
    n_classes = max(class_names) if class_names else int(reference.max())
    cmap, colours = _label_colours(n_classes)
    dice = {label: case_dice(reference, arr) for label, arr, _ in preds}
    shown = sorted({int(c) for a in [reference] + [a for _, a, _ in preds] for c in np.unique(a[z]) if c > 0})
    panels = [("CT", None), ("reference", reference)] + [
        (f"{label}\nDice {dice[label][0]:.3f} (mean of {dice[label][1]} classes)", arr) for label, arr, _ in preds]
    with report_style():
        fig = Figure(figsize=(2.9 * len(panels), 3.9), layout="constrained")
        axes = fig.subplots(1, len(panels))
        for ax, (name, seg) in zip(axes, panels):
            ax.imshow(image[z], cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
            if seg is not None:
                ax.imshow(np.ma.masked_equal(seg[z], 0), cmap=cmap, vmin=0, vmax=n_classes, alpha=0.6,
                          interpolation="nearest")
            ax.set_title(name)
            ax.set_axis_off()
        handles = [Patch(color=colours[c], label=f"{c} {class_names.get(c, '')}".strip()) for c in shown]
        if handles:
            # ~2.2 inches per entry ("10 portal_and_splenic_veins" is the longest BTCV name)
            per_row = max(1, min(len(handles), int(fig.get_figwidth() / 2.2)))
            fig.legend(handles=handles, loc="outside lower center", ncol=per_row, frameon=False)
        fig.suptitle(title or f"slice z={z} (the one with the most reference classes)")
        write_figure(fig, path)
    return {"slice": z, "dice": {k: v[0] for k, v in dice.items()}, "classes": len(shown)}
