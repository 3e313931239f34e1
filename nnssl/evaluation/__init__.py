"""Evaluation of predictions and comparison of runs.

- :mod:`nnssl.evaluation.surface`: HD95 and ASSD in mm between two masks.
- :mod:`nnssl.evaluation.evaluate`: nnU-Net's Dice/IoU ``summary.json`` for a prediction
  folder, extended with per-class HD95 and ASSD (mean, std and undefined-case counts).
- :mod:`nnssl.evaluation.compare`: a side-by-side report (markdown, CSV, PNG/SVG) of several
  evaluated runs, e.g. training from scratch versus each pretraining; the figure is drawn by
  :mod:`nnssl.evaluation.report_figure`.
- :mod:`nnssl.evaluation.curves`: ``learning_curves(fold_folder)``, the per-epoch curves of an
  nnU-Net training (losses, pseudo Dice, lr) against iterations.
"""
