"""CPU bf16 pretraining against float32, per SSL method, on the demo's network and data (one run).

Setup: the demo's full synthetic data (6 labeled + 3 test + 10 unlabeled phantoms), the ``tiny``
plainconvunet plans, pretraining on the unlabeled set (``-pd CTUnlabeled``), batch 2, CPU, every
registered method with its default config (masked_kmeans: the demo-sized pseudo-labels below).

1. Speed: per method, two engines (``Pretrainer``, ``--cpu_precision fp32`` and ``bf16``) on the
   same pre-made loader batches; their train steps (forward_loss, backward, clipping, optimizer
   step) alternate step by step, so load from other processes on the shared machine hits both
   alike; median seconds per iteration after ``--warmup`` steps -> speed-up fp32 / bf16.
2. Loss curves: per method and seed, a real ``pretrain(...)`` run of ``--iterations`` (the demo:
   200) in each precision; the engine's epoch means (``--iterations_per_epoch`` iterations each)
   are the smoothed curves. "Within noise" compares the bf16-vs-fp32 difference (same seed, so
   same initialization and data) with the fp32 seed-to-seed difference (another initialization
   and data order): the mean absolute difference of the curves, and of the final loss (mean of
   the last ``--final_epochs`` epochs).

Writes ``results.json`` and ``results.md`` into ``--out``. Run (about 30 min on 2 shared cores):
``nice -n 5 python benchmarks/bench_pretrain_bf16.py --out benchmarks/results/pretrain_bf16``.
"""
import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pretrain import make_data, set_tree  # noqa: E402  (the demo's data pipeline)

BATCH = 2
DATA = ("BTCV", "plainconvunet", "CTUnlabeled")  # target, architecture, pretraining data (the demo's)
# masked_kmeans' pseudo-labels at the demo's size: the paper's 80 clusterers x K 80-500 would need
# more slices than 10 phantoms have (sklearn then caps K at the slice count anyway); hybrid_mim's
# 32-voxel sub-volumes need a crop divisible by 32 (the demo's patch is 40x96x96).
OVERRIDES = {"masked_kmeans": ["n_clusterers=8", "k_min=8", "k_max=16"], "hybrid_mim": ["crop_size=32,96,96"]}


def methods():
    import nnssl.ssl  # noqa: F401
    from nnssl.ssl.base import compatible_architectures, METHODS
    return [m for m in METHODS.names() if DATA[1] in compatible_architectures(m)]


def quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def speed(method: str, root: str, steps: int, warmup: int) -> dict:
    """Median seconds per engine step in fp32 and bf16, steps interleaved on the same batches."""
    from nnssl.training.pretrain_data import PretrainLoader
    from nnssl.training.pretrain_setup import prepare, prepare_method
    from nnssl.training.pretrainer import Pretrainer

    with quiet():
        setup = prepare_method(prepare(DATA[0], method, DATA[1], DATA[2], overrides=OVERRIDES.get(method, ()),
                                       batch_size=BATCH), seed=0)
    engines = {p: Pretrainer(setup, os.path.join(root, f"steps_{method}_{p}"), 10 ** 6, 10 ** 6, torch.device("cpu"),
                             0, 0, False, cpu_precision=p) for p in ("fp32", "bf16")}
    for e in engines.values():
        e.model.train()
    loader = PretrainLoader(setup.data_folder, setup.batch_size, setup.crop_size, setup.method_cls, setup.cfg, 0)
    times = {p: [] for p in engines}
    for i in range(warmup + steps):
        batch = loader.make(i)
        order = ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")
        for p in order:
            t0 = time.perf_counter()
            engines[p]._step(i, batch)
            if i >= warmup:
                times[p].append(time.perf_counter() - t0)
    med = {p: float(np.median(t)) for p, t in times.items()}
    return {"crop": list(setup.crop_size), "seconds_per_iteration": med, "speedup": med["fp32"] / med["bf16"],
            "steps": steps, "warmup": warmup}


def curve(method: str, precision: str, seed: int, root: str, iterations: int, ipe: int) -> dict:
    """One pretraining run: epoch-mean losses and its wall time per iteration."""
    from nnssl.training.pretrainer import pretrain

    t0 = time.perf_counter()
    with quiet():
        out = pretrain(DATA[0], method, DATA[1], DATA[2], iterations=iterations, iterations_per_epoch=ipe,
                       batch_size=BATCH, device="cpu", seed=seed, overrides=OVERRIDES.get(method, ()),
                       num_workers=0, output_folder=os.path.join(root, f"{method}_{precision}_{seed}"),
                       cpu_precision=precision)
    wall = time.perf_counter() - t0
    history = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=True)["resume"]["loss_history"]
    shutil.rmtree(out)
    return {"loss": [h["losses"]["loss"] for h in history], "seconds_per_iteration": wall / iterations}


def compare(runs: dict, seeds, bf16_seeds, final_epochs: int) -> dict:
    """Curve and final-loss differences: bf16 vs fp32 (same seed, ``bf16_seeds``) against fp32 seed vs
    seed (every pair of ``seeds``)."""
    def final(c):
        return float(np.mean(c[-final_epochs:]))

    def dist(a, b):
        return float(np.mean(np.abs(np.asarray(a) - np.asarray(b))))

    fp32 = [runs[("fp32", s)]["loss"] for s in seeds]
    same = [(runs[("fp32", s)]["loss"], runs[("bf16", s)]["loss"]) for s in bf16_seeds]
    bf16 = [b for _, b in same]
    prec_curve = float(np.mean([dist(a, b) for a, b in same]))
    prec_final = float(np.mean([abs(final(a) - final(b)) for a, b in same]))
    pairs = [(i, j) for i in range(len(seeds)) for j in range(i + 1, len(seeds))]
    seed_curve = float(np.mean([dist(fp32[i], fp32[j]) for i, j in pairs]))
    seed_final = float(np.mean([abs(final(fp32[i]) - final(fp32[j])) for i, j in pairs]))
    return {"final_fp32": [final(c) for c in fp32], "final_bf16": [final(c) for c in bf16],
            "curve_diff_bf16_vs_fp32": prec_curve, "curve_diff_seed_vs_seed": seed_curve,
            "final_diff_bf16_vs_fp32": prec_final, "final_diff_seed_vs_seed": seed_final,
            "within_noise": bool(prec_curve <= seed_curve and prec_final <= seed_final)}


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"# CPU bf16 pretraining vs float32 ({result['date']})", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {result['cpu']}, native bf16: {result['native_bf16']}, torch {result['torch']}, "
             f"{a['threads']} torch threads. Load average at start / end: {result['load_start']} / "
             f"{result['load_end']}; the run took {result['wall_minutes']} min (2 cores shared with other "
             f"sessions: absolute times are noisy, the "
             f"speed-ups are ratios of interleaved steps).", "",
             f"Demo setup: tiny plainconvunet plans of the demo's synthetic BTCV, pretraining on its 10 unlabeled "
             f"phantoms, batch {BATCH}, {a['iterations']} iterations per run, curves = epoch means of "
             f"{a['iterations_per_epoch']} iterations, final loss = mean of the last {a['final_epochs']} epochs, "
             f"fp32 seeds {a['seeds']}, bf16 seeds {a['bf16_seeds']}.", "",
             "| method | crop | s/it fp32 | s/it bf16 | speed-up | final loss fp32 | final loss bf16 | "
             "curve Δ bf16-fp32 | curve Δ seed-seed | final Δ bf16-fp32 | final Δ seed-seed | within noise |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in result["methods"].items():
        s, c = r["speed"], r["curves"]
        lines.append(
            f"| {m} | {'x'.join(map(str, s['crop']))} | {s['seconds_per_iteration']['fp32']:.3f} | "
            f"{s['seconds_per_iteration']['bf16']:.3f} | {s['speedup']:.2f}x | "
            f"{' / '.join(f'{v:.4g}' for v in c['final_fp32'])} | {' / '.join(f'{v:.4g}' for v in c['final_bf16'])} | "
            f"{c['curve_diff_bf16_vs_fp32']:.4g} | {c['curve_diff_seed_vs_seed']:.4g} | "
            f"{c['final_diff_bf16_vs_fp32']:.4g} | {c['final_diff_seed_vs_seed']:.4g} | "
            f"{'yes' if c['within_noise'] else 'no'} |")
    lines += ["", "s/it: median seconds per engine train step over "
              f"{a['steps']} interleaved steps after {a['warmup']} warm-up steps. Final losses per seed. "
              "Δ: mean absolute difference (curves: over the epoch means; bf16-fp32 at equal seed, averaged over "
              "seeds; seed-seed: fp32 runs of different seeds).", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=200, help="iterations per pretraining run (demo: 200)")
    p.add_argument("--iterations_per_epoch", type=int, default=10)
    p.add_argument("--final_epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fp32 runs (the seed-to-seed spread)")
    p.add_argument("--bf16_seeds", type=int, nargs="+", default=[0], help="bf16 runs (each among --seeds)")
    p.add_argument("--steps", type=int, default=12, help="timed interleaved steps per precision (speed)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--out", default=None, help="folder for results.json / results.md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ["nnUNet_n_proc_DA"] = "0"
    from nnssl.devices import cpu_has_native_bf16

    result = {"command": "nice -n 5 python benchmarks/bench_pretrain_bf16.py " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform.processor() or
              platform.machine(), "native_bf16": cpu_has_native_bf16(), "torch": torch.__version__,
              "load_start": [round(x, 2) for x in os.getloadavg()], "args": vars(a), "methods": {}}
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        result["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), result["cpu"])
    start = time.perf_counter()
    root = tempfile.mkdtemp(prefix="bench_bf16_")
    try:
        set_tree(root)
        make_data(root)
        for m in a.methods or methods():
            print(f"{m}: speed ...", flush=True)
            sp = speed(m, root, a.steps, a.warmup)
            print(f"  {sp['seconds_per_iteration']} -> {sp['speedup']:.2f}x", flush=True)
            runs = {}
            for s in a.seeds:
                for prec in ("fp32", "bf16") if s in a.bf16_seeds else ("fp32",):
                    runs[(prec, s)] = curve(m, prec, s, root, a.iterations, a.iterations_per_epoch)
                    print(f"  {prec} seed {s}: final {np.mean(runs[(prec, s)]['loss'][-a.final_epochs:]):.4g}",
                          flush=True)
            result["methods"][m] = {"speed": sp, "curves": compare(runs, a.seeds, a.bf16_seeds, a.final_epochs),
                                    "runs": {f"{k[0]}_seed{k[1]}": v for k, v in runs.items()}}
            write(result, start, a.out)  # after every method: a long run on a shared machine keeps what it has
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(write(result, start, a.out))


def write(result: dict, start: float, out) -> str:
    result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_minutes"] = round((time.perf_counter() - start) / 60, 1)
    md = markdown(result)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
            f.write(md)
    return md


if __name__ == "__main__":
    main()
