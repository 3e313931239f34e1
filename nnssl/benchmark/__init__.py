"""``nnssl_benchmark_ssl``: does SSL pretraining help on this dataset, and by more than the noise?

Modules (imports go one way, no circles: ``runs`` -> ``data``, ``report`` -> ``settings``, ``stats``):

- :mod:`~nnssl.benchmark.stats`: paired t interval, Holm's correction, seeds needed (pure: numpy, scipy);
- :mod:`~nnssl.benchmark.settings`: the settings, the planned runs, every check before writing;
- :mod:`~nnssl.benchmark.data`: the split, the benchmark's own nnU-Net tree, the pretraining sets;
- :mod:`~nnssl.benchmark.report`: results.csv / results.md / results.png;
- :mod:`~nnssl.benchmark.runs`: pretraining, fine-tuning, prediction and evaluation of every run.

Importing this package (or ``stats``, ``settings``, ``report``) does not import torch.
"""
from nnssl.benchmark.stats import holm, iterations_to_threshold, paired_stats, seeds_needed

__all__ = ["holm", "iterations_to_threshold", "paired_stats", "seeds_needed"]
