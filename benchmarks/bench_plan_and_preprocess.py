"""nnssl_plan_and_preprocess against nnUNetv2_plan_and_preprocess on the same synthetic dataset.

(a) wall time of the whole command (fingerprint + plan + preprocess 3d_fullres), nnssl ÷ nnU-Net,
    both as subprocesses into separate preprocessed folders, same ``-np`` (target ≤ 1.10);
(b) unlabeled preprocessing (``-pd``) throughput ÷ nnU-Net's labeled preprocessing throughput
    (``nnUNetv2_preprocess``) on same-size cases, ``-np 1`` (target ≥ 0.9), and the peak memory
    of a process doing the work (max RSS of the command's process tree, read with
    ``getrusage(RUSAGE_CHILDREN)`` in a wrapper process) nnssl ÷ nnU-Net (target ≤ 1.5).

Data: ``write_synthetic_btcv`` phantoms converted with ``convert_btcv`` (labeled, Dataset001)
and ``convert_unlabeled`` (Dataset002, same distribution and shape). Every timing is the best of
``--repeats`` runs (the machine is shared; the minimum is the least disturbed run).

Run: ``python benchmarks/bench_plan_and_preprocess.py [--cases 12] [--shape 48 128 128] [--np 2]``.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

# Runs `cmd` (argv list from argv[1]) and prints {"wall": s, "maxrss_mb": MB} of its process tree.
_WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
r = subprocess.run(json.loads(sys.argv[1]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
wall = time.perf_counter() - t0
if r.returncode:
    sys.exit(r.stderr[-3000:])
print(json.dumps({"wall": wall, "maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measure(cmd, env):
    out = subprocess.run([sys.executable, "-c", _WRAPPER, json.dumps(cmd)], env=env, capture_output=True, text=True, encoding="utf-8", errors="replace")
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def best(cmd, env, repeats, before=None):
    """Best (minimum) wall time and max RSS over ``repeats`` runs; ``before()`` resets state each time."""
    runs = []
    for _ in range(repeats):
        if before is not None:
            before()
        runs.append(measure(cmd, env))
    return {"wall": min(r["wall"] for r in runs), "maxrss_mb": max(r["maxrss_mb"] for r in runs)}


def make_data(root, cases, shape):
    from nnssl.dataset_conversion.btcv import convert_btcv
    from nnssl.dataset_conversion.synthetic import write_synthetic_btcv
    from nnssl.dataset_conversion.unlabeled import convert_unlabeled

    src = write_synthetic_btcv(os.path.join(root, "synthetic"), cases=cases, test_cases=1, unlabeled=cases,
                               shape=tuple(shape))
    convert_btcv(src["raw_data"], dataset_id=1, progress=False)
    convert_unlabeled(src["unlabeled"], dataset_id=2, progress=False)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=12, help="labeled training cases (and as many unlabeled volumes)")
    p.add_argument("--shape", type=int, nargs=3, default=(48, 128, 128), help="phantom shape Z Y X")
    p.add_argument("--np", type=int, default=2, help="worker processes for (a)")
    p.add_argument("--repeats", type=int, default=2, help="runs per measurement (the best is reported)")
    args = p.parse_args()

    root = tempfile.mkdtemp(prefix="bench_pp_")
    env = {**os.environ, "nnUNet_raw": os.path.join(root, "raw"), "nnUNet_results": os.path.join(root, "results"),
           "nnUNet_n_proc_DA": "1"}
    pp = {k: os.path.join(root, f"pp_{k}") for k in ("nnssl", "nnunet")}
    try:
        os.environ.update(env, nnUNet_preprocessed=pp["nnssl"])
        make_data(root, args.cases, args.shape)
        env_of = {k: {**env, "nnUNet_preprocessed": v} for k, v in pp.items()}

        def wipe(k):
            return lambda: shutil.rmtree(pp[k], ignore_errors=True)

        np_ = str(args.np)
        a_nnunet = best(["nnUNetv2_plan_and_preprocess", "-d", "1", "-c", "3d_fullres", "-np", np_],
                        env_of["nnunet"], args.repeats, wipe("nnunet"))
        a_nnssl = best(["nnssl_plan_and_preprocess", "-d", "1", "-np", np_, "--no_pbar"],
                       env_of["nnssl"], args.repeats, wipe("nnssl"))

        def wipe_pretraining():
            folder = os.path.join(pp["nnssl"], "Dataset001_BTCV")
            for d in os.listdir(folder):  # the data folder and its signature file
                path = os.path.join(folder, d)
                if d.startswith("nnsslPretrain__") and os.path.isdir(path):
                    shutil.rmtree(path)
                elif d.startswith("nnsslPretrain__"):
                    os.remove(path)

        b_nnunet = best(["nnUNetv2_preprocess", "-d", "1", "-c", "3d_fullres", "-np", "1"], env_of["nnunet"],
                        args.repeats)  # it deletes and rewrites its output folder itself
        b_nnssl = best(["nnssl_plan_and_preprocess", "-d", "1", "-pd", "2", "--part", "0", "--total_parts", "1",
                        "-np", "1", "--no_pbar"], env_of["nnssl"], args.repeats, wipe_pretraining)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n = args.cases
    tp_nnunet, tp_nnssl = n / b_nnunet["wall"], n / b_nnssl["wall"]
    rows = [
        ("(a) plan+preprocess wall [s]", a_nnssl["wall"], a_nnunet["wall"], a_nnssl["wall"] / a_nnunet["wall"],
         "<= 1.10"),
        ("(b) throughput [cases/s], -np 1", tp_nnssl, tp_nnunet, tp_nnssl / tp_nnunet, ">= 0.90"),
        ("(b) peak RSS per process [MB]", b_nnssl["maxrss_mb"], b_nnunet["maxrss_mb"],
         b_nnssl["maxrss_mb"] / b_nnunet["maxrss_mb"], "<= 1.50"),
    ]
    print(f"\n{n} labeled + {n} unlabeled cases of shape {tuple(args.shape)}, (a) with -np {args.np}, "
          f"best of {args.repeats}; (b) nnssl = unlabeled -pd, nnU-Net = labeled nnUNetv2_preprocess")
    print(f"{'measure':34s} {'nnssl':>10s} {'nnU-Net':>10s} {'ratio':>7s}  target")
    for name, ours, theirs, ratio, target in rows:
        print(f"{name:34s} {ours:10.2f} {theirs:10.2f} {ratio:7.2f}  {target}")


if __name__ == "__main__":
    main()
