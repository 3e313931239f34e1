"""Saved-for-backward tensors of one paper-size network (the activations autograd keeps), per top-level
module, next to the planner's feature-map count: a second view on ``bench_memory.py``'s RSS peaks,
which also hold the transient memory of the backward pass.

Run: ``python benchmarks/bench_memory_saved.py ARCH D H W`` (same BTCV-like plans as bench_memory).
"""
import sys
from collections import Counter

import torch

from bench_memory import N_LABELS, SPACING, plan


def main(arch: str, patch):
    from nnssl.architectures.build import _from_block

    torch.set_num_threads(1)
    _, planner = plan(arch)
    net = _from_block(planner.network_for_patch(patch, SPACING), 1, N_LABELS, deep_supervision=True)
    seen, current = {}, ["?"]

    def pack(t):  # one entry per storage: views and repeated saves of a tensor count once
        seen.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), current[0]))
        return t

    for name, m in net.named_modules():
        if name.count(".") <= 2:
            m.register_forward_pre_hook(lambda mod, i, name=name: current.__setitem__(0, name))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(torch.randn(1, 1, *patch))
    per_module = Counter()
    for nbytes, name in seen.values():
        per_module[".".join(name.split(".")[:3])] += nbytes
    block = planner.network_for_patch(patch, SPACING)
    keys = ("network_class_name", "arch_kwargs", "_kw_requires_import")
    est = planner.static_estimate_VRAM_usage(patch, 1, N_LABELS, *[block[k] for k in keys])
    gb = (est / planner.UNet_reference_val_3d * planner.UNet_reference_val_corresp_GB
          / planner.UNet_reference_val_corresp_bs_3d)
    print(f"{arch} {list(patch)} batch 1: saved {sum(b for b, _ in seen.values()) / 2 ** 30:.3f} GB float32, "
          f"planner {gb:.3f} GB")
    for name, nbytes in per_module.most_common(8):
        print(f"  {name}: {nbytes / 2 ** 30:.3f} GB")


if __name__ == "__main__":
    main(sys.argv[1], tuple(int(x) for x in sys.argv[2:5]))
