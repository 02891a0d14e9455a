"""The mixing DataModule: task streams -> tokenised, collated batches for a unified VLM.

Training data is either streamed (watches rendered on the fly, the default: no files needed)
or read from a LLaVA-schema JSON/JSONL file, so any dataset in that schema is trainable.
``mode`` picks the paper's regimes: ``mixed`` (all tasks), ``understanding`` (vqa + caption) or
``generation``; ``proportions`` reweights tasks inside the mix.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

log = logging.getLogger(__name__)

MODES = {
    "mixed": ("generation", "vqa", "caption"),
    "understanding": ("vqa", "caption"),
    "generation": ("generation",),
}
TEST_TASKS = ("generation", "vqa")  # captions are never scored (PAPER.md 4.2)


def pil_to_tensor(image) -> torch.Tensor:
    """PIL RGB -> float tensor (3,H,W) in [0,1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class TensorImages(Dataset):
    """Wraps a record dataset so that ``record['image']`` is a float tensor instead of a PIL image."""

    def __init__(self, records: Dataset) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = dict(self.records[index])
        record["image"] = pil_to_tensor(record["image"])
        return record

    def tasks(self) -> list[str]:
        base = self.records
        if hasattr(base, "record"):
            return [base.record(i)["task"] for i in range(len(base))]
        return [r["task"] for r in base.records]


class PromptDataset(Dataset):
    """Generation prompts from a text file, one per line (blank lines and '#' comments skipped)."""

    def __init__(self, path: str) -> None:
        from pathlib import Path

        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"data.predict_prompts: no file {file}")
        lines = [(n, line.strip()) for n, line in enumerate(file.read_text().splitlines(), 1)]
        self.prompts = [(n, text) for n, text in lines if text and not text.startswith("#")]
        if not self.prompts:
            raise ValueError(f"data.predict_prompts: {file} holds no prompt")
        for n, text in self.prompts:
            if "<image>" in text:
                raise ValueError(f"{file}: line {n}: a generation prompt must not contain <image>")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        line, text = self.prompts[index]
        return {
            "id": f"prompt-{line:05d}",
            "task": "generation",
            "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "<image>"}],
            "image": None,
        }


def list_collate(records: list[dict]) -> list[dict]:
    return records


class UnifiedDataModule(L.LightningDataModule):
    """Mixes generation / vqa / caption records and collates them for the model.

    The collator (chat template, tokenizer, tokens per image) comes from the model attached to
    the trainer, so the data and the model never disagree; pass ``collator`` to use the
    DataModule on its own.
    """

    def __init__(
        self,
        mode: str = "mixed",
        proportions: Optional[dict[str, float]] = None,
        train_records: Optional[str] = None,
        val_records: Optional[str] = None,
        test_records: Optional[str] = None,
        predict_prompts: Optional[str] = None,
        image_root: Optional[str] = None,
        num_train_watches: int = 20000,
        num_val_watches: int = 64,
        num_test_watches: int = 200,
        seed: int = 0,
        image_size: int = 64,
        paper_hours: bool = False,
        global_batch_size: int = 32,
        eval_batch_size: int = 50,
        num_workers: int = 1,
        collator: Any = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"data.mode must be one of {sorted(MODES)}, got {mode!r}")
        if proportions is not None:
            unknown = set(proportions) - set(MODES[mode])
            if unknown:
                raise ValueError(f"data.proportions names task(s) {sorted(unknown)} that mode {mode!r} excludes; tasks: {MODES[mode]}")
            if any(v < 0 for v in proportions.values()) or sum(proportions.values()) <= 0:
                raise ValueError(f"data.proportions must be non-negative with a positive sum, got {proportions}")
        self.save_hyperparameters(ignore=["collator"])
        self.mode, self.proportions = mode, proportions
        self.collator = collator
        self.datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ sizes
    def micro_batch_size(self) -> int:
        """Per-device batch = global batch / (world size x gradient accumulation)."""
        world, accumulate = 1, 1
        if self.trainer is not None:
            world = self.trainer.world_size
            accumulate = self.trainer.accumulate_grad_batches
        per_step = world * accumulate
        if self.hparams.global_batch_size % per_step:
            raise ValueError(
                f"data.global_batch_size={self.hparams.global_batch_size} is not divisible by world_size ({world}) "
                f"x accumulate_grad_batches ({accumulate})"
            )
        return self.hparams.global_batch_size // per_step

    # ------------------------------------------------------------------ datasets
    def _dataset(self, split: str, records: Optional[str], num_watches: int, tasks) -> Dataset:
        from unified_vlm.datamodules.records import RecordDataset
        from unified_vlm.datamodules.streams import WatchStream

        h = self.hparams
        if records is not None:
            return TensorImages(RecordDataset(records, tasks=list(tasks), image_root=h.image_root, image_size=h.image_size))
        return TensorImages(
            WatchStream(split=split, num_watches=num_watches, seed=h.seed, image_size=h.image_size, tasks=tasks, paper_hours=h.paper_hours)
        )

    def setup(self, stage: Optional[str] = None) -> None:
        h = self.hparams
        if self.collator is None:
            model = self.trainer.lightning_module if self.trainer is not None else None
            if model is None or not hasattr(model, "collator"):
                raise ValueError("UnifiedDataModule needs a collator: attach it to a trainer with a UnifiedVLM or pass collator=")
            self.collator = model.collator
        tasks = MODES[self.mode]
        if stage in ("fit", None):
            self.datasets["train"] = self._dataset("train", h.train_records, h.num_train_watches, tasks)
            self.datasets["val"] = self._dataset("val", h.val_records, h.num_val_watches, tasks)
        if stage in ("fit", "validate", None) and "val" not in self.datasets:
            self.datasets["val"] = self._dataset("val", h.val_records, h.num_val_watches, tasks)
        if stage in ("test", "predict", None):
            test_tasks = tuple(t for t in TEST_TASKS if t in tasks)
            self.datasets["test"] = self._dataset("test", h.test_records, h.num_test_watches, test_tasks)
        if stage == "predict" and h.predict_prompts is not None:
            self.datasets["predict"] = PromptDataset(h.predict_prompts)

    def _sampler(self, dataset: TensorImages) -> Optional[WeightedRandomSampler]:
        if self.proportions is None:
            return None
        tasks = dataset.tasks()
        counts = {t: tasks.count(t) for t in set(tasks)}
        weights = torch.tensor([self.proportions.get(t, 0.0) / counts[t] for t in tasks], dtype=torch.double)
        gen = torch.Generator().manual_seed(self.hparams.seed)
        return WeightedRandomSampler(weights, num_samples=len(tasks), replacement=True, generator=gen)

    def _loader(self, dataset, batch_size, shuffle, collate_fn, sampler=None) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=collate_fn,
            num_workers=workers,
            persistent_workers=workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        return self._loader(ds, self.micro_batch_size(), True, self.collator, self._sampler(ds))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"], self.micro_batch_size(), False, self.collator)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], self.hparams.eval_batch_size, False, list_collate)

    def predict_dataloader(self) -> DataLoader:
        dataset = self.datasets.get("predict", self.datasets["test"])
        return self._loader(dataset, self.hparams.eval_batch_size, False, list_collate)
