"""Foundation-model mode at scale (issue 13).

(a) Pretraining start-up on a large pool: wall time and peak memory (max RSS) of a 1-iteration
    ``nnssl_pretrain`` on a generically planned pool of 1k and of 10k preprocessed volumes
    (tiny volumes: the pool's few planned cases copied under new names, so only the pool
    *size* differs). Target: 10k ÷ 1k ≤ 1.2 for both.
(b) Generic preprocessing throughput (``nnssl_plan_and_preprocess --generic``, whole command)
    ÷ ``nnUNetv2_plan_and_preprocess`` on the same images (labeled copy), ``-np 1``, cases per
    second of the whole command (target ≥ 0.9).

Run: ``python benchmarks/bench_foundation.py [--pools 1000 10000] [--cases 8] [--shape 32 64 64]``.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_plan_and_preprocess import best  # noqa: E402  (same wrapper: wall time + max RSS of a command)

POOL = "Dataset002_CTUnlabeled"


def make_data(root, cases, shape):
    from nnssl.dataset_conversion.btcv import convert_btcv
    from nnssl.dataset_conversion.synthetic import write_synthetic_btcv
    from nnssl.dataset_conversion.unlabeled import convert_unlabeled

    src = write_synthetic_btcv(os.path.join(root, "synthetic"), cases=cases, test_cases=1, unlabeled=cases,
                               shape=tuple(shape))
    convert_btcv(src["raw_data"], dataset_id=1, progress=False)
    convert_unlabeled(src["unlabeled"], dataset_id=2, name="CTUnlabeled", progress=False)


def grow_pool(folder, n):
    """Copy the pool's preprocessed cases under new names until it holds ``n`` (manifest updated)."""
    manifest_file = os.path.join(folder, "nnsslPretrain_manifest.json")
    with open(manifest_file, encoding="utf-8") as f:
        manifest = json.load(f)
    seeds = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".pkl"))
    have = len(seeds)
    for i in range(have, n):
        src = seeds[i % len(seeds)]
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
            shutil.copyfile(os.path.join(folder, src + suffix), os.path.join(folder, f"copy{i:06d}{suffix}"))
    manifest.update(num_cases=n, num_expected=n)
    with open(manifest_file, "w", encoding="utf-8") as f:
        json.dump(manifest, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", nargs=2, type=int, default=[1000, 10000])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--shape", nargs=3, type=int, default=[32, 64, 64])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    root = tempfile.mkdtemp(prefix="bench_foundation_")
    env = dict(os.environ, nnUNet_raw=os.path.join(root, "raw"), nnUNet_preprocessed=os.path.join(root, "pp"),
               nnUNet_results=os.path.join(root, "results"), nnUNet_n_proc_DA="1")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(env[var])
    os.environ.update(env)
    make_data(root, args.cases, args.shape)

    def clean_pp(name):
        return lambda: shutil.rmtree(os.path.join(env["nnUNet_preprocessed"], name), ignore_errors=True)

    generic = best([shutil.which("nnssl_plan_and_preprocess"), "-d", POOL, "--generic", "--preset", "tiny",
                    "-np", "1", "--no_pbar"], env, args.repeats, clean_pp(POOL))
    stock = best([shutil.which("nnUNetv2_plan_and_preprocess"), "-d", "1", "-c", "3d_fullres", "-np", "1"], env,
                 args.repeats, clean_pp("Dataset001_BTCV"))
    # the generic pool is planned last so that it is there for (a)
    clean_pp(POOL)()
    best([shutil.which("nnssl_plan_and_preprocess"), "-d", POOL, "--generic", "--preset", "tiny", "-np", "1",
          "--no_pbar"], env, 1)
    folder = os.path.join(env["nnUNet_preprocessed"], POOL, "nnsslPretrain__intask__nnUNetPlans_3d_fullres")
    startup = {}
    for n in sorted(args.pools):
        grow_pool(folder, n)
        startup[n] = best([shutil.which("nnssl_pretrain"), "-d", POOL, "-m", "volume_fusion", "--iterations", "1",
                           "--iterations_per_epoch", "1", "--batch_size", "2", "-device", "cpu", "--num_workers", "0",
                           "-o", os.path.join(root, f"pretrain_{n}")], env, args.repeats,
                          lambda n=n: shutil.rmtree(os.path.join(root, f"pretrain_{n}"), ignore_errors=True))

    small, large = sorted(args.pools)
    print(f"(a) 1-iteration pretraining on a pool of {small} vs {large} volumes (tiny plainconvunet, best of "
          f"{args.repeats}):")
    for n in (small, large):
        print(f"    {n:6d} volumes: {startup[n]['wall']:.2f} s, peak RSS {startup[n]['maxrss_mb']:.0f} MiB")
    print(f"    ratio {large}/{small}: time {startup[large]['wall'] / startup[small]['wall']:.3f}, "
          f"RSS {startup[large]['maxrss_mb'] / startup[small]['maxrss_mb']:.3f} (target <= 1.2)")
    print(f"(b) {args.cases} cases {tuple(args.shape)}, -np 1, whole command (fingerprint + plan + preprocess):")
    print(f"    nnssl --generic: {generic['wall']:.2f} s ({args.cases / generic['wall']:.2f} cases/s); "
          f"nnUNetv2_plan_and_preprocess: {stock['wall']:.2f} s ({args.cases / stock['wall']:.2f} cases/s)")
    print(f"    throughput ratio nnssl / nnU-Net: {stock['wall'] / generic['wall']:.3f} (target >= 0.9)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
