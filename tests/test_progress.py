"""Pretraining progress.png: iteration axis, log loss axis when needed, the whole planned lr curve, data wait."""
import matplotlib.pyplot as plt
import numpy as np
import pytest

from nnssl.training.progress import MAX_CURVE_POINTS, planned_lr_curve, plot_progress, progress_figure
from nnssl.training.schedules import LRSchedule


def history(losses, ipe=5, wait=0.5, time=2.0):
    return [{"epoch": e, "iteration": (e + 1) * ipe, "lr": 0.1, "epoch_time": time, "data_wait": wait,
             "data_wait_fraction": wait / time, "losses": {"loss": v, "ce": v / 2}} for e, v in enumerate(losses)]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_axes_iterations_log_losses_and_data_wait():
    step = LRSchedule("step", 1e-3, 100, step_iterations=20)
    fig = progress_figure(history([10.0, 1.0, 0.5, 0.2]), step)  # losses span 10 / 0.1 = 100 > a decade
    ax_loss, ax_lr, ax_time = fig.axes
    assert ax_loss.get_yscale() == "log"
    assert list(ax_loss.lines[0].get_xdata()) == [5, 10, 15, 20]  # epoch ends, in iterations
    ticks = [t for t in ax_time.get_xticks() if 0 <= t <= 100]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert ax_time.get_xlabel() == "iteration" and ax_lr.get_xlim() == (0, 100)
    planned = ax_lr.lines[0]
    assert planned.get_xdata()[0] == 0 and planned.get_xdata()[-1] == 99  # the whole run, not just 4 epochs
    assert planned.get_ydata()[-1] == pytest.approx(1e-3 / 16)
    # 0.5 s of 2 s waited in every epoch: 25 %
    assert ax_time.get_title() == "data wait: 25% of the time (last epoch 25%)"
    linear = progress_figure(history([1.0, 0.5, 0.2]))  # 5x: linear, and no schedule needed
    assert linear.axes[0].get_yscale() == "linear"


def test_planned_curve_keeps_every_jump_of_a_long_run():
    s = LRSchedule("step", 1.0, 400_000, warmup_iterations=1000, step_iterations=50_000)
    x, lr = planned_lr_curve(s)
    assert len(x) <= MAX_CURVE_POINTS + 2 + 2 * 7
    for b in range(50_000, 400_000, 50_000):  # both sides of every halving
        i = int(np.searchsorted(x, b))
        assert x[i - 1] == b - 1 and x[i] == b and lr[i] == pytest.approx(lr[i - 1] / 2)
    assert lr[list(x).index(999)] == 1.0 and lr[0] == pytest.approx(1 / 1000)


def test_png_is_written(tmp_path):
    # one epoch of 2 s, 0.5 s of it waiting for data: computing (blue) and waiting (red) bars of 1.5 : 0.5
    plot_progress(history([1.0], wait=0.5, time=2.0), str(tmp_path / "p.png"),
                  LRSchedule("cosine", 1e-4, 10, warmup_iterations=1))
    image = plt.imread(str(tmp_path / "p.png"))  # decoded: float RGBA in [0, 1]
    assert image.shape == (720, 720, 4)  # 9 x 9 inches at 80 dpi
    rgb = np.round(image[..., :3] * 255).astype(int)
    time_panel = rgb[int(0.7 * 720):]  # the lowest of the panels (height ratios 3 : 2 : 2)

    def pixels(hex_color):
        return int(np.all(time_panel == [int(hex_color[i:i + 2], 16) for i in (1, 3, 5)], axis=-1).sum())

    blue, red = pixels("#1f77b4"), pixels("#d62728")  # tab:blue, tab:red
    assert red > 500  # the bars are drawn, not an empty figure
    assert 2.7 < blue / red < 3.1  # their areas in the ratio of the times (legend patches add a little to each)
