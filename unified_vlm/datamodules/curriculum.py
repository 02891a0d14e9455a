"""A warm-up stage of easier training data before the configured mix (``data.curriculum``).

A fresh tiny model learns each binding quickly when the data isolates it, and slowly inside the
paper's mix: corner questions among the four other question kinds sit on a plateau for thousands of
steps, and generation prompts that state each attribute half the time leave half the image loss
to chance (docs/results.md, "What makes a tiny model follow its prompt"). A curriculum trains the
first ``steps`` optimizer steps on records of the same training watches in an easier style
(every attribute stated in the generation prompts, corner questions only) and in its own task
proportions, then the configured data takes over.

The stage is a prefix of the first epoch's order: the sampler's epoch keeps its length, and the
first ``steps x global_batch_size`` positions of epoch 0 come from the curriculum's stream, so
exact resume and DDP slicing work as for any other order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from unified_vlm.datamodules.templates import PROMPTS, QUESTION_MIXES

KEY = "data.curriculum"


class CurriculumError(ValueError):
    """A curriculum that cannot be built; the message names the config key to change."""


@dataclass(frozen=True)
class Curriculum:
    """The warm-up stage (see the module doc).

    Args:
        steps: optimizer steps trained on the curriculum's data (0: no curriculum).
        proportions: task weights during the stage (default: ``data.proportions``); tasks that
            ``data.mode`` does not train are left out, so one config serves every regime.
        prompts: generation prompts during the stage: ``all`` (every attribute stated) or ``paper``.
        questions: VQA turns during the stage: ``position`` (corner questions only) or ``paper``.
    """

    steps: int = 0
    proportions: Optional[dict[str, float]] = None
    prompts: str = "all"
    questions: str = "position"

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise CurriculumError(f"{KEY}.steps: a non-negative number of optimizer steps, got {self.steps!r}")
        if self.prompts not in PROMPTS:
            raise CurriculumError(f"{KEY}.prompts: unknown value {self.prompts!r}; expected one of {list(PROMPTS)}")
        if self.questions not in QUESTION_MIXES:
            raise CurriculumError(f"{KEY}.questions: unknown value {self.questions!r}; expected one of {list(QUESTION_MIXES)}")
        if self.proportions is not None:
            if not isinstance(self.proportions, Mapping):
                raise CurriculumError(f"{KEY}.proportions: a mapping task -> weight, got {self.proportions!r}")
            if any(not isinstance(v, (int, float)) or v < 0 for v in self.proportions.values()) or sum(self.proportions.values()) <= 0:
                raise CurriculumError(f"{KEY}.proportions: non-negative weights with a positive sum, got {self.proportions}")

    @classmethod
    def coerce(cls, value: Any) -> "Curriculum":
        """A Curriculum from ``None``, a mapping (unknown keys named) or a Curriculum."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise CurriculumError(f"{KEY}: expected a mapping of {[f.name for f in dataclasses.fields(cls)]}, got {value!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in value if k not in known]
        if unknown:
            raise CurriculumError(f"{KEY}: unknown key(s) {unknown}; known keys: {known}")
        return cls(**value)

    def check(self, tasks: tuple[str, ...], mode: str) -> None:
        """Refuse proportions that keep none of the tasks ``data.mode`` trains (see ``proportions_for``)."""
        if self.steps and self.proportions is not None and not self.proportions_for(tasks):
            raise CurriculumError(f"{KEY}.proportions {dict(self.proportions)} weighs only task(s) that data.mode={mode!r} excludes; "
                                  f"tasks: {list(tasks)}")

    def proportions_for(self, tasks: tuple[str, ...]) -> Optional[dict[str, float]]:
        """The stage's proportions over the tasks a run trains: a task-specific run of a shared config
        keeps its own tasks' weights (an understanding-only run warms up on corner questions alone).
        ``None``: ``data.proportions`` applies."""
        if self.proportions is None:
            return None
        return {task: weight for task, weight in self.proportions.items() if task in tasks and weight > 0}

    def to_dict(self) -> Optional[dict]:
        """Plain data for the hyper-parameters; ``None`` when there is no curriculum."""
        return dataclasses.asdict(self) if self.steps else None


class StreamChain(torch.utils.data.Dataset):
    """Two record streams as one dataset: items ``0..len(first)-1`` are ``first``'s, then ``second``'s.

    It answers ``task(i)`` and ``record(i)`` as a ``WatchStream`` does, so the sampler can group
    by task and length without rendering.
    """

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def _part(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        return (self.first, i) if i < len(self.first) else (self.second, i - len(self.first))

    def task(self, i: int) -> str:
        stream, j = self._part(i)
        return stream.task(j)

    def record(self, i: int) -> dict:
        stream, j = self._part(i)
        return stream.record(j)

    def __getitem__(self, i: int) -> dict:
        stream, j = self._part(i)
        return stream[j]
