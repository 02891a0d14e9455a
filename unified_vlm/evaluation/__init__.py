"""Metrics for both directions, usable on plain tensors and records without a Trainer.

- ``reader``: the watch reader network (reads generated watches back into attributes);
- ``generation``: faithfulness of generated watches to their prompt, and Fréchet distances;
- ``captions``: which attributes a caption states, and whether each is right.
"""
