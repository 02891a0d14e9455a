"""Evaluation beyond the training loop: probes of the adapters (and, after the layout move, VQA scoring)."""
