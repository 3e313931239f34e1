"""Planners (one per architecture) and preprocessing of labeled and pretraining data."""
