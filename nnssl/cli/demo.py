"""nnssl_demo: the whole pipeline on synthetic data (the embedded default)."""
import argparse
import sys

from nnssl.cli._common import run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnssl_demo",
        description="Run nnssl end to end on synthetic BTCV-like data: generate, convert, plan and "
                    "preprocess (and, as the pipeline grows, pretrain, fine-tune, predict, evaluate). "
                    "Uses its own nnU-Net folders under -o; rerunning resumes.")
    p.add_argument("-o", "--output", default="nnssl_demo",
                   help="folder for all demo data and results (default: ./nnssl_demo)")
    p.add_argument("--fast", action="store_true", help="fewer and smaller cases: a ~2 minute smoke run")
    return p


def main(argv=None):
    from nnssl.demo import run_demo
    sys.exit(run_command(build_parser(), lambda a: run_demo(a.output, fast=a.fast), argv))


if __name__ == "__main__":
    main()
