"""SSL methods: one module per method, each registered by name in :data:`METHODS`.

To add a method, write a module here with a config dataclass (paper defaults) and an
:class:`SSLMethod` subclass decorated with ``@METHODS.register("name")``, and import it
below; the registry-driven tests then run it on every architecture.
"""
from nnssl.ssl.base import METHODS, SSLMethod  # noqa: F401
from nnssl.ssl import volume_fusion  # noqa: F401
from nnssl.ssl import masked_kmeans  # noqa: F401
from nnssl.ssl import hybrid_mim  # noqa: F401
from nnssl.ssl import order_reconstruction  # noqa: F401
from nnssl.ssl import swin_pretext  # noqa: F401
