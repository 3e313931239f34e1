"""nnssl_convert_msd: Medical Segmentation Decathlon task -> nnU-Net raw dataset (argument parsing only)."""
import argparse
import sys

from nnssl.cli._common import NnsslArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    p = NnsslArgumentParser(
        prog="nnssl_convert_msd",
        description="Convert a Medical Segmentation Decathlon task folder (TaskXX_Name with imagesTr, labelsTr, "
                    "imagesTs and the MSD dataset.json; multi-modal images are 4D) into an nnU-Net raw dataset "
                    "$nnUNet_raw/DatasetXXX_Name using nnU-Net's converter. Every case is checked first; the input "
                    "is never modified.")
    p.add_argument("-i", "--input", required=True, help="the extracted MSD task folder, e.g. Task05_Prostate")
    p.add_argument("-d", "--dataset_id", type=int, default=None,
                   help="dataset ID 1-999 (default: the MSD task number, as nnU-Net does)")
    p.add_argument("-np", "--num_processes", type=int, default=1,
                   help="processes nnU-Net's converter uses to split 4D images (default: 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DatasetXXX_Name folder (it is swapped out only after the new one is "
                        "complete)")
    return p


def main(argv=None):
    from nnssl.dataset_conversion.msd import convert_msd

    def run(a):
        out = convert_msd(a.input, dataset_id=a.dataset_id, overwrite=a.overwrite, num_processes=a.num_processes)
        print(f"Wrote {out}")

    sys.exit(run_command(build_parser(), run, argv))
