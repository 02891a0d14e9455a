"""Every metric of the project, for both directions, usable on plain tensors and records without a Trainer.

- ``vqa``: the paper's VQA scoring rules (docs/paper.md 4.2);
- ``reader``: the watch reader network (reads generated watches back into attributes);
- ``generation``: faithfulness of generated watches to their prompt, and Fréchet distances;
- ``captions``: which attributes a caption states, and whether each is right;
- ``probes``: linear probes and t-SNE of the adapters' outputs (docs/paper.md 4.4);
- ``record_tasks``: a model's answers, captions and images for records (its test and predict step).

The Lightning callbacks in ``unified_vlm.callbacks`` only collect outputs and call these.
"""
