"""Checkpoints: the native contract, the model archive, foreign pretrained formats.

- :mod:`~nnssl.checkpoints.contract`: what a pretraining checkpoint holds, how it is saved;
- :mod:`~nnssl.checkpoints.plans_check`: the plans check between pretraining and fine-tuning;
- :mod:`~nnssl.checkpoints.archive`: the model archive (``.zip``), read verified and written;
- :mod:`~nnssl.checkpoints.foreign` and ``formats/``: one reader/writer per foreign format,
  to and from the contract;
- :mod:`~nnssl.checkpoints.loading`: any of these files from a path, as a contract dict;
- :mod:`~nnssl.checkpoints.publish`: ``nnssl_export_pretrained``.

Imports go one way: contract <- plans_check, archive, foreign <- formats <- loading <- publish.
The names below are the package's public API (``from nnssl.checkpoints import ...``).
"""
from nnssl.checkpoints.archive import is_archive, read_archive_checkpoint
from nnssl.checkpoints.contract import (CHECKPOINT_VERSION, METADATA_KEYS, RESUME_KEYS, check_contract,
                                        checkpoint_metadata, is_output_head, plans_facts, publish_final,
                                        restore_network, save_pretraining_checkpoint, split_network_state,
                                        strip_prefixes, to_plain, unwrap_network, weights_sha256)
from nnssl.checkpoints.loading import (checkpoint_sha256, load_checkpoint_file, load_pretraining_checkpoint,
                                       load_resume_checkpoint)
from nnssl.checkpoints.plans_check import PlansComparison, compare_plans, scheme_uses_intensity_statistics
from nnssl.checkpoints.publish import export_pretrained

__all__ = ["CHECKPOINT_VERSION", "METADATA_KEYS", "RESUME_KEYS", "PlansComparison", "check_contract",
           "checkpoint_metadata", "checkpoint_sha256", "compare_plans", "export_pretrained", "is_archive",
           "is_output_head", "load_checkpoint_file", "load_pretraining_checkpoint", "load_resume_checkpoint",
           "plans_facts", "publish_final", "read_archive_checkpoint", "restore_network",
           "save_pretraining_checkpoint", "scheme_uses_intensity_statistics", "split_network_state",
           "strip_prefixes", "to_plain", "unwrap_network", "weights_sha256"]
