"""nnssl_benchmark_ssl: does SSL pretraining help on this dataset? (see nnssl/benchmark/)."""
import argparse
import sys

from nnssl.cli._common import NnsslArgumentParser, run_command
from nnssl.errors import NnsslError

# --quick sets these (command-line dest -> value); giving one of them as well is refused.
QUICK = dict(seeds=[0], n_labeled=[1], data=["pool"], pretrain_iterations=4, iterations=4, iterations_per_epoch=2,
             labeled_pool=1, val_cases=1, test_cases=1, unlabeled=2, shape=[16, 32, 32])
_GIVEN = object()


def build_parser() -> argparse.ArgumentParser:
    from nnssl.benchmark.settings import BenchmarkSettings as B

    p = NnsslArgumentParser(
        prog="nnssl_benchmark_ssl",
        description="Does SSL pretraining help, and by more than the seed-to-seed noise? For every method (default: "
                    "every registered one), pretraining data (in-task / separate pool) and label budget, fine-tunes "
                    "from scratch and from the pretrained checkpoint with the same recipe and budget over several "
                    "seeds, and reports test Dice, the paired difference with its 95 % confidence interval, a "
                    "Holm-corrected verdict and iterations to a validation Dice. Writes results.md/.csv/.png, "
                    "settings.json and command.txt under -o; rerunning the same command resumes.")
    p.add_argument("-d", "--dataset", default=None,
                   help="labeled dataset in $nnUNet_raw (name or ID; only read). Default: synthetic phantoms.")
    p.add_argument("--pool", default=None, help="unlabeled dataset in $nnUNet_raw for --data pool (with -d)")
    p.add_argument("-m", "--methods", nargs="+", default=None, help="SSL methods (default: every registered method "
                   "that runs on the architectures)")
    p.add_argument("-a", "--architectures", nargs="+", default=list(B.architectures))
    p.add_argument("--seeds", type=int, nargs="+", default=list(B.seeds), help="at least 3 for a verdict")
    p.add_argument("--n_labeled", type=int, nargs="+", default=list(B.n_labeled), help="label budgets (cases)")
    p.add_argument("--data", nargs="+", default=list(B.data), choices=["intask", "pool"],
                   help="pretraining data: the labeled pool's own images and/or a separate unlabeled set")
    p.add_argument("--pretrain_iterations", type=int, default=B.pretrain_iterations)
    p.add_argument("--pretrain_batch_size", type=int, default=B.pretrain_batch_size)
    p.add_argument("--pretrain_per_seed", action="store_true",
                   help="pretrain once per seed (seed s for the fine-tuning runs of seed s) instead of once per "
                        "method and data, so that the verdict includes the pretraining's run-to-run spread")
    p.add_argument("--iterations", type=int, default=B.finetune_iterations, help="fine-tuning iterations per run")
    p.add_argument("--iterations_per_epoch", type=int, default=B.iterations_per_epoch)
    p.add_argument("--val_iterations", type=int, default=B.val_iterations,
                   help="validation batches per epoch (the per-epoch pseudo Dice of 'iterations to threshold'); "
                        "default measured in benchmarks/results/val_iterations/")
    p.add_argument("--equal_budget", action="store_true",
                   help="also train scratch for --iterations + --pretrain_iterations and compare every pretrained "
                        "run with it: the same total number of iterations (LWI Table VII); adds runs to a finished "
                        "benchmark")
    p.add_argument("--threshold", type=float, default=B.threshold,
                   help="validation pseudo Dice for 'iterations to threshold'")
    p.add_argument("-tr", "--trainer", default=B.trainer, help="fine-tuning trainer (same for every run)")
    p.add_argument("--preset", default=B.preset, help="network size preset for planning")
    p.add_argument("--labeled_pool", type=int, default=B.labeled_pool, help="synthetic: labeled training cases")
    p.add_argument("--val_cases", type=int, default=B.val_cases)
    p.add_argument("--test_cases", type=int, default=B.test_cases)
    p.add_argument("--unlabeled", type=int, default=B.unlabeled, help="synthetic: unlabeled pool volumes")
    p.add_argument("--shape", type=int, nargs=3, default=list(B.shape), help="synthetic volume shape Z Y X")
    p.add_argument("--set", dest="method_overrides", action="append", default=[],
                   help="pretraining config override METHOD.key=value (repeatable)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: one seed, one tiny case, a few iterations (sets " + ", ".join(
                       "--" + k for k in QUICK) + "; giving one of these as well is refused)")
    p.add_argument("-o", "--output", default="nnssl_benchmark_ssl",
                   help="output folder, e.g. benchmarks/results/<name> (default: ./nnssl_benchmark_ssl)")
    return p


def given_with_quick(argv) -> list:
    """The options --quick replaces that were given on the command line as well."""
    p = build_parser()
    p.set_defaults(**{k: _GIVEN for k in QUICK})
    a = p.parse_args(argv)
    return [k for k in QUICK if getattr(a, k) is not _GIVEN]


def settings_from_args(a):
    from nnssl.benchmark.settings import BenchmarkSettings

    if a.quick:
        vars(a).update(QUICK)
    return BenchmarkSettings(
        dataset=a.dataset, pool_dataset=a.pool, methods=tuple(a.methods or ()),
        architectures=tuple(a.architectures), seeds=tuple(a.seeds), n_labeled=tuple(a.n_labeled),
        data=tuple(a.data), pretrain_iterations=a.pretrain_iterations, pretrain_batch_size=a.pretrain_batch_size,
        pretrain_per_seed=a.pretrain_per_seed, finetune_iterations=a.iterations,
        iterations_per_epoch=a.iterations_per_epoch, val_iterations=a.val_iterations, equal_budget=a.equal_budget,
        threshold=a.threshold, trainer=a.trainer, preset=a.preset, labeled_pool=a.labeled_pool,
        val_cases=a.val_cases, test_cases=a.test_cases, unlabeled=a.unlabeled, shape=tuple(a.shape),
        method_overrides=tuple(a.method_overrides))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)

    def _run(a):
        from nnssl.benchmark.runs import run_benchmark

        if a.quick:
            clash = given_with_quick(argv)
            if clash:
                raise NnsslError(f"--quick sets {', '.join('--' + k for k in clash)} itself; drop "
                                 f"{'it' if len(clash) == 1 else 'them'}, or drop --quick and give every option.")
        report = run_benchmark(settings_from_args(a), a.output, command=["nnssl_benchmark_ssl"] + argv)
        print("\n" + report["markdown"])
        print(f"Results: {report['out_dir']}/results.md, results.csv, results.png, settings.json, command.txt")

    sys.exit(run_command(build_parser(), _run, argv))


if __name__ == "__main__":
    main()
