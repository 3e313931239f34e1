"""nnssl_plan_and_preprocess: fingerprint, plan per architecture, preprocess labeled and pretraining data."""
import argparse
import sys

from nnssl.cli._common import run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
                        "architecture): unlabeled datasets (imagesTr only), or 'intask' for the target's own "
                        "imagesTr + imagesTs images without labels")
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
    return p


def main(argv=None):
    def run(a: argparse.Namespace) -> None:
        from nnssl.planning.api import plan_and_preprocess

        plan_and_preprocess(a.d, architectures=a.a, pretraining=a.pd, configurations=a.c, num_processes=a.np,
                            part=a.part, total_parts=a.total_parts,
                            verify_dataset_integrity=a.verify_dataset_integrity, no_pp=a.no_pp, preset=a.preset,
                            gpu_memory_target=a.gpu_memory_target, clean=a.clean, show_progress=not a.no_pbar)

    sys.exit(run_command(build_parser(), run, argv))
