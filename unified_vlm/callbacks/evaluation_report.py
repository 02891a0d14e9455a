"""Writes the test-time report: VQA scores (JSON + printed table) and a grid of generated watches."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def run_dir(trainer: L.Trainer) -> Path:
    """The logger's version directory when there is one, else ``default_root_dir``.

    Under DDP ``trainer.log_dir`` is a broadcast from rank 0: call this on every rank."""
    directory = trainer.log_dir if trainer.logger is not None and trainer.log_dir else trainer.default_root_dir
    return Path(directory)


def gather_objects(trainer: L.Trainer, items: list) -> list:
    """Every rank's ``items``, concatenated in rank order (the list itself on one process)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return items
    gathered: list[list] = [None] * trainer.world_size  # type: ignore[list-item]
    torch.distributed.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def score_vqa(answers: list[dict]):
    """A ``VQAScorer`` holding every answer from ``UnifiedVLM.answer_vqa``."""
    from unified_vlm.scoring import VQAScorer

    scorer = VQAScorer()
    for a in answers:
        scorer.add(a["record_id"], a["turn"], a["question"], a["ground_truth"], a["answer"])
    return scorer


def write_json_atomically(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def image_grid(pairs: list[tuple[torch.Tensor, Optional[torch.Tensor]]], cell: int = 128, columns: int = 8) -> torch.Tensor:
    """Ground truth above generated, ``columns`` pairs per row; a missing image is drawn grey."""
    tiles = []
    for target, generated in pairs:
        top = F.interpolate(target[None].float(), size=(cell, cell), mode="nearest")[0]
        bottom = (
            F.interpolate(generated[None].float(), size=(cell, cell), mode="nearest")[0]
            if generated is not None
            else torch.full((3, cell, cell), 0.5)
        )
        tiles.append(torch.cat([top, torch.ones(3, 2, cell), bottom], dim=1))
    from torchvision.utils import make_grid

    return make_grid(torch.stack(tiles), nrow=columns, padding=4, pad_value=1.0)


class EvaluationReport(L.Callback):
    """Collects ``test_step`` outputs; at the end of testing scores every VQA turn (PAPER.md 4.2),
    prints the table, logs ``test/<attribute>`` metrics, writes ``test_scores.json`` and
    ``generation_grid.png`` (ground truth above generated) into the run directory."""

    def __init__(self, scores_file: str = "test_scores.json", grid_file: str = "generation_grid.png", grid_size: int = 16) -> None:
        self.scores_file, self.grid_file, self.grid_size = scores_file, grid_file, grid_size
        self.vqa: list[dict] = []
        self.generated: list[dict] = []
        self.summary: Optional[dict] = None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.vqa, self.generated, self.summary = [], [], None

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, dict):
            return
        self.vqa.extend(outputs.get("vqa", []))
        for item in outputs.get("generation", []):
            if len(self.generated) < self.grid_size and item.get("target") is not None:
                self.generated.append(item)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        scorer = score_vqa(gather_objects(trainer, self.vqa))
        self.summary = scorer.summary()
        for scope, values in self.summary.items():
            for key, value in values.items():
                if isinstance(value, (int, float)) and key != "count":
                    pl_module.log(f"test/{scope}/{key}", float(value), sync_dist=False)
        self._write(run_dir(trainer), pl_module, scorer)  # run_dir broadcasts: every rank calls it

    @rank_zero_only
    def _write(self, directory: Path, pl_module, scorer) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        scorer.to_json(directory / self.scores_file)
        print("\nVQA scores on the test split (PAPER.md 4.2 rules)\n" + scorer.format_table())
        print(f"wrote {directory / self.scores_file}")
        if self.generated:
            from torchvision.utils import save_image

            grid = image_grid([(g["target"], g["image"]) for g in self.generated])
            save_image(grid, directory / self.grid_file)
            sampling = dict(getattr(pl_module, "hparams", {}).get("sampling", {}))
            write_json_atomically(
                directory / (Path(self.grid_file).stem + ".json"),
                {
                    "layout": "each column: ground truth (top) and generated (bottom)",
                    "sampling": sampling,
                    "prompts": [{"record_id": g["record_id"], "prompt": g["prompt"]} for g in self.generated],
                },
            )
            print(f"wrote {directory / self.grid_file}")
