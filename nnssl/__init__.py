"""nnssl: self-supervised pretraining for 3D medical image segmentation on top of nnU-Net v2.

Public network API (imported on first use, so ``import nnssl`` stays light for the commands):
``nnssl.build_network(name, patch_size, input_channels, num_classes, ...)`` and
``nnssl.load_pretrained(checkpoint)``; see ``nnssl/architectures/build.py``.
"""

__version__ = "0.1.0"
__all__ = ["build_network", "load_pretrained"]


def __getattr__(name):
    if name in __all__:
        from nnssl.architectures import build

        return getattr(build, name)
    raise AttributeError(f"module 'nnssl' has no attribute '{name}'")
