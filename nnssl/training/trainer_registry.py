"""The registry of fine-tuning trainers (``-tr`` names).

It lives outside ``nnssl/training/trainers/`` on purpose: that folder is what users put in
``nnUNet_extTrainer``, and stock nnU-Net's search imports each file there a second time under a
top-level module name. Registering such a re-executed class again is a no-op (same name, same
qualified name), so both imports agree on one registry.
"""
from nnssl.registry import Registry

TRAINERS: Registry[type] = Registry("fine-tuning trainer", "-tr")


def register_trainer(cls: type) -> type:
    if cls.__name__ in TRAINERS and TRAINERS.get(cls.__name__).__qualname__ == cls.__qualname__:
        return cls  # the same class, imported again by nnU-Net's folder search
    TRAINERS.add(cls.__name__, cls)
    return cls
