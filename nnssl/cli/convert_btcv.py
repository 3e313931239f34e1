"""nnssl_convert_btcv: BTCV original layout -> nnU-Net raw dataset (argument parsing only)."""
import argparse
import sys

from nnssl.cli._common import NnsslArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    p = NnsslArgumentParser(
        prog="nnssl_convert_btcv",
        description="Convert the BTCV abdomen dataset from its original layout (RawData/Training/img/img0001.nii.gz, "
                    "RawData/Training/label/label0001.nii.gz, RawData/Testing/img/img0061.nii.gz) into an nnU-Net "
                    "raw dataset $nnUNet_raw/DatasetXXX_BTCV with 13 organ labels. Every case is checked first; "
                    "the input is never modified.")
    p.add_argument("-i", "--input", required=True,
                   help="the BTCV RawData folder (the folder that contains Training/ and optionally Testing/)")
    p.add_argument("-d", "--dataset_id", type=int, default=None,
                   help="dataset ID 1-999 (default: the ID of an existing dataset with this name, else the lowest "
                        "free ID)")
    p.add_argument("--name", default="BTCV", help="dataset short name; output is DatasetXXX_NAME (default: BTCV)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DatasetXXX_NAME folder (it is swapped out only after the new one is "
                        "complete)")
    return p


def main(argv=None):
    from nnssl.dataset_conversion.btcv import convert_btcv

    def run(a):
        out = convert_btcv(a.input, dataset_id=a.dataset_id, name=a.name, overwrite=a.overwrite)
        print(f"Wrote {out}")

    sys.exit(run_command(build_parser(), run, argv))
