"""Writes what ``predict`` produces: generated PNGs with their prompts and sampling settings,
and VQA answers, under ``<run dir>/predictions/``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import BasePredictionWriter

from unified_vlm.callbacks.evaluation_report import run_dir


def safe_name(record_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in record_id)


class PredictionWriter(BasePredictionWriter):
    """One PNG per generated image (``images/<record id>.png``), ``images.jsonl`` with each image's
    prompt and the full sampling configuration, ``answers.jsonl`` with every VQA answer and
    ``captions.jsonl`` with every caption written for a caption record."""

    def __init__(self, output_dir: Optional[str] = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def _directory(self, trainer) -> Path:
        directory = Path(self.output_dir) if self.output_dir else run_dir(trainer) / "predictions"
        (directory / "images").mkdir(parents=True, exist_ok=True)
        return directory

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        directory = self._directory(trainer)
        for name in ("images.jsonl", "answers.jsonl", "captions.jsonl"):  # a new predict run starts fresh files
            (directory / name).write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        from torchvision.utils import save_image

        directory = self._directory(trainer)
        sampling = dict(pl_module.hparams.get("sampling", {}))
        with open(directory / "answers.jsonl", "a") as answers:
            for item in prediction.get("vqa", []):
                answers.write(json.dumps(item) + "\n")
        with open(directory / "captions.jsonl", "a") as captions:
            for item in prediction.get("caption", []):
                captions.write(json.dumps(item) + "\n")
        with open(directory / "images.jsonl", "a") as images:
            for item in prediction.get("generation", []):
                entry = {"record_id": item["record_id"], "prompt": item["prompt"], "sampling": sampling, "file": None}
                if item["image"] is not None:
                    path = directory / "images" / f"{safe_name(item['record_id'])}.png"
                    save_image(item["image"], path)
                    entry["file"] = str(path.relative_to(directory))
                images.write(json.dumps(entry) + "\n")
