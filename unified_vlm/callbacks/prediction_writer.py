"""Writes what ``predict`` produces: generated PNGs with their prompts and sampling settings,
and VQA answers, under ``<run dir>/predictions/``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import BasePredictionWriter

from unified_vlm.callbacks.evaluation_report import run_dir
from unified_vlm.evaluation import record_tasks


def safe_name(record_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in record_id)


class PredictionWriter(BasePredictionWriter):
    """One PNG per generated image (``images/<record id>.png``), ``images.jsonl`` with each image's
    prompt and the full sampling configuration, ``answers.jsonl`` with every VQA answer and
    ``captions.jsonl`` with every caption written for a caption record.

    Under DDP each rank appends to its own part (``answers.rank1.jsonl``, ...) and rank 0 joins the
    parts in rank order at the end, so no rank truncates or interleaves another's lines."""

    FILES = ("images.jsonl", "answers.jsonl", "captions.jsonl")

    def __init__(self, output_dir: Optional[str] = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self._resolved: Optional[Path] = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Give the model its predict step (``record_tasks.run_records``, unless it has one)."""
        if stage == "predict":
            record_tasks.attach(pl_module)

    def _directory(self, trainer) -> Path:
        """Resolved once per predict run, at its start: reading ``log_dir`` is a collective call under
        DDP, and ranks may take different numbers of batches."""
        if self._resolved is None:
            directory = Path(self.output_dir) if self.output_dir else run_dir(trainer) / "predictions"
            (directory / "images").mkdir(parents=True, exist_ok=True)
            self._resolved = directory
        return self._resolved

    @staticmethod
    def _part_name(name: str, rank: int, world_size: int) -> str:
        """A rank's file: the file itself on one process, ``<stem>.rank<r>.jsonl`` under DDP."""
        return name if world_size <= 1 else name.replace(".jsonl", f".rank{rank}.jsonl")

    def _part(self, trainer, name: str) -> str:
        return self._part_name(name, trainer.global_rank, trainer.world_size)

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._resolved = None  # every rank resolves it here, together
        directory = self._directory(trainer)
        for name in self.FILES:  # a new predict run starts fresh files
            (directory / self._part(trainer, name)).write_text("")

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if trainer.world_size <= 1:
            return
        trainer.strategy.barrier("prediction_writer")  # every rank has written its last batch
        if trainer.global_rank == 0:
            directory = self._directory(trainer)
            for name in self.FILES:
                parts = [directory / self._part_name(name, r, trainer.world_size) for r in range(trainer.world_size)]
                merged = directory / (name + ".tmp")
                with open(merged, "w") as out:
                    for part in parts:
                        if part.exists():
                            out.write(part.read_text())
                merged.replace(directory / name)
                for part in parts:
                    part.unlink(missing_ok=True)
        trainer.strategy.barrier("prediction_writer_merged")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        from torchvision.utils import save_image

        directory = self._directory(trainer)
        sampling = dict(pl_module.hparams.get("sampling", {}))
        with open(directory / self._part(trainer, "answers.jsonl"), "a") as answers:
            for item in prediction.get("vqa", []):
                answers.write(json.dumps(item) + "\n")
        with open(directory / self._part(trainer, "captions.jsonl"), "a") as captions:
            for item in prediction.get("caption", []):
                captions.write(json.dumps(item) + "\n")
        with open(directory / self._part(trainer, "images.jsonl"), "a") as images:
            for item in prediction.get("generation", []):
                entry = {"record_id": item["record_id"], "prompt": item["prompt"], "sampling": sampling, "file": None}
                if item["image"] is not None:
                    path = directory / "images" / f"{safe_name(item['record_id'])}.png"
                    save_image(item["image"], path)
                    entry["file"] = str(path.relative_to(directory))
                images.write(json.dumps(entry) + "\n")
