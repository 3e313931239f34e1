"""nnssl_show_pretext: PNG mosaic of a pretext batch (argument parsing only)."""
import argparse
import sys

from nnssl.cli._common import NnsslArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    import nnssl.architectures  # noqa: F401  (registries provide the choices listed in --help)
    import nnssl.ssl  # noqa: F401
    from nnssl.architectures.spec import ARCHITECTURES
    from nnssl.ssl.base import METHODS

    p = NnsslArgumentParser(
        prog="nnssl_show_pretext",
        description="Draw one pretraining batch with the same loader nnssl_pretrain uses and write a PNG mosaic of "
                    "what the pretext task shows the network (inputs, masks, targets of sample 0): for each "
                    "volume its middle axial and middle coronal slice.")
    p.add_argument("-d", "--dataset", required=True,
                   help="target dataset (ID, full or short name), as for nnssl_pretrain")
    p.add_argument("-m", "--method", required=True, help=f"SSL method: {', '.join(METHODS.names())}")
    p.add_argument("-a", "--architecture", default="plainconvunet",
                   help=f"architecture whose plans set the crop size: {', '.join(ARCHITECTURES.names())} "
                        f"(default: plainconvunet)")
    p.add_argument("-pd", "--pretraining_data", default="intask",
                   help="pretraining data: 'intask' (default) or an unlabeled dataset preprocessed with -pd")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="plans configuration (default: 3d_fullres)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override method settings, as for nnssl_pretrain")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0): the mosaic shows batch 0 of this seed")
    p.add_argument("--batch_size", type=int, default=None,
                   help="batch size of the drawn batch (default: the method's batch_size setting)")
    p.add_argument("-o", "--output", required=True, help="output PNG file")
    return p


def main(argv=None):
    def run(a):
        from nnssl.training.pretext_preview import show_pretext

        path = show_pretext(a.dataset, a.method, a.output, a.architecture, a.pretraining_data, a.configuration,
                            a.overrides, a.seed, a.batch_size)
        print(f"Wrote {path}")

    sys.exit(run_command(build_parser(), run, argv))


if __name__ == "__main__":  # entry point for `python -m nnssl.cli.show_pretext`
    main()
