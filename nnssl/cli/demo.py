"""nnssl_demo: the whole pipeline on synthetic data (the embedded default)."""
import argparse
import sys

from nnssl.cli._common import run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnssl_demo",
        description="Run nnssl end to end on synthetic BTCV-like data: generate, convert, plan and "
                    "preprocess (labeled + unlabeled), Volume Fusion pretraining, fine-tuning from the "
                    "checkpoint and from scratch, prediction, evaluation and a comparison report. Uses its "
                    "own nnU-Net folders under -o; rerunning resumes where it stopped.")
    p.add_argument("-o", "--output", default="nnssl_demo",
                   help="folder for all demo data and results (default: ./nnssl_demo)")
    p.add_argument("--fast", action="store_true", help="fewer, smaller cases and tiny budgets: a ~2 minute smoke run (results are not meaningful)")
    return p


def main(argv=None):
    from nnssl.demo import run_demo
    sys.exit(run_command(build_parser(), lambda a: run_demo(a.output, fast=a.fast), argv))


if __name__ == "__main__":
    main()
