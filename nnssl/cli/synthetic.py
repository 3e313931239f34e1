"""nnssl_synthetic: write a synthetic BTCV-like dataset (original BTCV layout + unlabeled volumes)."""
import argparse
import sys

from nnssl.cli._common import NnsslArgumentParser, run_command
from nnssl.dataset_conversion.phantom import DEFAULT_SHAPE


def _run(args: argparse.Namespace) -> None:
    from nnssl.dataset_conversion.synthetic import write_synthetic_btcv

    out = write_synthetic_btcv(args.output_folder, cases=args.cases, test_cases=args.test_cases,
                               unlabeled=args.unlabeled, seed=args.seed, shape=tuple(args.shape),
                               unlabeled_fov_scale=args.unlabeled_fov_scale)
    print(f"BTCV layout: {out['raw_data']}\nunlabeled volumes: {out['unlabeled']}\n"
          f"test-case labels: {out['testing_labels']}")


def build_parser() -> argparse.ArgumentParser:
    p = NnsslArgumentParser(
        prog="nnssl_synthetic",
        description="Write synthetic BTCV-like abdominal CT phantoms (13 organs, BTCV label ids) in the original "
                    "BTCV folder layout (RawData/Training/{img,label}, RawData/Testing/img) plus a folder of "
                    "unlabeled volumes. Deterministic for a given seed; rerunning with the same flags resumes.")
    p.add_argument("-o", "--output_folder", required=True,
                   help="Folder to write into (created if needed; must be empty or an earlier nnssl_synthetic "
                        "output made with the same flags).")
    p.add_argument("--cases", type=int, default=6, help="Number of labeled training cases (default 6).")
    p.add_argument("--test_cases", type=int, default=2,
                   help="Number of test cases in RawData/Testing/img, numbered after the training cases; their "
                        "labels go to TestingLabels/ (default 2).")
    p.add_argument("--unlabeled", type=int, default=8, help="Number of unlabeled volumes in Unlabeled/ (default 8).")
    p.add_argument("--seed", type=int, default=0, help="Master random seed, a non-negative integer (default 0).")
    p.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("Z", "Y", "X"),
                   help=f"Volume size in voxels, slices first (default {' '.join(map(str, DEFAULT_SHAPE))}).")
    p.add_argument("--unlabeled_fov_scale", type=float, default=1.0,
                   help="Field of view of the unlabeled volumes relative to the labeled ones: >1 shows more "
                        "surroundings (body smaller, coarser spacing), <1 crops into the body (default 1).")
    return p


def main(argv=None) -> None:
    sys.exit(run_command(build_parser(), _run, argv))
