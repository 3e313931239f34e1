"""nnssl_convert_unlabeled: a folder of volumes / DICOM series -> unlabeled nnU-Net raw dataset."""
import argparse
import sys

from nnssl.cli._common import NnsslArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    p = NnsslArgumentParser(
        prog="nnssl_convert_unlabeled",
        description="Convert every volume under a folder (recursively: .nii, .nii.gz, .nrrd, .mha, .mhd files and "
                    "DICOM series, one volume per series) into an unlabeled nnU-Net raw dataset "
                    "$nnUNet_raw/DatasetXXX_NAME with imagesTr/NAME_0001_0000.nii.gz, ... (numbered in sorted source "
                    "order), a dataset.json marked \"nnssl_unlabeled\": true, and conversion_log.json mapping each "
                    "output to its source. Every volume is checked first; the input is never modified.")
    p.add_argument("-i", "--input", required=True, help="folder holding the volumes (searched recursively)")
    p.add_argument("-d", "--dataset_id", type=int, default=None,
                   help="dataset ID 1-999 (default: the ID of an existing dataset with this name, else the lowest "
                        "free ID)")
    p.add_argument("--name", required=True, help="dataset short name; output is DatasetXXX_NAME")
    p.add_argument("--channel_name", default="CT",
                   help="channel name in dataset.json; nnU-Net picks the normalization from it (default: CT)")
    p.add_argument("--skip_bad", action="store_true",
                   help="leave out volumes that fail the checks (listed with the reason under 'skipped' in "
                        "conversion_log.json) instead of stopping with an error")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DatasetXXX_NAME folder (it is swapped out only after the new one is "
                        "complete)")
    return p


def main(argv=None):
    from nnssl.dataset_conversion.unlabeled import convert_unlabeled

    def run(a):
        out = convert_unlabeled(a.input, dataset_id=a.dataset_id, name=a.name, channel_name=a.channel_name,
                                skip_bad=a.skip_bad, overwrite=a.overwrite)
        print(f"Wrote {out}")

    sys.exit(run_command(build_parser(), run, argv))
