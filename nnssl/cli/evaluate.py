"""nnssl_evaluate: nnU-Net's summary.json for a prediction folder, plus HD95 and ASSD per class."""
import argparse
import os
import sys

from nnssl.cli._common import NnsslArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    p = NnsslArgumentParser(
        prog="nnssl_evaluate",
        description="Compare predicted segmentations with reference labels. Writes nnU-Net's summary.json "
                    "(Dice, IoU per case and class, their means) extended with HD95 and ASSD in mm per class "
                    "(mean ± std over cases and the number of cases where they are undefined because exactly "
                    "one of prediction/reference is empty). Predictions and references are matched by file "
                    "name; nnU-Net tools still read the result.")
    p.add_argument("-ref", required=True, metavar="LABELS",
                   help="folder with the reference segmentations, e.g. $nnUNet_raw/Dataset001_BTCV/labelsTr")
    p.add_argument("-pred", required=True, metavar="PRED",
                   help="folder with the predicted segmentations (what nnssl_predict / nnUNetv2_predict wrote)")
    p.add_argument("-d", required=True, metavar="DATASET",
                   help="the dataset: ID (1), full name (Dataset001_BTCV) or short name (BTCV); its dataset.json "
                        "(labels, file ending) is read from nnUNet_raw, else nnUNet_preprocessed. A path to a "
                        "dataset.json file is accepted too")
    p.add_argument("-o", default=None, metavar="SUMMARY.json",
                   help="output file (default: PRED/summary.json); written atomically")
    p.add_argument("-np", type=int, default=1, metavar="N",
                   help="number of worker processes (default: 1)")
    p.add_argument("--ignore_extra", action="store_true",
                   help="evaluate only the predictions that have a reference, instead of stopping when the "
                        "prediction folder holds extra cases")
    return p


def _run(args) -> None:
    from nnssl.evaluation.evaluate import evaluate_folder, format_summary, label_names, load_dataset_json

    dj = load_dataset_json(args.d)
    result = evaluate_folder(args.ref, args.pred, dj, output_file=args.o, num_processes=args.np,
                             ignore_extra=args.ignore_extra)
    print(format_summary(result, label_names(dj)))
    print(f"\nWrote {os.path.abspath(args.o or os.path.join(args.pred, 'summary.json'))}")


def main(argv=None):
    sys.exit(run_command(build_parser(), _run, argv))


if __name__ == "__main__":
    main()
