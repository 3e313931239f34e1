"""nnssl_pretrain: self-supervised pretraining (argument parsing only; the engine is nnssl.training.pretrainer)."""
import argparse
import sys

from nnssl.cli._common import NnsslArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    import nnssl.architectures  # noqa: F401  (registries provide the choices listed in --help)
    import nnssl.ssl  # noqa: F401
    from nnssl.architectures.spec import ARCHITECTURES
    from nnssl.ssl.base import METHODS

    p = NnsslArgumentParser(
        prog="nnssl_pretrain",
        description="Pretrain a segmentation network with a self-supervised method on preprocessed unlabeled "
                    "data and write $nnUNet_results/<Dataset>/nnsslPretrain__<METHOD>__<ARCH>__<PLANS>__<CONFIG>/"
                    "checkpoint_final.pth (the checkpoint nnssl_train -pretrained loads). Run "
                    "nnssl_plan_and_preprocess (with -pd for other pretraining data) first. Multi-GPU/CPU: launch "
                    "with `torchrun --nproc_per_node=N -m nnssl.cli.pretrain ...`; --batch_size is then the global "
                    "batch, split evenly over the processes.")
    p.add_argument("-d", "--dataset", required=True,
                   help="target dataset whose plans (spacing, normalization, patch size) pretraining uses: ID, "
                        "full name (Dataset001_BTCV) or short name (BTCV)")
    p.add_argument("-m", "--method", required=True, help=f"SSL method: {', '.join(METHODS.names())}")
    p.add_argument("-a", "--architecture", default="plainconvunet",
                   help=f"architecture (its plans build the network): {', '.join(ARCHITECTURES.names())} "
                        f"(default: plainconvunet)")
    p.add_argument("-pd", "--pretraining_data", default="intask",
                   help="pretraining data: 'intask' (the target's own images, labels ignored; default) or an "
                        "unlabeled dataset preprocessed with the target's plans (nnssl_plan_and_preprocess -pd)")
    p.add_argument("--fold", type=int, default=None, metavar="K",
                   help="with -pd intask: pretrain on fold K's training cases only (nnU-Net's splits_final.json, "
                        "created as nnU-Net would if missing), so fine-tuning fold K validates on cases the "
                        "pretraining never saw; output folder ...__foldK")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="plans configuration (default: 3d_fullres)")
    p.add_argument("--iterations", type=int, default=None,
                   help="total training iterations (default: the method's `iterations` setting, else 100000); "
                        "the lr warm-up and decay points are shares of it (the effective schedule is printed at "
                        "the start); with --c a larger value trains an existing run further")
    p.add_argument("--iterations_per_epoch", type=int, default=250,
                   help="iterations per epoch: the log, progress.png and checkpoint_latest.pth are updated every "
                        "epoch (default: 250)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="global batch size (default: the method's batch_size setting, else the plans' batch size)")
    p.add_argument("-device", "--device", choices=("cpu", "cuda", "mps"), default=None,
                   help="device (default: cuda if available, else cpu); AMP and --compile are used on cuda only; mps: Apple GPUs, where this torch build has MPS, else refused with the reason")
    p.add_argument("--cpu_precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="on -device cpu: 'auto' (default) runs the network and heads under bf16 autocast when the "
                        "CPU has native bf16 (AMX / AVX512-BF16) and in float32 otherwise; 'fp32' always float32. "
                        "Losses are always computed in float32. With --c the run's saved precision is kept")
    p.add_argument("--c", dest="resume", action="store_true",
                   help="continue the run in the output folder from checkpoint_latest.pth (bit-exact on CPU)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the network initialization, data sampling and pretext randomness (default: 0)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override method settings, e.g. --set lr=1e-4 K=4 box_size_max=40,80,80 (unknown keys "
                        "are refused with the list of valid ones)")
    p.add_argument("--num_workers", type=int, default=None,
                   help="data-loading background processes (default: $nnUNet_n_proc_DA or nnU-Net's default; 0 "
                        "loads in the training process)")
    p.add_argument("--compile", dest="compile_network", action="store_true",
                   help="torch.compile the model (CUDA only; ignored on CPU)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log every loss term, lr and data wait to TensorBoard (<output folder>/tensorboard; "
                        "needs `pip install tensorboard`; or set nnssl_tensorboard=1). W&B: set nnU-Net's "
                        "nnUNet_wandb_enabled=1 (project nnUNet_wandb_project, offline with WANDB_MODE=offline)")
    p.add_argument("--no_pbar", action="store_true", help="no progress bars (for cluster logs)")
    p.add_argument("-o", "--output_folder", default=None,
                   help="output folder (default: $nnUNet_results/<Dataset>/nnsslPretrain__<METHOD>__<ARCH>__"
                        "<PLANS>__<CONFIG>)")
    return p


def main(argv=None):
    def run(a):
        from nnssl.training.pretrainer import pretrain

        folder = pretrain(a.dataset, a.method, a.architecture, a.pretraining_data, a.configuration, a.iterations,
                          a.iterations_per_epoch, a.batch_size, a.device, a.resume, a.seed, a.overrides,
                          a.num_workers, a.compile_network, a.output_folder, a.fold, a.cpu_precision,
                          tensorboard=a.tensorboard, show_progress=not a.no_pbar)
        print(f"Pretraining checkpoint: {folder}/checkpoint_final.pth")

    sys.exit(run_command(build_parser(), run, argv))


if __name__ == "__main__":  # entry point for `python -m nnssl.cli.pretrain` (torchrun)
    main()
