"""Evaluation of predictions and comparison of runs.

- :mod:`nnssl.evaluation.surface`: HD95 and ASSD in mm between two masks.
- :mod:`nnssl.evaluation.evaluate`: nnU-Net's Dice/IoU ``summary.json`` for a prediction
  folder, extended with per-class HD95 and ASSD (mean, std and undefined-case counts).
- :mod:`nnssl.evaluation.compare`: a side-by-side report (markdown, CSV, PNG) of several
  evaluated runs, e.g. training from scratch versus each pretraining.
"""
