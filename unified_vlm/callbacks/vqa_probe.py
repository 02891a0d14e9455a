"""Answer accuracy during training: the validation loss alone does not show when an attribute is learned.

At the end of every validation run, the model answers every turn of (up to ``max_records``) VQA
records of the validation split, the answers are scored with the test rules (PAPER.md 4.2),
and ``val/vqa/<attribute>`` (plus ``val/vqa/total``) are logged, so the CSV/TensorBoard logs
show each attribute's learning curve. Disabled with ``--vqa_probe.max_records 0``.
"""
from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import torch


class VQAProbe(L.Callback):
    def __init__(self, max_records: int = 64) -> None:
        if max_records < 0:
            raise ValueError(f"vqa_probe.max_records must be >= 0, got {max_records}")
        self.max_records = max_records
        self.last: dict[str, float] = {}

    def _records(self, trainer) -> list[dict]:
        datamodule = getattr(trainer, "datamodule", None)
        dataset = getattr(datamodule, "datasets", {}).get("val") if datamodule is not None else None
        if dataset is None:
            return []
        rank, world = trainer.global_rank, trainer.world_size
        records = []
        tasks = dataset.tasks()
        for index in [i for i, task in enumerate(tasks) if task == "vqa"][: self.max_records][rank::world]:
            records.append(dataset[index])
        return records

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.max_records == 0 or trainer.sanity_checking or not hasattr(pl_module, "answer_vqa"):
            return
        from unified_vlm.scoring import VQAScorer

        records = self._records(trainer)
        if not records and trainer.world_size == 1:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            answers = pl_module.answer_vqa(records) if records else []
        pl_module.train(was_training)
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[list] = [None] * trainer.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(gathered, answers)
            answers = [a for part in gathered for a in part]
        scorer = VQAScorer()
        for a in answers:
            scorer.add(a["record_id"], a["turn"], a["question"], a["ground_truth"], a["answer"])
        summary = scorer.summary()["all_turns"]
        self.last = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and k != "count"}
        for key, value in self.last.items():
            pl_module.log(f"val/vqa/{key}", value, sync_dist=False, rank_zero_only=True)
        rank_zero_info(f"step {trainer.global_step} VQA on {len(answers)} validation turns: "
                       + " ".join(f"{k} {v:.3f}" for k, v in self.last.items()))
