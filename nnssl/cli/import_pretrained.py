"""nnssl_import_pretrained: turn a foreign pretrained file into an nnssl model archive."""
import argparse
import json
import sys

from nnssl.cli._common import NnsslArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    from nnssl.checkpoints.foreign import FORMATS

    p = NnsslArgumentParser(
        prog="nnssl_import_pretrained",
        description="Write a model archive (.zip) of a published pretrained model in another project's layout, "
                    "with a model card saying where it came from (file, sha256, format, citation). nnssl_train "
                    "-pretrained and nnssl_plan_and_preprocess --like take the foreign file directly too; the "
                    "archive makes it shareable and tamper-evident. Formats: " +
                    "; ".join(f"{n}: {f.description}" for n, f in sorted(FORMATS.items())))
    p.add_argument("file", help="the pretrained file (.pth / .pt)")
    p.add_argument("--format", default=None, choices=sorted(FORMATS),
                   help="read the file as this format (default: recognised by its layout)")
    p.add_argument("-o", required=True, metavar="MODEL.zip", help="the archive to write (atomically)")
    p.add_argument("--license", default="unspecified", metavar="SPDX",
                   help="the license of the weights for the model card (default: unspecified; check the "
                        "publisher's terms)")
    return p


def _run(args) -> None:
    import os

    from nnssl.checkpoints.publish import import_pretrained
    from nnssl.io import check_writable

    check_writable(os.path.dirname(os.path.abspath(args.o)), "The folder of the archive (-o)")
    card = import_pretrained(args.file, args.o, format=args.format, license=args.license)
    print(json.dumps(card, indent=2))
    print(f"Wrote {args.o}")


def main(argv=None):
    sys.exit(run_command(build_parser(), _run, argv))


if __name__ == "__main__":
    main()
