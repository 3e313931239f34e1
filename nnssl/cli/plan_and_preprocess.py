"""nnssl_plan_and_preprocess: fingerprint, plan per architecture, preprocess labeled and pretraining data."""
import argparse
import sys

from nnssl.cli._common import NnsslArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    p = NnsslArgumentParser(
        prog="nnssl_plan_and_preprocess",
        description="Fingerprint a labeled dataset with nnU-Net, write one plans file per architecture (all "
                    "sharing one preprocessed copy of the data), preprocess the training cases, and optionally "
                    "preprocess unlabeled pretraining data with the target's plans. Rerunning resumes: finished "
                    "cases are skipped.")
    p.add_argument("-d", required=True, metavar="DATASET",
                   help="target (labeled) dataset: ID (1), full name (Dataset001_BTCV) or short name (BTCV)")
    p.add_argument("-a", nargs="+", default=["plainconvunet"], metavar="ARCH",
                   help="architecture(s) to plan, each writes its own plans file (default: plainconvunet, which "
                        "writes nnU-Net's own nnUNetPlans.json)")
    p.add_argument("-pd", nargs="+", default=[], metavar="DATASET",
                   help="pretraining dataset(s) to preprocess with the target's plans (those of the first -a "
                        "architecture): unlabeled datasets (their imagesTr and imagesTs), or 'intask' for the "
                        "target's own imagesTr images without labels (its imagesTs only with --intask_include_test)")
    p.add_argument("--intask_include_test", action="store_true",
                   help="also pretrain on the target's imagesTs (with -pd intask, or the pool's with --generic). "
                        "Warns and is recorded: a model pretrained on the test images has seen them, so its test "
                        "results are not independent of pretraining (LWI and HybridMIM use training images only)")
    p.add_argument("-c", nargs="+", default=["3d_fullres"], metavar="CONFIG",
                   help="configuration(s) to preprocess (default: 3d_fullres; others are still planned)")
    p.add_argument("-np", type=int, default=None, metavar="N",
                   help="number of worker processes for fingerprinting and preprocessing (default: nnU-Net's, "
                        "environment variable nnUNet_def_n_proc)")
    p.add_argument("--part", type=int, default=None, metavar="K",
                   help="preprocess only part K (0-based) of the sorted cases, for cluster arrays; needs "
                        "--total_parts and existing plans (run once with --no_pp first)")
    p.add_argument("--total_parts", type=int, default=None, metavar="N",
                   help="number of parts the cases are split into (with --part)")
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="read every voxel of the raw datasets (finite intensities, valid label values) before "
                        "planning; headers are always checked")
    p.add_argument("--no_pp", action="store_true",
                   help="check, fingerprint and plan only; do not preprocess")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="size preset of the architectures (e.g. 'tiny' for tests and CPU demos); default: the "
                        "full-size networks")
    p.add_argument("-gpu_memory_target", type=float, default=None, metavar="GB",
                   help="GPU memory the planned patch and batch size should fit (default: nnU-Net's 8 GB)")
    p.add_argument("--clean", action="store_true",
                   help="start over: recompute the fingerprint and delete the existing preprocessed data of the "
                        "requested configurations and -pd datasets (not with --part)")
    p.add_argument("--no_pbar", action="store_true", help="no progress bars (for cluster logs)")
    p.add_argument("--verbose", action="store_true",
                   help="also show nnU-Net's plans dictionaries and configuration dumps on the console (they "
                        "are always written to nnUNet_preprocessed/<Dataset>/nnssl_plan_and_preprocess.log)")
    g = p.add_argument_group("foundation models (pretrain once on a pool, fine-tune many tasks)")
    g.add_argument("--generic", action="store_true",
                   help="plan -d (an unlabeled pool; labels, if any, are ignored) on its own: fingerprint over the "
                        "body instead of labels, CT clipped to a fixed HU window, and preprocess its images as its "
                        "own pretraining data; then run nnssl_pretrain -d POOL -m METHOD -a ARCH")
    g.add_argument("--spacing", nargs="+", default=None, metavar="S",
                   help="with --generic: target spacing, three numbers in the axis order nnU-Net reads the images "
                        "in (like nnU-Net's -overwrite_target_spacing), or 'median' (per-axis median of the pool); "
                        "default: nnU-Net's rule")
    g.add_argument("--ct_window", nargs=2, type=float, default=None, metavar=("LOW", "HIGH"),
                   help="with --generic: clip CT to [LOW, HIGH] HU and scale it to [-1, 1] (default: -1000 1000, "
                        "as MIS-FM)")
    g.add_argument("--zscore", action="store_true",
                   help="with --generic: z-score every image instead of a CT window (e.g. MRI pools)")
    g.add_argument("--patch", nargs=3, type=int, default=None, metavar=("Z", "Y", "X"),
                   help="with --generic: fixed patch size (in the plans' axis order); the network and batch size "
                        "are planned for it (default: each architecture's planner chooses)")
    g.add_argument("--patch_fit_fraction", type=float, default=None, metavar="F",
                   help="with --generic: share of the pool's volumes that must hold a whole patch after resampling "
                        "(default 0.9); each patch axis is capped at a low percentile of the volumes' extents, the "
                        "other volumes are listed and padded")
    g.add_argument("--like", default=None, metavar="CHECKPOINT",
                   help="plan the labeled -d like a pretraining checkpoint or model archive (.zip): its spacing, "
                        "normalization, network and patch, batch size re-planned; writes plans "
                        "nnsslLike_<arch>_<sha8> to use with nnssl_train -p ... -pretrained CHECKPOINT")
    return p


def main(argv=None):
    def run(a: argparse.Namespace) -> None:
        import os

        from nnssl.io import check_writable
        from nnssl.planning.api import details_log, plan_and_preprocess, plans_summary
        from nnssl.quiet import details_to_log

        check_writable(os.path.dirname(details_log(a.d)), "The preprocessed dataset folder (under nnUNet_preprocessed)")

        title = "nnssl_plan_and_preprocess " + " ".join(sys.argv[1:] if argv is None else argv)
        with details_to_log(details_log(a.d), a.verbose, title) as log:
            result = plan_and_preprocess(
                a.d, architectures=a.a, pretraining=a.pd, configurations=a.c, num_processes=a.np,
                part=a.part, total_parts=a.total_parts,
                verify_dataset_integrity=a.verify_dataset_integrity, no_pp=a.no_pp, preset=a.preset,
                gpu_memory_target=a.gpu_memory_target, clean=a.clean, show_progress=not a.no_pbar,
                generic=a.generic, spacing=a.spacing, ct_window=a.ct_window, zscore=a.zscore,
                patch=a.patch, like=a.like, intask_include_test=a.intask_include_test,
                patch_fit_fraction=a.patch_fit_fraction)
        for plans_file in dict.fromkeys((result or {}).get("plans", {}).values()):
            print("\n".join(plans_summary(plans_file)))
        if not a.verbose:
            print(f"nnU-Net's plans and configuration details: {log} (--verbose shows them here)")

    sys.exit(run_command(build_parser(), run, argv))
