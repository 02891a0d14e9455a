"""Every metric of the project, usable on plain tensors and records without a Trainer.

``vqa``: the paper's VQA scoring rules (PAPER.md 4.2); ``probes``: linear probes and t-SNE of the
adapters' outputs (PAPER.md 4.4). The Lightning callbacks in ``unified_vlm.callbacks`` only
collect outputs and call these.
"""
