"""nnssl_predict: segment a folder of images with a trained model (nnU-Net's predictor)."""
import argparse
import sys

from nnssl.cli._common import NnsslArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    p = NnsslArgumentParser(
        prog="nnssl_predict",
        description="Predict segmentations with nnU-Net's nnUNetPredictor (sliding window, Gaussian weighting, "
                    "optional mirroring). The output folder is what nnUNetv2_predict writes: one segmentation per "
                    "case with the input's geometry plus plans.json, dataset.json and "
                    "predict_from_raw_data_args.json.")
    p.add_argument("-i", dest="input", required=True,
                   help="input folder with CASE_XXXX<ending> files (XXXX = channel index, as in imagesTs)")
    p.add_argument("-o", dest="output", required=True, help="output folder (created if missing)")
    p.add_argument("-d", dest="dataset", required=True,
                   help="dataset the model was trained on: ID, full name or short name")
    p.add_argument("-c", dest="configuration", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-f", dest="folds", nargs="+", required=True,
                   help="folds whose models are ensembled, e.g. -f 0, -f 0 1 2 3 4, or -f all")
    p.add_argument("-a", dest="architecture", default=None,
                   help="architecture (default: plainconvunet, or the one whose plans -p names)")
    p.add_argument("-tr", dest="trainer", default=None, help="trainer class name used for training "
                                                             "(default: the architecture's trainer)")
    p.add_argument("-p", dest="plans", default=None, help="plans identifier (default: the architecture's plans)")
    p.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth",
                   help="checkpoint file name in each fold folder (default: checkpoint_final.pth)")
    p.add_argument("-device", default=None, choices=["cpu", "cuda", "mps"],
                   help="device (default: cuda when available, else cpu); mps: Apple GPUs, where this torch build has MPS, else refused with the reason")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation (faster)")
    p.add_argument("-step_size", type=float, default=0.5,
                   help="sliding-window step as a fraction of the patch size (default: 0.5)")
    p.add_argument("-npp", type=int, default=3, help="preprocessing processes (default: 3; 0 together with "
                                                     "-nps 0 runs without worker processes)")
    p.add_argument("-nps", type=int, default=3, help="segmentation export processes (default: 3)")
    p.add_argument("--save_probabilities", action="store_true",
                   help="also write softmax probabilities (.npz + .pkl), needed for ensembling")
    p.add_argument("-num_parts", type=int, default=1,
                   help="split the cases into this many parts, one per nnssl_predict process (as nnUNetv2_predict; "
                        "default: 1)")
    p.add_argument("-part_id", type=int, default=0,
                   help="the part this process predicts, 0..num_parts-1 (e.g. -num_parts 2 with -part_id 0 on one "
                        "GPU and -part_id 1 on another; all may write into the same -o)")
    p.add_argument("--continue_prediction", action="store_true",
                   help="only predict cases whose segmentation is not in the output folder yet")
    return p


def _run(a: argparse.Namespace):
    from nnssl.inference.predict import predict

    out = predict(a.input, a.output, a.dataset, a.configuration, a.folds, architecture=a.architecture,
                  trainer=a.trainer, plans=a.plans, checkpoint=a.checkpoint, device=a.device,
                  disable_tta=a.disable_tta, step_size=a.step_size, npp=a.npp, nps=a.nps,
                  save_probabilities=a.save_probabilities, continue_prediction=a.continue_prediction,
                  num_parts=a.num_parts, part_id=a.part_id)
    part = f" (part {a.part_id} of 0..{a.num_parts - 1})" if a.num_parts > 1 else ""
    print(f"nnssl_predict{part}: {len(out['predicted'])} case(s) predicted into {out['output_folder']}"
          + (f", {len(out['skipped'])} already there" if out["skipped"] else ""))


def main(argv=None):
    sys.exit(run_command(build_parser(), _run, argv))
