"""nnssl_train: nnU-Net training / fine-tuning, with pretrained-weight injection."""
import argparse
import sys

from nnssl.cli._common import NnsslArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    p = NnsslArgumentParser(
        prog="nnssl_train",
        description="Train one fold with nnU-Net's training loop; with -pretrained, inject the weights of an "
                    "nnssl_pretrain checkpoint first (a report of what was loaded is printed and written to "
                    "nnssl_pretrained.json in the fold folder). Results go to "
                    "$nnUNet_results/DatasetXXX/Trainer__Plans__CONFIG/fold_X/ as with nnUNetv2_train.")
    p.add_argument("dataset", help="dataset ID (1), full name (Dataset001_BTCV) or short name (BTCV)")
    p.add_argument("configuration", help="nnU-Net configuration, e.g. 3d_fullres")
    p.add_argument("fold", help="cross-validation fold 0-4, or 'all'")
    p.add_argument("-a", dest="architecture", default=None,
                   help="architecture (default: plainconvunet, or the one whose plans -p names); picks the "
                        "default plans and trainer")
    p.add_argument("-tr", dest="trainer", default=None,
                   help="trainer class (default: the architecture's nnssl trainer, e.g. nnsslTrainer); "
                        "nnUNetTrainer and nnU-Net's other trainers work too")
    p.add_argument("-p", dest="plans", default=None, help="plans identifier (default: the architecture's plans)")
    p.add_argument("-pretrained", "-pretrained_weights", dest="pretrained", default=None,
                   help="pretraining checkpoint (checkpoint_final.pth of nnssl_pretrain) to initialize from "
                        "(-pretrained_weights: nnUNetv2_train's name for it)")
    p.add_argument("-num_gpus", type=int, default=1,
                   help="train with N processes (DDP) as nnUNetv2_train -num_gpus: N GPUs with -device cuda, N CPU "
                        "processes (gloo) with -device cpu; the plans' batch size is split over them (default: 1)")
    p.add_argument("--epochs", type=int, default=None, help="number of epochs (default: the trainer's, 1000 "
                                                            "for nnU-Net's)")
    p.add_argument("--iterations_per_epoch", type=int, default=None,
                   help="training iterations per epoch (default: the trainer's, 250 for nnU-Net's)")
    p.add_argument("--val_iterations", type=int, default=None,
                   help="validation iterations per epoch (default: the trainer's, 50 for nnU-Net's)")
    p.add_argument("--warmup_epochs", type=int, default=None,
                   help="linear learning-rate warm-up over the first N epochs (nnssl trainers only)")
    p.add_argument("--freeze_encoder_epochs", type=int, default=None,
                   help="keep the encoder frozen for the first N epochs (nnssl trainers only)")
    p.add_argument("--allow_plans_mismatch", action="store_true",
                   help="fine-tune from a -pretrained checkpoint whose plans preprocess differently (spacing, "
                        "normalization or its intensity statistics, transpose); refused by default, with the list "
                        "of differences")
    p.add_argument("-device", default=None, choices=["cpu", "cuda", "mps"],
                   help="device (default: cuda when available, else cpu); mps: Apple GPUs, where this torch build has MPS, else refused with the reason")
    p.add_argument("--cpu_precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="on -device cpu: 'auto' (default) trains with bf16 autocast when the CPU has native bf16 "
                        "(AMX / AVX512-BF16; a tiny U-Net's iteration ~1.4x faster) and in float32 otherwise; 'fp32' "
                        "always float32 (nnU-Net's CPU behaviour). nnssl trainers only")
    p.add_argument("--c", dest="continue_training", action="store_true",
                   help="continue from the fold's latest checkpoint; options not given again are taken from "
                        "the interrupted run")
    p.add_argument("--npz", action="store_true",
                   help="also save the final validation's softmax outputs (.npz), needed for ensembling")
    p.add_argument("--val", dest="validation_only", action="store_true",
                   help="only run the final validation of a finished training")
    return p


def _run(a: argparse.Namespace):
    from nnssl.training.finetune import train

    kwargs = dict(architecture=a.architecture, trainer=a.trainer, plans=a.plans, pretrained=a.pretrained,
                  epochs=a.epochs, iterations_per_epoch=a.iterations_per_epoch, val_iterations=a.val_iterations,
                  warmup_epochs=a.warmup_epochs, freeze_encoder_epochs=a.freeze_encoder_epochs, device=a.device,
                  cpu_precision=a.cpu_precision, continue_training=a.continue_training, npz=a.npz,
                  validation_only=a.validation_only, allow_plans_mismatch=a.allow_plans_mismatch)
    if a.num_gpus == 1:
        out = train(a.dataset, a.configuration, a.fold, **kwargs)
    else:
        from nnssl.training.ddp import train_ddp
        out = train_ddp(a.num_gpus, a.dataset, a.configuration, a.fold, **kwargs)
    print(f"nnssl_train: results in {out['output_folder']}")


def main(argv=None):
    sys.exit(run_command(build_parser(), _run, argv))
