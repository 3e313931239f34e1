"""nnssl_export_pretrained: pack a pretraining checkpoint into a shareable model archive."""
import argparse
import json
import sys

from nnssl.cli._common import NnsslArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    p = NnsslArgumentParser(
        prog="nnssl_export_pretrained",
        description="Write a model archive (.zip) of a pretraining checkpoint: the checkpoint (without its resume "
                    "state), its metadata, the plans it was pretrained under and a model card (method, "
                    "architecture, data and volume count, iterations, sha256). Every nnssl command that takes a "
                    "checkpoint (nnssl_train -pretrained, nnssl_plan_and_preprocess --like) takes the archive too; "
                    "a modified archive is refused.")
    p.add_argument("checkpoint", help="a checkpoint_final.pth written by nnssl_pretrain")
    p.add_argument("-o", required=True, metavar="MODEL.zip", help="the archive to write (atomically; .pth with "
                                                                   "--format nnunet)")
    p.add_argument("--license", default="unspecified", metavar="SPDX",
                   help="the license of the weights for the model card, e.g. CC-BY-4.0 (default: unspecified; the "
                        "terms usually follow the pretraining data's)")
    p.add_argument("--format", default=None, choices=["nnunet"],
                   help="nnunet: write -o MODEL.pth, the checkpoint with an nnssl_adaptation_plan that nnU-Net "
                        "master's nnUNetv2_preprocess_like_nnssl -pc and nnUNetv2_train_pretrained take "
                        "(plainconvunet, resenc, resenc_l); the .zip archive carries that plan too")
    return p


def _run(args) -> None:
    import os

    from nnssl.checkpoints import export_pretrained
    from nnssl.io import check_writable

    check_writable(os.path.dirname(os.path.abspath(args.o)), "The folder of the archive (-o)")

    card = export_pretrained(args.checkpoint, args.o, license=args.license, format=args.format)
    print(json.dumps(card, indent=2))
    print(f"Wrote {args.o}")


def main(argv=None):
    sys.exit(run_command(build_parser(), _run, argv))


if __name__ == "__main__":
    main()
