"""nnssl_demo: the whole pipeline on synthetic data (the embedded default)."""
import argparse
import os
import sys

from nnssl.cli._common import NnsslArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    p = NnsslArgumentParser(
        prog="nnssl_demo",
        description="Run nnssl end to end on synthetic BTCV-like data: generate, convert, plan and "
                    "preprocess (labeled + unlabeled), Volume Fusion pretraining (pretext.png), fine-tuning from the "
                    "checkpoint and from scratch with the short-budget recipe (nnsslTrainer_Short), prediction, "
                    "evaluation and a comparison report with learning curves (report.png). Uses its "
                    "own nnU-Net folders under -o; rerunning resumes where it stopped.")
    p.add_argument("-o", "--output", default="nnssl_demo",
                   help="folder for all demo data and results (default: ./nnssl_demo)")
    p.add_argument("--verbose", action="store_true",
                   help="also show nnU-Net's plans dictionaries, configuration dumps and predictor messages on the "
                        "console (they always go to OUTPUT/nnunet_details.log)")
    p.add_argument("--fast", action="store_true", help="fewer, smaller cases and tiny budgets: a ~2 minute smoke run (results are not meaningful)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic data, the pretraining and both fine-tuning runs (each run starts "
                        "from this seed, so scratch and pretrained see the same batches; the same seed prints the "
                        "same Dice). Default: 0")
    return p


def main(argv=None):
    def run(a):
        from nnssl.demo import run_demo
        from nnssl.quiet import details_to_log

        # an -o that is a file is refused by run_demo; no log then
        log = None if os.path.isfile(a.output) else os.path.join(a.output, "nnunet_details.log")
        with details_to_log(log, a.verbose, "nnssl_demo"):
            run_demo(a.output, fast=a.fast, seed=a.seed)
        if log and not a.verbose:
            print(f"nnU-Net's plans, configuration and predictor details: {log} (--verbose shows them here)")

    sys.exit(run_command(build_parser(), run, argv))


if __name__ == "__main__":
    main()
