"""Training: the Trainer and the target normaliser."""
