"""Memory the planners promise (issue 23, §3): measured peak of one forward/backward on the CPU
(float32) against each architecture planner's estimate.

Plans: every registered architecture at its paper size (no preset), planned dataset-free
(``without_dataset``, 1 CT channel, 14 labels) for BTCV-like data: spacing (3.0, 0.7578, 0.7578) mm
and median shape (148, 512, 512) voxels after resampling (nnU-Net's BTCV fingerprint), 8 GB budget.

Measurement: each network in a fresh subprocess (float32, deep supervision on as in fine-tuning,
1 thread): RSS just before the forward (network, optimizer-free, input allocated) and the
process's peak RSS (``getrusage`` max RSS) after forward + ``sum(mean(outputs))`` + backward; the
difference is the activation (+ gradient, + workspace) memory. Paper-size patches at the planned
batch need tens of GB and minutes per step on 2 shared cores, so the step runs at **batch 1 and a
patch of ``--fraction`` (default 0.35) of the planned patch per axis** (rounded to the planner's
divisor; ``network_for_patch`` builds the network for it, so size-bound kwargs follow), and the
planner's estimate is computed for that same patch and batch: the compared quantity is the ratio
measured / estimate. The table also scales both to the planned patch and batch (linear in voxels
and batch; global attention grows faster than that, which the ratio at the smaller patch
understates).

Planner estimate in GB: nnU-Net's feature-map proxy (``static_estimate_VRAM_usage``) converted
with the planner's own reference: ``est / UNet_reference_val_3d * UNet_reference_val_corresp_GB
* batch / UNet_reference_val_corresp_bs_3d``. It targets fp16 AMP on a GPU; float32 on the CPU
bounds those activations from above.

Run: ``nice -n 5 python benchmarks/bench_memory.py --out benchmarks/results/memory``.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

SPACING = (3.0, 0.7578, 0.7578)
MEDIAN_SHAPE = (148, 512, 512)
N_VOXELS_DATASET = 30 * float(np.prod(MEDIAN_SHAPE))  # BTCV: 30 training cases
N_LABELS = 14


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def plan(arch: str) -> dict:
    """The planner's 3d_fullres plan (patch, batch, architecture block) for the BTCV-like data."""
    import contextlib
    import io
    import nnssl.architectures  # noqa: F401
    from nnssl.architectures.spec import ARCHITECTURES

    with contextlib.redirect_stdout(io.StringIO()):
        planner = ARCHITECTURES.get(arch).planner_class().without_dataset(1, N_LABELS)
        p = planner.get_plans_for_configuration(SPACING, MEDIAN_SHAPE, "nnUNetPlans_3d_fullres", N_VOXELS_DATASET, {})
    return {"patch": [int(x) for x in p["patch_size"]], "batch": int(p["batch_size"]),
            "block": p["architecture"]}, planner


def estimate_gb(planner, patch, batch: int, block: dict) -> float:
    est = planner.static_estimate_VRAM_usage(tuple(patch), 1, N_LABELS, block["network_class_name"],
                                             block["arch_kwargs"], tuple(block.get("_kw_requires_import") or ()))
    return (est / planner.UNet_reference_val_3d * planner.UNet_reference_val_corresp_GB * batch
            / planner.UNet_reference_val_corresp_bs_3d)


def grad_gb(arch: str, patch) -> float:
    """float32 parameter gradients of the paper-size network at ``patch`` (what the feature-map proxy leaves out)."""
    from nnssl.architectures.build import _from_block

    _, planner = plan(arch)
    net = _from_block(planner.network_for_patch(tuple(patch), SPACING), 1, N_LABELS, deep_supervision=True)
    return sum(p.numel() for p in net.parameters() if p.requires_grad) * 4 / 2 ** 30


def child(arch: str, fraction: float) -> dict:
    """In a fresh process: plan, build at the reduced patch, one forward/backward; the numbers."""
    import torch
    from nnssl.architectures.build import _from_block

    torch.set_num_threads(1)
    planned, planner = plan(arch)
    divisor = np.asarray(planner.patch_divisor(SPACING) if hasattr(planner, "patch_divisor") else
                         [2 ** 5, 2 ** 6, 2 ** 6], dtype=np.int64)
    smallest = np.asarray(planner.smallest_patch(SPACING), dtype=np.int64)
    patch = np.asarray(planned["patch"], dtype=np.int64)
    small = np.maximum(np.round(patch * fraction / divisor) * divisor, smallest).astype(np.int64)
    block = planner.network_for_patch(tuple(int(x) for x in small), SPACING)
    net = _from_block(block, 1, N_LABELS, deep_supervision=True)
    x = torch.randn(1, 1, *[int(s) for s in small])
    before = _rss_bytes()
    t0 = time.perf_counter()
    out = net(x)
    outs = out if isinstance(out, (list, tuple)) else [out]
    sum(o.float().mean() for o in outs).backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    plan_block = planned["block"]  # what the planner wrote (network_for_patch refuses some planned patches)
    return {"architecture": arch, "planned_patch": planned["patch"], "planned_batch": planned["batch"],
            "measured_patch": [int(s) for s in small], "measured_gb": (peak - before) / 2 ** 30,
            "grad_gb": sum(p.numel() for p in net.parameters() if p.requires_grad) * 4 / 2 ** 30,
            "estimate_gb": estimate_gb(planner, small, 1, block),
            "estimate_planned_gb": estimate_gb(planner, planned["patch"], planned["batch"], plan_block),
            "seconds": seconds}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--architectures", nargs="+", default=None)
    p.add_argument("--fraction", type=float, default=0.35, help="patch fraction per axis that is measured")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--render", default=None, help="re-render the table of an earlier results.json (no measuring)")
    a = p.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.fraction)))
        return
    import nnssl.architectures  # noqa: F401
    from nnssl.architectures.spec import ARCHITECTURES

    rows, load0 = [], os.getloadavg()
    if a.render:
        with open(a.render, encoding="utf-8") as f:
            rows = json.load(f)
        for r in rows:
            if "error" not in r and "grad_gb" not in r:  # results from before grad_gb was recorded
                r["grad_gb"] = grad_gb(r["architecture"], r["measured_patch"])
    for arch in [] if a.render else a.architectures or ARCHITECTURES.names():
        r = subprocess.run([sys.executable, __file__, "--child", arch, "--fraction", str(a.fraction)],
                           capture_output=True, text=True)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            rows.append({"architecture": arch, "error": (r.stderr or r.stdout)[-500:]})
            print(arch, "FAILED", rows[-1]["error"], flush=True)
            continue
        rows.append(json.loads(line[7:]))
        print(rows[-1], flush=True)
    md = ["# Planner memory estimates against a measured CPU forward/backward (float32)", "",
          "Command: `nice -n 5 python benchmarks/bench_memory.py " + " ".join(argv or sys.argv[1:]) + "`", "",
          f"BTCV-like plans (spacing {SPACING} mm, median shape {MEDIAN_SHAPE}, 8 GB budget), every architecture at "
          f"its paper size. Measured at batch 1 and {a.fraction:g} of the planned patch per axis (the planned "
          f"patch and batch need tens of GB and minutes per step on this 2-core machine); 'scaled' columns scale "
          f"both numbers linearly to the planned patch and batch. Load average during the run: "
          f"{'(not recorded)' if a.render else [round(x, 1) for x in load0]} -> "
          f"{[round(x, 1) for x in os.getloadavg()]} (memory is not affected).", "",
          "Measured = peak RSS growth over forward + backward: activations, workspace and the float32 parameter "
          "gradients; nnU-Net's feature-map proxy counts activations only, so the ratio and verdict use "
          "measured − gradients. Verdict: ok when that is ≤ 1.2x the estimate; when it is above, fp16 AMP on a GPU "
          "stores about half of the float32 activations, so '≤ 1.2x at fp32/2' means within the promise on a GPU.",
          "",
          "| architecture | planned patch x batch | measured patch (batch 1) | measured GB | of it gradients GB | "
          "planner GB | (measured − gradients) ÷ planner | planner GB at plan | activations scaled to plan | "
          "verdict |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['architecture']} | FAILED: {' '.join(r['error'].split())[-200:]} | | | | | | | |")
            continue
        act = r["measured_gb"] - r["grad_gb"]
        ratio = act / r["estimate_gb"]
        scale = np.prod(r["planned_patch"]) * r["planned_batch"] / np.prod(r["measured_patch"])
        verdict = "ok (fp32 ≤ 1.2x)" if ratio <= 1.2 else (
            "UNDERESTIMATES (fp32/2 > 1.2x)" if ratio / 2 > 1.2 else "fp32 above; ≤ 1.2x at fp32/2")
        md.append(f"| {r['architecture']} | {'x'.join(map(str, r['planned_patch']))} x {r['planned_batch']} | "
                  f"{'x'.join(map(str, r['measured_patch']))} | {r['measured_gb']:.3f} | {r['grad_gb']:.3f} | "
                  f"{r['estimate_gb']:.3f} | {ratio:.2f} | {r['estimate_planned_gb']:.2f} | {act * scale:.2f} | "
                  f"{verdict} |")
    if a.render:
        md[2] = f"Command: `nice -n 5 python benchmarks/bench_memory.py --out DIR`, table re-rendered with `--render`"
    text = "\n".join(md) + "\n"
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "results.md"), "w", encoding="utf-8") as f:
            f.write(text)
        with open(os.path.join(a.out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
