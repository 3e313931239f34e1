"""Foreign pretrained formats: files other projects publish, read into (and, where the format
allows, written from) the native checkpoint contract (:mod:`nnssl.checkpoints.contract`).

A format is one module in ``nnssl/checkpoints/formats/`` that calls :func:`register_format`
(imported by ``formats/__init__.py``). Its ``detect`` looks at the object ``torch.load(...,
weights_only=True)`` returned and says whether the layout is its own; ``to_native`` turns it into
a complete contract dict: ``network_weights`` under the nnssl network's names, the architecture
block, the plans facts the format states, ``method`` = {"name": the format's name, "config":
{"source": what the file says about its origin}}; ``iteration`` and ``seed`` are -1 where the
format does not record them. ``from_native`` (optional) writes a contract dict in the format.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional

UNKNOWN = -1  # iteration / seed a foreign format does not record

from nnssl.errors import NnsslError


@dataclass(frozen=True)
class ForeignFormat:
    name: str  # what --format takes
    description: str  # one line: whose files, which network
    detect: Callable[[object], bool]  # loaded object -> is it this layout
    to_native: Callable[[object, str], dict]  # (loaded object, path) -> contract dict
    from_native: Optional[Callable[..., dict]] = None  # (contract dict, plans dict) -> the format's torch object


FORMATS: Dict[str, ForeignFormat] = {}


def register_format(fmt: ForeignFormat) -> ForeignFormat:
    if fmt.name in FORMATS:
        raise ValueError(f"foreign format {fmt.name!r} is registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def detect_format(obj) -> Optional[str]:
    """The name of the first registered format that recognises ``obj``, else None."""
    for fmt in FORMATS.values():
        if fmt.detect(obj):
            return fmt.name
    return None


def to_native(obj, path: str, format: Optional[str] = None):
    """``obj`` (loaded from ``path``) as a contract dict; with ``format`` None, by its recognised
    layout (an unrecognised object is returned as it is, for the contract check to refuse)."""
    if format is None:
        format = detect_format(obj)
        if format is None:
            return obj
    elif format not in FORMATS:
        raise NnsslError(f"--format {format}: unknown pretrained format; choose one of {', '.join(sorted(FORMATS))}.")
    elif not FORMATS[format].detect(obj):
        raise NnsslError(f"{path} does not have the layout of the '{format}' format ({FORMATS[format].description}); "
                         f"check the file or choose another --format ({', '.join(sorted(FORMATS))}).")
    return FORMATS[format].to_native(obj, path)
