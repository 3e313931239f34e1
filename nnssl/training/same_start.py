"""Multi-process fine-tuning (``nnssl_train -num_gpus N``) from ``-pretrained``: every rank must
start from the same weights.

nnU-Net's DDP wrapper broadcasts rank 0's freshly initialized network to every rank, but the
pretrained weights are injected after the wrapping, by each rank from the checkpoint file. A
rank that read another file (or a stale copy on another node) would silently train a different
start, so after the injection every rank fingerprints its network and the fingerprints are
compared across ranks: a difference is refused, and equal fingerprints are recorded in
``nnssl_pretrained.json`` under ``"ranks"``.

Fingerprints: :func:`nnssl.checkpoints.weights_sha256` of the loaded tensors and of the whole
network state.
"""
import os
from typing import Dict, List

import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnssl.checkpoints import unwrap_network, weights_sha256
from nnssl.errors import NnsslError
from nnssl.io import write_json


def check_same_start(per_rank: List[Dict[str, str]]) -> None:
    """Refuse fingerprints (one dict per rank) that differ from rank 0's."""
    for rank, fp in enumerate(per_rank[1:], start=1):
        if fp != per_rank[0]:
            raise NnsslError(f"-num_gpus: rank {rank} starts from other weights than rank 0 after loading the "
                             f"-pretrained checkpoint ({fp} vs {per_rank[0]}). Every process must read the same "
                             f"checkpoint file; check that the path shows the same file on every node.")


def verify_ranks_start_alike(trainer, report) -> None:
    """Gather every rank's fingerprints of the injected network, refuse differences, and record them
    (rank 0) in the fold's ``nnssl_pretrained.json``. Collective: every rank must call it."""
    from nnssl.training.injection import LOADED, REPORT_FILE

    state = unwrap_network(trainer.network).state_dict()
    mine = {"loaded_sha256": weights_sha256({k: state[k] for k in report.keys(LOADED)}),
            "network_sha256": weights_sha256(state)}
    per_rank: List[Dict[str, str]] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, mine)  # also a barrier: every rank has written its injection report
    check_same_start(per_rank)
    trainer.print_to_log_file(f"nnssl: all {len(per_rank)} ranks start from the same weights (network sha256 "
                              f"{mine['network_sha256'][:16]}...)")
    if trainer.local_rank == 0:
        path = os.path.join(trainer.output_folder, REPORT_FILE)
        write_json({**load_json(path), "ranks": {"world_size": len(per_rank), "fingerprints": per_rank}}, path)
