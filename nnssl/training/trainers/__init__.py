"""Fine-tuning trainers: small ``nnUNetTrainer`` subclasses, one module per architecture family.

This folder holds trainer classes only, because it is what ``nnUNet_extTrainer`` points at: stock
nnU-Net's trainer search imports every module here, so nothing else (no pretraining engine, no
plotting) may live in it. Importing this package registers every trainer in
:data:`nnssl.training.trainer_registry.TRAINERS`.
"""
from nnssl.training.trainers import base  # noqa: F401
from nnssl.training.trainers import pct_net  # noqa: F401
from nnssl.training.trainers import logonet  # noqa: F401
from nnssl.training.trainers import swinunetr  # noqa: F401
from nnssl.training.trainers import short  # noqa: F401
from nnssl.training.trainers import qt_unet  # noqa: F401
from nnssl.training.trainers import unetr  # noqa: F401
