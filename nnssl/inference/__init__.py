"""Prediction with nnU-Net's predictor into nnU-Net-compatible output folders."""
from nnssl.inference.predict import collect_cases, nnsslPredictor, predict  # noqa: F401
