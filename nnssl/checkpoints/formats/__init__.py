"""One module per foreign pretrained format; importing this package registers them all
(:mod:`nnssl.checkpoints.foreign`)."""
from nnssl.checkpoints.formats import openmind  # noqa: F401
from nnssl.checkpoints.formats import swin_ssl  # noqa: F401
from nnssl.checkpoints.formats import mis_fm  # noqa: F401
