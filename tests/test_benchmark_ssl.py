"""nnssl_benchmark_ssl: statistics on hand-made numbers, refusals before anything is written, a --quick run."""
import csv
import json
import os

import numpy as np
import pytest

from nnssl.benchmark import holm, iterations_to_threshold, paired_stats, seeds_needed
from nnssl.benchmark.report import markdown, summarize, threshold_cell
from nnssl.benchmark.settings import BenchmarkSettings, check_settings_file, planned_runs, validate
from nnssl.errors import NnsslError

# Student's t quantiles t(0.975, df) from a printed table (not from scipy)
T975 = {1: 12.706, 2: 4.303, 4: 2.776}


def test_paired_stats_by_hand():
    r = paired_stats([0.5, 0.6, 0.7], [0.4, 0.4, 0.5])
    # differences 0.1, 0.2, 0.2: mean 1/6, std (ddof 1) 0.057735, SE 0.033333, t = 5.0 with 2 df
    assert r["diff_mean"] == pytest.approx(1 / 6)
    assert r["diff_std"] == pytest.approx(0.057735, rel=1e-5)
    assert (r["pretrained_mean"], r["scratch_mean"]) == pytest.approx((0.6, 0.43333333))
    assert r["scratch_std"] == pytest.approx(0.057735, rel=1e-5)
    half = T975[2] * 0.0333333
    assert r["ci95"] == pytest.approx((1 / 6 - half, 1 / 6 + half), abs=2e-5)  # (0.0232, 0.3101)
    assert r["p"] == pytest.approx(0.0377, abs=1e-4)  # two-sided p of t = 5, df 2
    assert r["verdict"] == "helps"
    # differences 0.1, -0.1, 0.05: mean 0.016667, SE 0.060093; the interval holds 0
    noise = paired_stats([0.5, 0.3, 0.45], [0.4, 0.4, 0.4])
    assert noise["ci95"] == pytest.approx((0.016667 - T975[2] * 0.060093, 0.016667 + T975[2] * 0.060093), abs=1e-4)
    assert noise["verdict"] == "within noise"
    # differences -0.3, -0.25, -0.3: mean -0.28333, SE 0.016667
    hurts = paired_stats([0.1, 0.2, 0.1], [0.4, 0.45, 0.4])
    assert hurts["ci95"] == pytest.approx((-0.28333 - T975[2] * 0.016667, -0.28333 + T975[2] * 0.016667), abs=1e-4)
    assert hurts["verdict"] == "hurts"
    five = paired_stats([0.6, 0.7, 0.8, 0.9, 1.0], [0.5] * 5)  # differences 0.1 .. 0.5: SE 0.070711, 4 df
    assert five["ci95"] == pytest.approx((0.3 - T975[4] * 0.070711, 0.3 + T975[4] * 0.070711), abs=1e-4)


def test_fewer_than_three_seeds_is_never_a_verdict():
    two = paired_stats([0.5, 0.7], [0.4, 0.4])  # differences 0.1, 0.3: mean 0.2, SE 0.1, t(0.975, 1) = 12.706
    assert two["ci95"] == pytest.approx((0.2 - T975[1] * 0.1, 0.2 + T975[1] * 0.1), abs=1e-3)
    assert two["verdict"] == "too few seeds"
    same = paired_stats([0.75, 0.5], [0.5, 0.25])  # two identical differences: still no verdict
    assert same["verdict"] == "too few seeds"
    one = paired_stats([0.9], [0.1])
    assert (one["diff_std"], one["ci95"], one["verdict"]) == (0.0, (-np.inf, np.inf), "too few seeds")


def test_zero_variance_differences():
    # 0.25 exactly in binary: every seed the same difference, a zero-width interval away from 0
    r = paired_stats([0.75, 0.5, 0.625], [0.5, 0.25, 0.375])
    assert (r["diff_mean"], r["diff_std"], r["ci95"], r["p"]) == (0.25, 0.0, (0.25, 0.25), 0.0)
    assert (r["verdict"], seeds_needed(r["diff_mean"], r["diff_std"])) == ("helps", 3)
    tie = paired_stats([0.5, 0.25, 0.375], [0.5, 0.25, 0.375])  # no difference at all
    assert (tie["ci95"], tie["p"], tie["verdict"]) == ((0.0, 0.0), 1.0, "within noise")
    assert seeds_needed(tie["diff_mean"], tie["diff_std"]) is None


def test_false_verdict_rate_without_effect_is_five_percent():
    """No true effect (pretrained = scratch + zero-mean noise), k = 3 seeds: the verdict must be
    wrong in 5 % of benchmarks. 10000 trials: binomial SE sqrt(0.05 * 0.95 / 10000) = 0.0022, so
    the tolerance 0.01 is 4.6 SE (a correct rule fails it with probability < 1e-5); the former
    rule (|mean| > 2 SE) gives 18 %, a rule that never decides 0 %."""
    rng = np.random.default_rng(20)
    trials, wrong = 10000, 0
    for _ in range(trials):
        scratch = rng.normal(0.4, 0.05, 3)
        pretrained = scratch + rng.normal(0.0, 0.05, 3)
        wrong += paired_stats(pretrained, scratch)["verdict"] in ("helps", "hurts")
    assert abs(wrong / trials - 0.05) < 0.01


def test_holm_and_seeds_needed_against_tables():
    # p sorted 0.01, 0.03, 0.04 -> 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    # paired / one-sample t test, two-sided alpha 0.05, power 0.8 (Cohen's tables, G*Power):
    # effect size d = 0.5 -> 34, 0.8 -> 15, 1.0 -> 10 pairs
    assert [seeds_needed(d * 0.1, 0.1) for d in (0.5, 0.8, 1.0)] == [34, 15, 10]
    assert seeds_needed(-0.05, 0.1) == 34  # the sign does not matter
    assert seeds_needed(1e-6, 0.1) is None  # more than 10000 seeds


def test_iterations_to_threshold():
    assert iterations_to_threshold([0.1, float("nan"), 0.35, 0.2], 20, 0.3) == 60
    assert iterations_to_threshold([0.3], 5, 0.3) == 5
    assert iterations_to_threshold([0.1, 0.2], 20, 0.3) is None
    assert threshold_cell([60, None, 100], 200) == "80 (2/3)"
    assert threshold_cell([None, None], 200) == "> 200 (0/2)"


def _result(start, seed, dice, n=1, to=None):
    return {"architecture": "plainconvunet", "start": start, "budget": "same", "n": n, "seed": seed,
            "pretrain_iterations": 0 if start == "scratch" else 10, "finetune_iterations": 40, "test_dice": dice,
            "iterations_to_threshold": to, "val_dice": [0.1, 0.2]}


def test_summary_pairs_by_seed():
    results = [_result("scratch", 0, 0.40), _result("scratch", 1, 0.50), _result("scratch", 2, 0.45),
               _result("vf/pool", 2, 0.55, to=20), _result("vf/pool", 0, 0.42), _result("vf/pool", 1, 0.60, to=40)]
    rows = {r["start"]: r for r in summarize(results)}
    assert rows["scratch"]["dice_mean"] == pytest.approx(0.45)
    assert rows["scratch"]["dice_std"] == pytest.approx(0.05)
    assert rows["scratch"]["dice_range"] == pytest.approx(0.10)
    # pairs by seed: 0.42-0.40, 0.60-0.50, 0.55-0.45 -> 0.02, 0.10, 0.10
    assert rows["vf/pool"]["diff_mean"] == pytest.approx(0.22 / 3)
    assert rows["vf/pool"]["diff_std"] == pytest.approx(np.std([0.02, 0.10, 0.10], ddof=1))
    assert rows["vf/pool"]["to_threshold"] == [None, 40, 20]  # ordered by seed


def test_figure_ignores_global_restyling(tmp_path, monkeypatch):
    """nnU-Net's progress plot (called by every fine-tuning run) sets seaborn's font scale 2.5
    globally; results.png must keep the report's own sizes and get one curve panel per budget."""
    import matplotlib
    from nnssl.benchmark import report
    from nnssl.evaluation import report_figure

    results = [_result(st, seed, 0.4 + 0.01 * seed, n=n) for st in ("scratch", "vf/pool") for seed in (0, 1)
               for n in (1, 6)]
    figures = []
    real_write = report_figure.write_figure
    monkeypatch.setattr(report_figure, "write_figure", lambda fig, path, fmt=None: (figures.append(fig),
                                                                                    real_write(fig, path, fmt)))
    monkeypatch.setitem(matplotlib.rcParams, "font.size", 25.0)
    monkeypatch.setitem(matplotlib.rcParams, "axes.titlesize", 30.0)
    report.write_png(summarize(results), results, str(tmp_path / "results.png"))
    (fig,) = figures
    assert [ax.get_title() for ax in fig.axes] == ["test Dice per label budget", "validation curves, n = 1",
                                                   "validation curves, n = 6"]
    assert {ax.title.get_fontsize() for ax in fig.axes} == {report_figure.FONT["axes.titlesize"]}
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_planned_runs_and_equal_budget():
    s = BenchmarkSettings(methods=("volume_fusion",), seeds=(0, 1, 2), n_labeled=(1, 6), data=("intask", "pool"),
                          pretrain_iterations=100, finetune_iterations=300, equal_budget=True)
    runs = planned_runs(s, ["volume_fusion"])
    # per (n, seed): scratch, 2 pretrained starts, the equal-budget scratch run; 2 budgets x 3 seeds
    assert len(runs) == 24
    equal = [r for r in runs if r.budget == "equal"]
    assert {(r.start, r.finetune_iterations, r.pretrain_iterations) for r in equal} == {("scratch", 400, 0)}
    assert {r.finetune_iterations for r in runs if r.budget == "same"} == {300}
    assert [r.n for r in runs[:12]] == [1] * 12  # budget-major: an interrupted run has whole label budgets


def test_equal_budget_pairs_pretrained_with_the_longer_scratch_runs():
    results = [_result("scratch", 0, 0.40), _result("scratch", 1, 0.50), _result("vf/pool", 0, 0.45),
               _result("vf/pool", 1, 0.52)]
    for seed, dice in ((0, 0.50), (1, 0.56)):
        results.append({**_result("scratch", seed, dice), "budget": "equal", "finetune_iterations": 50})
    rows = {(r["start"], r["budget"]): r for r in summarize(results)}
    assert rows[("vf/pool", "same")]["diff_mean"] == pytest.approx(0.035)  # 0.05, 0.02
    assert rows[("vf/pool", "equal")]["diff_mean"] == pytest.approx(-0.045)  # -0.05, -0.04
    assert rows[("vf/pool", "equal")]["scratch_iterations"] == 50
    assert rows[("scratch", "equal")]["dice_mean"] == pytest.approx(0.53)


def _incompatible_pair():
    from nnssl.architectures import ARCHITECTURES
    from nnssl.ssl import METHODS

    for m in METHODS.names():
        for a in ARCHITECTURES.names():
            if METHODS.get(m).requires - ARCHITECTURES.get(a).capabilities:
                return m, a
    raise AssertionError("no registered (method, architecture) pair is incompatible; this test needs one")


def test_refusals():
    m, a = _incompatible_pair()
    with pytest.raises(NnsslError, match="cannot run on architecture"):
        validate(BenchmarkSettings(methods=(m,), architectures=(a,)))
    assert m not in validate(BenchmarkSettings(architectures=(a,)))  # every method: incompatible ones left out
    with pytest.raises(NnsslError, match="multiple of --iterations_per_epoch"):
        validate(BenchmarkSettings(methods=("volume_fusion",), finetune_iterations=300, pretrain_iterations=290,
                                   iterations_per_epoch=20, equal_budget=True))  # 590 is not whole epochs


def test_label_budget_larger_than_pool_writes_nothing(tmp_path):
    from nnssl.benchmark.runs import run_benchmark

    out = tmp_path / "bench"
    with pytest.raises(NnsslError, match="labeled pool has 6 cases"):
        run_benchmark(BenchmarkSettings(methods=("volume_fusion",), n_labeled=(1, 7)), str(out))
    assert not out.exists()


def test_rerun_with_other_settings_is_refused(tmp_path):
    check_settings_file(str(tmp_path), BenchmarkSettings(seeds=(0, 1, 2)))
    check_settings_file(str(tmp_path), BenchmarkSettings(seeds=(0, 1, 2)))  # same: resumes
    with pytest.raises(NnsslError, match=r"seeds: \[0, 1, 2\] there, \[0, 1\] now"):
        check_settings_file(str(tmp_path), BenchmarkSettings(seeds=(0, 1)))


def test_quick_run_end_to_end_and_resume(tmp_path, monkeypatch):
    """Two seeds end to end (the k >= 2 path of the statistics on real runs), with in-task pretraining:
    results.md's Δ and interval are the ones of results.csv's paired values, command.txt holds the
    command, and the test case is nowhere in the fingerprint, the splits or the in-task set."""
    from nnssl.cli.benchmark_ssl import main

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    out = str(tmp_path / "bench")
    args = ["-m", "volume_fusion", "--seeds", "0", "1", "--n_labeled", "1", "--data", "intask",
            "--pretrain_iterations", "4", "--iterations", "4", "--iterations_per_epoch", "2", "--val_iterations", "1",
            "--labeled_pool", "2", "--val_cases", "1", "--test_cases", "1", "--unlabeled", "1",
            "--shape", "16", "32", "32", "-o", out]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    with open(os.path.join(out, "results.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["start"], r["seed"]) for r in rows] == [("scratch", "0"), ("scratch", "1"),
                                                       ("volume_fusion/intask", "0"), ("volume_fusion/intask", "1")]
    dice = {(r["start"], r["seed"]): float(r["test_dice"]) for r in rows}
    d = [dice[("volume_fusion/intask", k)] - dice[("scratch", k)] for k in ("0", "1")]
    mean, se = (d[0] + d[1]) / 2, abs(d[0] - d[1]) / 2  # two values: std = |a - b| / sqrt 2, SE = std / sqrt 2
    md = open(os.path.join(out, "results.md"), encoding="utf-8").read()
    row = next(line for line in md.splitlines() if line.startswith("| plainconvunet | 1 | volume_fusion/intask |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[5] == f"{mean:+.3f} [{mean - 12.706 * se:+.3f}, {mean + 12.706 * se:+.3f}]"
    assert cells[6:8] == ["—", "too few seeds"]
    scratch_row = next(line for line in md.splitlines() if line.startswith("| plainconvunet | 1 | scratch |"))
    scratch = [dice[("scratch", k)] for k in ("0", "1")]
    assert scratch_row.split("|")[10].strip() == f"{max(scratch) - min(scratch):.3f}"
    assert "the 1 test cases" in md
    for r in rows:
        folder = os.path.join(out, "runs", "plainconvunet", r["start"].replace("/", "__"), f"n1_s{r['seed']}")
        with open(os.path.join(folder, "result.json"), encoding="utf-8") as f:
            assert len(json.load(f)["val_dice"]) == 2  # 4 iterations, 2 per epoch: one value per epoch
    assert open(os.path.join(out, "command.txt"), encoding="utf-8").read().split() == ["nnssl_benchmark_ssl"] + args
    assert os.path.getsize(os.path.join(out, "results.png")) > 0

    # cases BTCV_0001-0002 pool, 0003 validation, 0004 test
    tree = os.path.join(out, "nnunet")
    pre = os.path.join(tree, "nnUNet_preprocessed", "Dataset901_BTCV")
    with open(os.path.join(pre, "splits_final.json"), encoding="utf-8") as f:
        splits = json.load(f)
    assert all("BTCV_0004" not in fold["train"] + fold["val"] for fold in splits)
    assert sorted(os.listdir(os.path.join(tree, "nnUNet_raw", "Dataset901_BTCV", "imagesTr"))) == [
        "BTCV_0001_0000.nii.gz", "BTCV_0002_0000.nii.gz", "BTCV_0003_0000.nii.gz"]
    with open(os.path.join(pre, "dataset_fingerprint.json"), encoding="utf-8") as f:
        assert len(json.load(f)["spacings"]) == 3  # one per pool and validation case, none for the test case
    assert sorted(os.listdir(os.path.join(out, "data", "intask_images"))) == ["BTCV_0001.nii.gz", "BTCV_0002.nii.gz"]
    assert len(os.listdir(os.path.join(tree, "nnUNet_raw", "Dataset902_InTask", "imagesTr"))) == 2
    assert os.listdir(os.path.join(out, "data", "test_images")) == ["BTCV_0004_0000.nii.gz"]

    import nnssl.training.finetune as finetune
    monkeypatch.setattr(finetune, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    with pytest.raises(SystemExit) as e:
        main(args)  # resumes: every run is finished
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(args + ["--threshold", "0.5"])
    assert e.value.code == 2


def test_quick_refuses_the_options_it_replaces(tmp_path):
    from nnssl.cli.benchmark_ssl import QUICK, build_parser, main, settings_from_args

    out = tmp_path / "bench"
    for extra in (["--seeds", "0", "1", "2"], ["--iterations", "300"], ["--shape", "32", "64", "64"]):
        with pytest.raises(SystemExit) as e:
            main(["--quick", "-m", "volume_fusion", "-o", str(out)] + extra)
        assert e.value.code == 2
    assert not out.exists()
    s = settings_from_args(build_parser().parse_args(["--quick", "--val_iterations", "3"]))
    assert (s.seeds, s.finetune_iterations, s.shape, s.val_iterations) == ((0,), QUICK["iterations"], (16, 32, 32), 3)


def test_refused_command_writes_nothing(tmp_path):
    """Issue 21: a refused benchmark must not leave a settings.json that blocks the corrected command."""
    from nnssl.cli.benchmark_ssl import main

    out = tmp_path / "bench"
    for bad in (["--seeds", "-1"], ["--val_iterations", "0"], ["--threshold", "0"], ["--test_cases", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["-m", "volume_fusion", "-o", str(out)] + bad)
        assert e.value.code == 2, bad
        assert not out.exists(), bad


def test_pretraining_per_seed():
    from nnssl.benchmark.runs import pretraining_folder, pretraining_seed

    once, per_seed = BenchmarkSettings(seeds=(3, 4, 5)), BenchmarkSettings(seeds=(3, 4, 5), pretrain_per_seed=True)
    assert [pretraining_seed(once, k) for k in (3, 4, 5)] == [3, 3, 3]
    assert [pretraining_seed(per_seed, k) for k in (3, 4, 5)] == [3, 4, 5]
    assert pretraining_folder("/o", "a", "m", "intask", once, 3) == os.path.join("/o", "pretraining", "a", "m__intask")
    assert pretraining_folder("/o", "a", "m", "intask", per_seed, 4) == os.path.join("/o", "pretraining", "a",
                                                                                      "m__intask__s4")
    assert "one pretraining run per seed" in markdown(per_seed, [])


def test_verdicts_of_one_file_are_holm_corrected():
    results = [_result("scratch", seed, 0.40) for seed in (0, 1, 2)]
    for seed, (a, b, c) in enumerate(((0.50, 0.625, 0.45), (0.60, 0.625, 0.45), (0.60, 0.625, 0.35))):
        results += [_result("a/pool", seed, a), _result("b/pool", seed, b), _result("c/pool", seed, c)]
    rows = {r["start"]: r for r in summarize(results)}
    # differences a: 0.1, 0.2, 0.2 (p 0.0377); b: 0.225 x 3 (p 0); c: 0.05, 0.05, -0.05 (p 0.42)
    assert rows["a/pool"]["p"] == pytest.approx(0.0377, abs=1e-4)
    assert rows["a/pool"]["p_holm"] == pytest.approx(2 * 0.0377, abs=2e-4)  # second smallest of 3: x 2
    assert (rows["a/pool"]["verdict_uncorrected"], rows["a/pool"]["verdict"]) == ("helps", "within noise")
    assert (rows["b/pool"]["p_holm"], rows["b/pool"]["verdict"]) == (0.0, "helps")
    assert rows["c/pool"]["verdict"] == "within noise"
    md = markdown(BenchmarkSettings(seeds=(0, 1, 2)), summarize(results))
    assert ("| a/pool | same (10 + 40 vs 0 + 40) | 0.567 ± 0.058 | +0.167 [+0.023, +0.310] | 0.075 | within noise |"
            in md)
    assert "over all 3 comparisons" in md and "range of scratch test Dice over seeds" in md
    assert "one pretraining run per (method, data), seed 0, shared by every seed" in md
    assert "the 3 test cases" in md


def test_statistics_import_without_torch():
    import subprocess
    import sys

    code = ("import sys; import nnssl.benchmark, nnssl.benchmark.stats, nnssl.benchmark.settings, "
            "nnssl.benchmark.report; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_benchmark_modules_import_in_one_direction():
    """No import circle inside nnssl/benchmark/ (module-level and function-level imports alike)."""
    import ast
    import nnssl.benchmark

    folder = os.path.dirname(nnssl.benchmark.__file__)
    graph = {}
    for name in ("data", "report", "runs", "settings", "stats"):
        with open(os.path.join(folder, name + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        graph[name] = {n.module.split(".")[2] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                       and n.module and n.module.startswith("nnssl.benchmark.")}
    done = []
    while graph:  # peel off modules whose imports are all done (a circle would leave some forever)
        ready = [m for m, deps in graph.items() if deps <= set(done)]
        assert ready, f"import circle among {sorted(graph)}"
        done += ready
        for m in ready:
            del graph[m]
    assert done.index("runs") > max(done.index("data"), done.index("report"))


def test_one_seed_names_no_seed_count():
    """One paired difference has no spread: 'seeds needed' is unknown, not the minimum of 3."""
    rows = summarize([_result("scratch", 0, 0.06), _result("volume_fusion/intask", 0, 0.27)])
    row = next(r for r in rows if r["start"] != "scratch")
    assert (row["k"], row["verdict"], row["seeds_needed"]) == (1, "too few seeds", None)
    two = summarize([_result("scratch", 0, 0.06), _result("volume_fusion/intask", 0, 0.27),
                     _result("scratch", 1, 0.10), _result("volume_fusion/intask", 1, 0.21)])
    assert next(r for r in two if r["start"] != "scratch")["seeds_needed"] is not None
