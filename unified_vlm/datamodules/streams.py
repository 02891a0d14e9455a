"""Watch records generated on the fly: no files, and exactly what ``materialize`` would write.

Item ``i`` is watch ``i // len(tasks)`` and task ``tasks[i % len(tasks)]``, so the order of items
matches the records file written by ``materialize`` for the same arguments, and the result of an
item depends on nothing but the constructor arguments and ``i``. Extra watches of a data-scaling
variant come after the base watches (see ``WatchStream``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from unified_vlm.datamodules.templates import TASKS, build_task_record
from unified_vlm.datamodules.variants import UNDERSTANDING_TASKS, DataVariant
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


def extra_split(split: str, task: str) -> str:
    """The stream key of a split's extra watches, e.g. ``train+generation``: never a base watch."""
    return f"{split}+{task}"


class WatchStream(torch.utils.data.Dataset):
    """Smart-watch records rendered on demand; items have the same form as ``RecordDataset``'s.

    ``variant`` (a ``DataVariant``) changes the data as documented there; with the default variant
    the records and pictures are the standard ones. Under a variant the train split holds the
    ``num_watches`` base watches (items ``0 .. num_watches * len(tasks) - 1``, as without it)
    followed by the extra watches, each with the extra tasks that ``tasks`` keeps.
    """

    def __init__(
        self,
        split: str = "train",
        num_watches: int = 60000,
        seed: int = 0,
        image_size: int = 224,
        tasks: Sequence[str] = TASKS,
        paper_hours: bool = False,
        variant: DataVariant | None = None,
    ) -> None:
        if num_watches < 1:
            raise ValueError(f"num_watches must be at least 1, got {num_watches}")
        self.split = split
        self.num_watches = num_watches
        self.seed = seed
        self.image_size = image_size
        self.tasks = canonical_tasks(tasks)
        self.paper_hours = paper_hours
        self.variant = DataVariant.coerce(variant)
        self.style = self.variant.style(split)
        self.watch_style = self.style.watch_style()
        self.bias = self.variant.bias_for(split)
        extra = self.variant.extra_for(split)
        self.extra_tasks = tuple(t for t in self.tasks if extra is not None and t in extra.tasks)
        if extra is not None:
            self.variant.check(self.tasks, mode_key="tasks")
        self.num_extra_watches = extra.num_watches(num_watches) if self.extra_tasks else 0
        self.extra_split = extra_split(split, extra.task) if extra is not None else None

    def __len__(self) -> int:
        return self.num_watches * len(self.tasks) + self.num_extra_watches * len(self.extra_tasks)

    def attributes(self, watch: int) -> WatchAttributes:
        """The (unbiased) attributes of base watch ``watch``."""
        return sample_watch(self.seed, self.split, watch, paper_hours=self.paper_hours, layout=self.style.layout)

    def _locate(self, i: int) -> tuple[str, int, str]:
        """(stream key, watch index, task) of item ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        base = self.num_watches * len(self.tasks)
        if i < base:
            watch, task = divmod(i, len(self.tasks))
            return self.split, watch, self.tasks[task]
        watch, task = divmod(i - base, len(self.extra_tasks))
        return self.extra_split, watch, self.extra_tasks[task]

    def task(self, i: int) -> str:
        """The task of item ``i``, without building its record."""
        return self._locate(i)[2]

    def record(self, i: int) -> dict:
        """The JSON-serialisable record of item ``i``, without rendering its image."""
        stream, watch, task = self._locate(i)
        extra = stream != self.split
        attrs = sample_watch(self.seed, stream, watch, paper_hours=self.paper_hours, layout=self.style.layout)
        image = f"images/extra/{watch:06d}.png" if extra else image_relpath(watch)
        if self.bias is not None and task in UNDERSTANDING_TASKS:
            biased = self.bias.apply(attrs, (self.seed, stream, watch))
            if biased != attrs:  # a changed watch gets its own picture; the generation record keeps the original
                attrs, image = biased, image.replace(".png", "-biased.png")
        record = build_task_record(
            attrs, (self.seed, stream, watch), task, image=image, watch_id=watch_id(stream, watch), watch_index=watch,
            wording=self.style.wording, prompts=self.style.prompts, questions=self.style.questions,
        )
        if extra:
            record["stream"] = stream
        return record

    def render(self, record: dict):
        """The picture of ``record`` in this split's style."""
        return render_watch(WatchAttributes.from_dict(record["attributes"]), self.image_size, self.watch_style)

    def __getitem__(self, i: int) -> dict:
        record = self.record(i)
        return {
            "id": record["id"],
            "task": record["task"],
            "conversations": record["conversations"],
            "image": self.render(record),
            "image_path": record["image"],
            "attributes": record["attributes"],
        }
