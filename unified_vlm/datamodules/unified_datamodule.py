"""The mixing DataModule: task streams -> tokenised, collated batches for a unified VLM.

Training data is either streamed (watches rendered on the fly, the default: no files needed)
or read from a LLaVA-schema JSON/JSONL file, so any dataset in that schema is trainable.
``mode`` picks the paper's regimes: ``mixed`` (all tasks), ``understanding`` (vqa + caption) or
``generation``, and ``test_mode`` which tasks the test split scores (default: ``mode``'s);
``proportions`` reweights tasks inside the mix; ``curriculum`` trains the first steps on easier
records of the same watches (``curriculum.Curriculum``); ``variant`` picks a dataset
variant of the experiments (data scaling, knowledge transfer, fixed layout, style and wording;
see ``variants.DataVariant`` and docs/data.md).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
from typing import Any, Callable, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from unified_vlm.datamodules.curriculum import Curriculum, CurriculumError, StreamChain
from unified_vlm.datamodules.variants import DataVariant, VariantError

log = logging.getLogger(__name__)

MODES = {
    "mixed": ("generation", "vqa", "caption"),
    "understanding": ("vqa", "caption"),
    "generation": ("generation",),
}
TEST_TASKS = ("generation", "vqa", "caption")  # captions are scored too (never by the paper, docs/paper.md 4.2)


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

    def __getitem__(self, index: int | tuple[int, torch.Tensor]) -> dict:
        """Record ``index``; ``(index, step_counts)`` (``TaskMixSampler`` with a ``counter``) also
        sets ``record['step_counts']``."""
        index, step_counts = index if isinstance(index, tuple) else (index, None)
        record = dict(self.records[index])
        record["image"] = pil_to_tensor(record["image"])
        if step_counts is not None:
            record["step_counts"] = step_counts
        return record

    def text_record(self, index: int) -> dict:
        """Record ``index`` without rendering or reading its image."""
        base = self.records
        return base.record(index) if hasattr(base, "task") else base.records[index]

    def tasks(self) -> list[str]:
        """The task of every item, without rendering or reading images."""
        base = self.records
        if hasattr(base, "task"):  # a WatchStream or a StreamChain of them
            return [base.task(i) for i in range(len(base))]
        return [r["task"] for r in base.records]

    def text_lengths(self) -> list[int]:
        """Characters of conversation text per item (a proxy for its token count), without images."""
        records = (self.text_record(i) for i in range(len(self)))
        return [sum(len(turn["value"]) for turn in r["conversations"]) for r in records]


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


class TaskMixSampler(DistributedSampler):
    """Shuffled record order with per-task weights and, optionally, task-homogeneous batches.

    ``proportions`` (task -> weight) draws each epoch's ``len(tasks)`` records with replacement
    in those proportions; without it every record is used once. ``chunk`` > 1 groups the order
    into runs of ``chunk`` records of one task (each task's remainder run comes at the end of the
    epoch, where the last few batches may mix tasks), so a batch holds one task and is padded only to
    that task's lengths (short VQA prompts are not padded to the length of image-generation
    sequences). Reshuffled by set_epoch.

    ``lengths`` with ``length_pool`` > 1 (needs chunk > 1) also groups by length, as Hugging Face's
    ``group_by_length``: each run of ``length_pool`` chunks of one task is sorted by length and
    cut again, so a batch holds records of similar length (VQA records of 1 to 4 turns are padded
    to their neighbours', not to the longest of a random draw). The chunks are still shuffled.

    Distributed (``num_replicas`` > 1): every rank draws the same global order and takes its
    ``batch_size`` slice of each global batch of ``batch_size x num_replicas`` records, so the
    ranks together see exactly the batches one process would (one task per optimiser step with
    chunk = micro batch x ranks x accumulation, as ``UnifiedDataModule`` sets it); the order is padded from its start to whole global batches so every
    rank makes the same number of steps. It subclasses ``DistributedSampler`` only so that
    Lightning does not wrap it in its own distributed sampler (which would reshuffle the mix).

    ``resume_from(epoch, start)`` skips the first ``start`` indices of this rank's order in that
    epoch: a run resumed from a mid-epoch checkpoint continues the data where it stopped.

    ``prefix`` (a curriculum, ``curriculum.Curriculum``): indices that replace the first
    ``len(prefix)`` positions of epoch 0's global order; the epoch keeps its length.

    ``counter`` (index -> tensor of counts, e.g. the supervised tokens, turns and image slots of a
    record) makes the sampler yield ``(index, step counts)``: the counts summed over the optimiser
    step the index belongs to, ``batch_size x num_replicas x accumulate`` records of the global
    order. Under gradient accumulation the model needs them to average its losses over the whole
    step (``losses.global_batch_means``), and no micro-batch can know them otherwise.
    """

    def __init__(self, tasks: list[str], proportions: Optional[dict[str, float]] = None, chunk: int = 1, seed: int = 0,
                 lengths: Optional[list[int]] = None, length_pool: int = 1, batch_size: int = 1,
                 num_replicas: int = 1, rank: int = 0, prefix: Optional[list[int]] = None, accumulate: int = 1,
                 counter: Optional[Callable[[int], torch.Tensor]] = None) -> None:
        if lengths is not None and len(lengths) != len(tasks):
            raise ValueError(f"lengths has {len(lengths)} entries for {len(tasks)} records")
        if length_pool < 1:
            raise ValueError(f"length_pool must be >= 1, got {length_pool}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(tasks, num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        self.tasks, self.proportions, self.chunk, self.seed, self.epoch = tasks, proportions, max(1, chunk), seed, 0
        self.batch_size, self.accumulate, self.counter = batch_size, accumulate, counter
        self.lengths = torch.tensor(lengths) if lengths is not None else None
        self.length_pool = length_pool
        self.by_task: dict[str, list[int]] = {}
        for index, task in enumerate(tasks):
            self.by_task.setdefault(task, []).append(index)
        self._resume: Optional[tuple[int, int]] = None
        self.prefix = list(prefix or [])
        if len(self.prefix) > len(tasks):
            raise ValueError(f"a prefix of {len(self.prefix)} records is longer than the epoch of {len(tasks)} records")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_from(self, epoch: int, start: int) -> None:
        self._resume = (epoch, start)

    def __len__(self) -> int:
        if self.num_replicas == 1:
            return len(self.tasks)
        span = self.batch_size * self.num_replicas
        return math.ceil(len(self.tasks) / span) * self.batch_size

    def _draw(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.proportions is None:
            return {t: torch.tensor(ix)[torch.randperm(len(ix), generator=generator)] for t, ix in self.by_task.items()}
        total = sum(self.proportions.get(t, 0.0) for t in self.by_task)
        picks = torch.multinomial(
            torch.tensor([self.proportions.get(t, 0.0) / total for t in self.by_task]), len(self.tasks), replacement=True, generator=generator
        )
        out = {}
        for k, (task, ix) in enumerate(self.by_task.items()):
            n = int((picks == k).sum())
            out[task] = torch.tensor(ix)[torch.randint(len(ix), (n,), generator=generator)]
        return out

    def global_order(self) -> list[int]:
        """This epoch's order as one process sees it (every rank computes the same)."""
        order = self._shuffled_order()
        if self.epoch == 0 and self.prefix:
            order = self.prefix + order[len(self.prefix):]
        return order

    def _shuffled_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + 1000003 * self.epoch)
        drawn = self._draw(generator)
        if self.chunk == 1:
            order = torch.cat(list(drawn.values()))
            return order[torch.randperm(len(order), generator=generator)].tolist()
        if self.lengths is not None and self.length_pool > 1:
            drawn = {task: self._sort_pools(ix) for task, ix in drawn.items()}
        chunks = [ix[i:i + self.chunk] for ix in drawn.values() for i in range(0, len(ix), self.chunk)]
        full = [c for c in chunks if len(c) == self.chunk]
        partial = [c for c in chunks if len(c) < self.chunk]  # last, so they cannot shift later batches
        order = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()] + partial
        return [i for c in order for i in c.tolist()]

    def __iter__(self):
        order = full = self.global_order()
        span = self.batch_size * self.num_replicas
        if self.num_replicas > 1:
            total = len(self) * self.num_replicas  # whole global batches, padded from the start
            order = full = (order * math.ceil(total / max(1, len(order))))[:total]
            mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            order = [i for g in range(0, len(order), span) for i in order[g:g + span][mine]]
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
            self._resume = None
        return iter(order[start:]) if self.counter is None else self._with_step_counts(order, full, start)

    def _with_step_counts(self, order: list[int], full: list[int], start: int):
        """``(index, counts of its optimiser step)`` for this rank's ``order[start:]``; each step's
        counts are summed over its records of the global order ``full`` when the step is reached."""
        mine, everyone = self.batch_size * self.accumulate, self.batch_size * self.num_replicas * self.accumulate
        step, counts = -1, None
        for position in range(start, len(order)):
            if position // mine != step:
                step = position // mine
                counts = sum(self.counter(i) for i in full[step * everyone:(step + 1) * everyone])
            yield order[position], counts

    def _sort_pools(self, ix: torch.Tensor) -> torch.Tensor:
        """Sort each run of ``length_pool * chunk`` indices by length (stable, so ties keep the shuffle)."""
        pool = self.length_pool * self.chunk
        parts = []
        for start in range(0, len(ix), pool):
            part = ix[start:start + pool]
            parts.append(part[torch.argsort(self.lengths[part], stable=True)])
        return torch.cat(parts) if parts else ix


def _record_counts(chat_format, dataset: TensorImages, index: int) -> torch.Tensor:
    return torch.tensor(chat_format.supervised_counts(dataset.text_record(index)))


def list_collate(records: list[dict]) -> list[dict]:
    return records


def _checked_variant(variant: Any, mode: str, record_files: dict[str, Optional[str]]) -> DataVariant:
    """The typed variant, refused when ``mode`` would drop what it adds or a split it changes is read from a file."""
    variant = DataVariant.coerce(variant)
    variant.check(MODES[mode])
    for split, records in record_files.items():
        if records is not None and variant.changes(split):
            raise VariantError(f"data.variant changes the {split} split, which data.{split}_records reads from a file; "
                               f"materialise the variant with `python -m unified_vlm data --variant` or unset data.{split}_records")
    return variant


class UnifiedDataModule(L.LightningDataModule):
    """Mixes generation / vqa / caption records and collates them for the model.

    The collator batches records in the chat format (tokenizer, tokens per image) of the model
    attached to the trainer, so the data and the model never disagree; pass ``collator`` to use the
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
        allow_images_outside_root: bool = False,  # absolute image paths, or ones leaving image_root (docs/data.md)
        num_train_watches: int = 20000,
        num_val_watches: int = 64,
        num_test_watches: int = 200,
        seed: int = 0,
        image_size: int = 64,
        paper_hours: bool = False,
        global_batch_size: int = 32,
        group_by_task: bool = False,
        length_pool: int = 1,
        eval_batch_size: int = 50,
        num_workers: int = 1,
        variant: Optional[DataVariant] = None,
        curriculum: Optional[Curriculum] = None,
        test_mode: Optional[str] = None,
        collator: Any = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"data.mode must be one of {sorted(MODES)}, got {mode!r}")
        if test_mode is not None and test_mode not in MODES:
            raise ValueError(f"data.test_mode must be null (the tasks of data.mode) or one of {sorted(MODES)}, got {test_mode!r}")
        if proportions is not None:
            unknown = set(proportions) - set(MODES[mode])
            if unknown:
                raise ValueError(
                    f"data.proportions names task(s) {sorted(unknown)} that mode {mode!r} excludes; tasks: {MODES[mode]}. "
                    "Set data.proportions to null (every record once) or to weights over those tasks"
                )
            if any(v < 0 for v in proportions.values()) or sum(proportions.values()) <= 0:
                raise ValueError(f"data.proportions must be non-negative with a positive sum, got {proportions}")
        self.variant = _checked_variant(variant, mode, {"train": train_records, "val": val_records, "test": test_records})
        variant = None if self.variant.is_default() else self.variant.to_dict()  # plain data in the hyper-parameters
        self.curriculum = Curriculum.coerce(curriculum)
        self.curriculum.check(MODES[mode], mode)
        if self.curriculum.steps and train_records is not None:
            raise CurriculumError(f"data.curriculum writes its own records of the streamed training watches, and data.train_records "
                                  f"reads {train_records}; unset one of them (--data.curriculum null trains on the file alone)")
        curriculum = self.curriculum.to_dict()
        self.save_hyperparameters(ignore=["collator"])
        self.mode, self.proportions = mode, proportions
        self.collator = collator
        self.datasets: dict[str, Dataset] = {}
        self._resume: Optional[dict[str, int]] = None

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
            dataset = RecordDataset(records, tasks=list(tasks), image_root=h.image_root, image_size=h.image_size,
                                    allow_outside_root=h.allow_images_outside_root)
            if self.collator is not None and hasattr(self.collator, "num_tokens"):  # too long: say so now, not at its batch
                dataset.check_lengths(self.collator.num_tokens, self.collator.max_length)
            return TensorImages(dataset)
        return TensorImages(WatchStream(split=split, num_watches=num_watches, seed=h.seed, image_size=h.image_size, tasks=tasks,
                                        paper_hours=h.paper_hours, variant=self.variant))

    def setup(self, stage: Optional[str] = None) -> None:
        h = self.hparams
        if self.collator is None:
            from unified_vlm.datamodules.collate import ConversationCollator

            model = self.trainer.lightning_module if self.trainer is not None else None
            if model is None or not hasattr(model, "chat_format"):
                raise ValueError("UnifiedDataModule needs a collator: attach it to a trainer with a UnifiedVLM or pass collator=")
            self.collator = ConversationCollator.for_model(model)
        tasks = MODES[self.mode]
        if stage in ("fit", None):
            self.datasets["train"] = self._dataset("train", h.train_records, h.num_train_watches, tasks)
            if self.curriculum.steps:
                self.datasets["train"] = TensorImages(StreamChain(self.datasets["train"].records, self._curriculum_stream(tasks)))
            self.datasets["val"] = self._dataset("val", h.val_records, h.num_val_watches, tasks)
        if stage in ("fit", "validate", None) and "val" not in self.datasets:
            self.datasets["val"] = self._dataset("val", h.val_records, h.num_val_watches, tasks)
        if stage in ("test", "predict", None):
            # test_mode: a model trained on one task can still be scored on all (staged training, docs/paper.md 5.4)
            test_tasks = tuple(t for t in TEST_TASKS if t in MODES[h.test_mode or self.mode])
            self.datasets["test"] = self._dataset("test", h.test_records, h.num_test_watches, test_tasks)
        if stage == "predict" and h.predict_prompts is not None:
            from unified_vlm.datamodules.records import check_prompt_lengths

            prompts = PromptDataset(h.predict_prompts)
            check_prompt_lengths([(f"{h.predict_prompts}: line {n}", prompts[i]) for i, (n, _) in enumerate(prompts.prompts)],
                                 self.collator)  # too long: say so now, naming the line, as training does
            self.datasets["predict"] = prompts

    def _curriculum_stream(self, tasks):
        """The training watches again, in the curriculum's prompts and questions."""
        from unified_vlm.datamodules.streams import WatchStream

        h, c = self.hparams, self.curriculum
        style = dataclasses.replace(self.variant.train, prompts=c.prompts, questions=c.questions)
        return WatchStream(split="train", num_watches=h.num_train_watches, seed=h.seed, image_size=h.image_size, tasks=tasks,
                           paper_hours=h.paper_hours, variant=dataclasses.replace(self.variant, train=style))

    def _sampler(self, dataset: TensorImages) -> TaskMixSampler:
        """The training order: always our own sampler, so DDP keeps the mix and resume can skip."""
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        micro = self.micro_batch_size()
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        chunk = micro * world * accumulate if self.hparams.group_by_task else 1  # one task per optimiser step
        by_length = self.hparams.group_by_task and self.hparams.length_pool > 1
        tasks = dataset.tasks()
        lengths = dataset.text_lengths() if by_length else None
        prefix = None
        if self.curriculum.steps:
            main = len(dataset.records.first)
            stage_proportions = self.curriculum.proportions_for(MODES[self.mode]) or self.proportions
            stage = TaskMixSampler(tasks[main:], stage_proportions, chunk=chunk, seed=self.hparams.seed + 1,
                                   lengths=lengths[main:] if lengths else None, length_pool=self.hparams.length_pool)
            needed = self.curriculum.steps * self.hparams.global_batch_size
            if needed > main:
                raise CurriculumError(f"data.curriculum.steps={self.curriculum.steps} x data.global_batch_size="
                                      f"{self.hparams.global_batch_size} = {needed} records, more than the first epoch's {main}; "
                                      "lower data.curriculum.steps or raise data.num_train_watches")
            prefix = [main + i for i in stage.global_order()[:needed]]
            tasks, lengths = tasks[:main], lengths[:main] if lengths else None
        sampler = TaskMixSampler(tasks, self.proportions, chunk=chunk, seed=self.hparams.seed, lengths=lengths,
                                 length_pool=self.hparams.length_pool, batch_size=micro, num_replicas=world, rank=rank, prefix=prefix,
                                 accumulate=accumulate, counter=self._counter(dataset) if accumulate > 1 else None)
        if self._resume is not None:
            epoch, consumed = self._resume["epoch"], self._resume["records_consumed"]
            span = micro * world
            if consumed % span:
                log.warning("resume: %d records were consumed with another batch layout; continuing at a whole batch", consumed)
            sampler.resume_from(epoch, (consumed // span) * micro)
            self._resume = None
        return sampler

    def _counter(self, dataset: TensorImages) -> Callable[[int], torch.Tensor]:
        """Record index -> its (supervised tokens, assistant turns, image slots): what the model
        averages its losses over, counted from the text (``ChatFormat.supervised_counts``)."""
        return functools.partial(_record_counts, self.collator.chat_format, dataset)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the data, saved in every checkpoint: the epoch, the records the
        optimiser has consumed in it (over all ranks) and the global RNG states (prompt dropout)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {
            "epoch": trainer.current_epoch,
            "records_consumed": processed * self.micro_batch_size() * trainer.world_size,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the next training loader skips what the checkpointed run had consumed."""
        if not state_dict or "records_consumed" not in state_dict:
            return
        self._resume = {"epoch": int(state_dict["epoch"]), "records_consumed": int(state_dict["records_consumed"])}
        rng = state_dict.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "python" in rng:
            random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))

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
        collate = functools.partial(self.collator, training=True)  # training-only transforms (prompt dropout)
        return self._loader(ds, self.micro_batch_size(), True, collate, self._sampler(ds))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"], self.micro_batch_size(), False, self.collator)

    def _evaluation_sampler(self, dataset) -> Optional[DistributedSampler]:
        """Under DDP, each record on exactly one rank (no padding), so no test item is scored twice.

        Lightning's own test sampler pads every rank to the same length by repeating the first
        records, which would count them twice in the gathered scores. Evaluation needs no collective
        call per batch, so ranks may take different numbers of batches.
        """
        trainer = getattr(self, "trainer", None)
        world = getattr(trainer, "world_size", 1) if trainer is not None else 1
        if world <= 1:
            return None
        return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=trainer.global_rank, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        ds = self.datasets["test"]
        return self._loader(ds, self.hparams.eval_batch_size, False, list_collate, self._evaluation_sampler(ds))

    def predict_dataloader(self) -> DataLoader:
        dataset = self.datasets.get("predict", self.datasets["test"])
        return self._loader(dataset, self.hparams.eval_batch_size, False, list_collate)
