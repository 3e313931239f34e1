"""Architectures: one module per network, each registering an :class:`ArchitectureSpec`.

Importing this package fills :data:`ARCHITECTURES`. To add an architecture, write a module
here that defines the network and calls ``register_architecture``, add its planner to
``planning/``, and import the module below; every registered architecture automatically
gets the forward and pretraining tests in ``tests/``.

``build_network(name, patch_size, input_channels, num_classes, deep_supervision=False,
preset=None)`` builds any registered architecture without a plans file (``build.py``).
"""
from nnssl.architectures.spec import ARCHITECTURES, ArchitectureSpec, register_architecture  # noqa: F401
from nnssl.architectures.build import build_network, load_pretrained  # noqa: F401
from nnssl.architectures import nnunet_unets  # noqa: F401
from nnssl.architectures import pct_net  # noqa: F401
from nnssl.architectures import ulkanet  # noqa: F401
from nnssl.architectures import logonet  # noqa: F401
from nnssl.architectures import swinunetr  # noqa: F401
from nnssl.architectures import qt_unet  # noqa: F401
from nnssl.architectures import unetr  # noqa: F401
from nnssl.architectures import unetr_pp  # noqa: F401
