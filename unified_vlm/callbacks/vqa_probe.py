"""Answer accuracy during training: the validation loss alone does not show when an attribute is learned.

At the end of every validation run, the model answers every turn of (up to ``max_records``) VQA
records of the validation split, the answers are scored with the test rules (docs/paper.md 4.2),
and ``val/vqa/<attribute>`` (plus ``val/vqa/total``) are logged, so the CSV/TensorBoard logs
show each attribute's learning curve. Disabled with ``--vqa_probe.max_records 0``.
"""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from unified_vlm.callbacks.evaluation_report import gather_objects, validation_records
from unified_vlm.evaluation.record_tasks import answer_vqa
from unified_vlm.evaluation.vqa import score_answers


class VQAProbe(L.Callback):
    def __init__(self, max_records: int = 64) -> None:
        if max_records < 0:
            raise ValueError(f"vqa_probe.max_records must be >= 0, got {max_records}")
        self.max_records = max_records
        self.last: dict[str, float] = {}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.max_records == 0 or trainer.sanity_checking or not hasattr(pl_module, "chat_format"):
            return
        records = validation_records(trainer, "vqa", self.max_records)
        if not records and trainer.world_size == 1:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            answers = answer_vqa(pl_module, records) if records else []
        pl_module.train(was_training)
        answers = gather_objects(trainer, answers)
        summary = score_answers(answers).summary()["all_turns"]
        self.last = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and k != "count"}
        for key, value in self.last.items():
            pl_module.log(f"val/vqa/{key}", value, sync_dist=False, rank_zero_only=True)
        rank_zero_info(f"step {trainer.global_step} VQA on {len(answers)} validation turns: "
                       + " ".join(f"{k} {v:.3f}" for k, v in self.last.items()))
