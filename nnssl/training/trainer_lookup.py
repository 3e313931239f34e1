"""Find a fine-tuning trainer class by name without importing all of nnU-Net's trainer folder.

nnU-Net's ``recursive_find_trainer_class_by_name`` imports every module under
``nnunetv2/training/nnUNetTrainer`` until it finds the name. That crawl reaches the Primus
trainers, which import timm and through it torchvision; a torchvision that does not match the
installed torch fails to import and takes every lookup down with it, even for trainers that
never use it. nnssl therefore looks names up in this order:

1. nnssl's own trainers (:data:`nnssl.training.trainer_registry.TRAINERS`);
2. ``nnUNetTrainer``, imported directly;
3. any other name through nnU-Net's crawl (which also searches ``nnUNet_extTrainer``), with
   its failures turned into an :class:`NnsslError` that says what happened.

Stock nnU-Net (``nnUNetv2_predict``, ``nnUNetv2_train``) finds nnssl's trainers when the
environment variable ``nnUNet_extTrainer`` is the folder ``nnssl/training/trainers/``::

    export nnUNet_extTrainer=$(python -c "import os, nnssl.training.trainers as t; print(os.path.dirname(t.__file__))")
"""
import os

from nnssl.errors import NnsslError


def nnssl_trainer_folder() -> str:
    """The folder to put in ``nnUNet_extTrainer`` so that stock nnU-Net finds nnssl's trainers."""
    from nnssl.training import trainers

    return os.path.dirname(os.path.abspath(trainers.__file__))


def find_trainer_class(name: str) -> type:
    """The trainer class called ``name`` (a subclass of nnU-Net's ``nnUNetTrainer``)."""
    import nnssl.training.trainers  # noqa: F401  (registers every nnssl trainer)
    from nnssl.training.trainer_registry import TRAINERS

    if name in TRAINERS:
        return TRAINERS.get(name)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if name == "nnUNetTrainer":
        return nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(name)
    except Exception as e:  # the crawl imports arbitrary modules: any import error can surface here
        known = ", ".join(["nnUNetTrainer", *TRAINERS.names()])
        detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if "Could not find requested nnunet trainer" in str(e):
            raise NnsslError(
                f"Trainer (-tr) '{name}' was found neither among nnssl's trainers nor in nnU-Net's trainer folder "
                f"or nnUNet_extTrainer. nnssl's trainers: {known}. For your own trainer class, put its folder in "
                f"the environment variable nnUNet_extTrainer.") from None
        raise NnsslError(
            f"Looking up trainer (-tr) '{name}' needs nnU-Net's trainer-folder search, and that search failed while "
            f"importing nnU-Net's trainer modules ({detail}). This usually means an optional dependency of some "
            f"nnU-Net trainer is broken, e.g. a torchvision build that does not match the installed torch "
            f"(reinstall torchvision for your torch version). Trainers that need no search: {known}.") from None
