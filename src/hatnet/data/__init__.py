"""Datasets of each task (``classification``, ...): folders on disk or embedded data -> tensors and targets."""
