"""nnssl: self-supervised pretraining for 3D medical image segmentation on top of nnU-Net v2."""

__version__ = "0.1.0"
