"""nnU-Net glue: the pretraining engine, fine-tuning trainers, weight injection."""
