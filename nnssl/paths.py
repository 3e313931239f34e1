"""nnU-Net's folder variables, with an embedded default when they are unset.

nnssl uses nnU-Net's own environment variables (``nnUNet_raw``, ``nnUNet_preprocessed``,
``nnUNet_results``). When one is unset, nnssl sets it to ``./nnssl_data/{raw,preprocessed,
results}`` (relative to the working directory, made absolute) and says so once on stderr.
Setting the variable in ``os.environ`` (rather than keeping a private copy) matters:
nnU-Net reads these variables lazily, and worker processes inherit them, so nnssl and the
nnU-Net code it calls always agree on where data lives.
"""
import os
import sys
from typing import Dict

_VARS = {"nnUNet_raw": "raw", "nnUNet_preprocessed": "preprocessed", "nnUNet_results": "results"}
DEFAULT_ROOT = "nnssl_data"
_announced = False


def ensure_paths() -> Dict[str, str]:
    """Make sure all three nnU-Net folder variables are set; return them (absolute paths)."""
    global _announced
    defaulted = []
    for var, sub in _VARS.items():
        if not os.environ.get(var):
            os.environ[var] = os.path.abspath(os.path.join(DEFAULT_ROOT, sub))
            defaulted.append(var)
    if defaulted and not _announced:
        _announced = True
        print(
            f"nnssl: {', '.join(defaulted)} not set; using the embedded default under "
            f"{os.path.abspath(DEFAULT_ROOT)}/ (set the variables to use other folders).",
            file=sys.stderr,
        )
    return {var: os.environ[var] for var in _VARS}


def raw() -> str:
    return ensure_paths()["nnUNet_raw"]


def preprocessed() -> str:
    return ensure_paths()["nnUNet_preprocessed"]


def results() -> str:
    return ensure_paths()["nnUNet_results"]
