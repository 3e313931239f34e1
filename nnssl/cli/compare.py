"""nnssl_compare: a side-by-side report (markdown, CSV, plot) of evaluated runs."""
import argparse
import sys

from nnssl.cli._common import NnsslArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    p = NnsslArgumentParser(
        prog="nnssl_compare",
        description="Compare evaluated runs, e.g. fine-tuning from scratch versus from each pretraining. "
                    "Writes REPORT.md (a table of mean Dice/HD95/ASSD ± std per run and a per-class Dice "
                    "table), REPORT.csv (the same numbers, one row per run and class plus a mean row), "
                    "REPORT.png and REPORT.svg (mean Dice, HD95/ASSD, per-class Dice heat map and, where the "
                    "training's fold folder is found, learning curves against iterations), and prints the "
                    "tables. Rows keep the order of the arguments.")
    p.add_argument("result_folders", nargs="+", metavar="RESULT_FOLDER",
                   help="a folder holding a summary.json written by nnssl_evaluate (or the summary.json "
                        "itself). An nnssl_run.json beside it with label/architecture/method/pretraining_data "
                        "names the run (its fold_dir, the training's fold folder, gives the learning curves); "
                        "otherwise the folder name is used and the other fields read 'unknown'")
    p.add_argument("-o", required=True, metavar="REPORT",
                   help="output path without extension, e.g. results/comparison -> results/comparison.md, "
                        ".csv, .png and .svg (written atomically)")
    return p


def _run(args) -> None:
    from nnssl.evaluation.compare import compare_runs

    out = compare_runs(args.result_folders, args.o)
    print(out["markdown"])
    print(f"Wrote {out['md']}, {out['csv']}, {out['png']} and {out['svg']} (the same figure as vector graphics)")


def main(argv=None):
    sys.exit(run_command(build_parser(), _run, argv))


if __name__ == "__main__":
    main()
