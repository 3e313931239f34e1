from setuptools import setup

# `planning/` and `dataset_conversion/` live at the top level of the repository but install as
# `nnssl.planning` and `nnssl.dataset_conversion`, so nothing generic lands in site-packages.
PACKAGES = [
    "nnssl",
    "nnssl.cli",
    "nnssl.architectures",
    "nnssl.architectures.blocks",
    "nnssl.transforms",
    "nnssl.ssl",
    "nnssl.training",
    "nnssl.planning",
    "nnssl.dataset_conversion",
    "nnssl.inference",
    "nnssl.evaluation",
    "nnssl.benchmark",
]

COMMANDS = {
    "nnssl_synthetic": "synthetic",
    "nnssl_convert_btcv": "convert_btcv",
    "nnssl_convert_msd": "convert_msd",
    "nnssl_convert_unlabeled": "convert_unlabeled",
    "nnssl_plan_and_preprocess": "plan_and_preprocess",
    "nnssl_pretrain": "pretrain",
    "nnssl_show_pretext": "show_pretext",
    "nnssl_demo": "demo",
    "nnssl_train": "train",
    "nnssl_predict": "predict",
    "nnssl_evaluate": "evaluate",
    "nnssl_compare": "compare",
    "nnssl_export_pretrained": "export_pretrained",
    "nnssl_import_pretrained": "import_pretrained",
    "nnssl_benchmark_ssl": "benchmark_ssl",
}

setup(
    name="nnssl",
    version="0.1.0",
    description="Self-supervised pretraining for 3D medical image segmentation on top of nnU-Net v2",
    python_requires=">=3.10",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "License :: OSI Approved :: Apache Software License",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
    packages=PACKAGES,
    package_dir={
        "nnssl.planning": "planning",
        "nnssl.dataset_conversion": "dataset_conversion",
    },
    # What nnssl imports, with floors from what the test suite ran on. nnunetv2 is capped at the
    # tested minor version: nnssl subclasses its trainer and predictor and imports ~25 of its
    # internal modules, which change between minor releases. torch: the oldest version the suite
    # ran on (install your own build first, see README "Set-up").
    install_requires=[
        "torch>=2.13",
        "nnunetv2>=2.8.1,<2.9",
        "batchgenerators>=0.25.1",
        "acvl-utils>=0.2.6,<0.3",
        "dynamic-network-architectures>=0.4.1",  # built directly for OpenMind checkpoints
        "SimpleITK>=2.2.1",
        "nibabel",
        "numpy>=1.24",
        "scipy",
        "scikit-learn",
        "tqdm",
        "matplotlib",
    ],
    # monai is test-only: the MONAI parity tests (SwinUNETR, UNETR state dicts) compare against it;
    # nnssl itself never imports it.
    # Experiment tracking of nnssl_pretrain (nnUNet_wandb_enabled=1, --tensorboard); the tests read
    # both loggers' files back, so dev has them too.
    extras_require={"dev": ["pytest>=7", "monai>=1.5", "wandb", "tensorboard"],
                    "tracking": ["wandb", "tensorboard"]},
    entry_points={
        "console_scripts": [f"{cmd} = nnssl.cli.{mod}:main" for cmd, mod in COMMANDS.items()]
    },
)
