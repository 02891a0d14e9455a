"""Watch records generated on the fly: no files, and exactly what ``materialize`` would write.

Item ``i`` is watch ``i // len(tasks)`` and task ``tasks[i % len(tasks)]``, so the order of items
matches the records file written by ``materialize`` for the same arguments, and the result of an
item depends on nothing but the constructor arguments and ``i``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from unified_vlm.datamodules.templates import TASKS, build_task_record
from unified_vlm.datamodules.watch import WatchAttributes, render_watch, sample_watch


def canonical_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """``tasks`` in the fixed order generation, vqa, caption, rejecting unknown names and duplicates."""
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a sequence of task names, not the string {tasks!r}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {TASKS}")
    if len(set(tasks)) != len(tasks) or not tasks:
        raise ValueError(f"tasks must be a non-empty list without repeats, got {list(tasks)}")
    return tuple(t for t in TASKS if t in tasks)


def image_relpath(index: int) -> str:
    return f"images/{index:06d}.png"


def watch_id(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


class WatchStream(torch.utils.data.Dataset):
    """Smart-watch records rendered on demand; items have the same form as ``RecordDataset``'s."""

    def __init__(
        self,
        split: str = "train",
        num_watches: int = 60000,
        seed: int = 0,
        image_size: int = 224,
        tasks: Sequence[str] = TASKS,
        paper_hours: bool = False,
    ) -> None:
        if num_watches < 1:
            raise ValueError(f"num_watches must be at least 1, got {num_watches}")
        self.split = split
        self.num_watches = num_watches
        self.seed = seed
        self.image_size = image_size
        self.tasks = canonical_tasks(tasks)
        self.paper_hours = paper_hours

    def __len__(self) -> int:
        return self.num_watches * len(self.tasks)

    def attributes(self, watch: int) -> WatchAttributes:
        return sample_watch(self.seed, self.split, watch, paper_hours=self.paper_hours)

    def record(self, i: int) -> dict:
        """The JSON-serialisable record of item ``i``, without rendering its image."""
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        watch, task = divmod(i, len(self.tasks))
        return build_task_record(
            self.attributes(watch),
            (self.seed, self.split, watch),
            self.tasks[task],
            image=image_relpath(watch),
            watch_id=watch_id(self.split, watch),
            watch_index=watch,
        )

    def __getitem__(self, i: int) -> dict:
        record = self.record(i)
        return {
            "id": record["id"],
            "task": record["task"],
            "conversations": record["conversations"],
            "image": render_watch(WatchAttributes.from_dict(record["attributes"]), self.image_size),
            "image_path": record["image"],
            "attributes": record["attributes"],
        }
