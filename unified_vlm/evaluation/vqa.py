"""Smart-watch VQA scoring, following docs/paper.md section 4.2 rule by rule.

Answers are free text from a generator (e.g. "<s> 07:13:07</s>"), so every scorer searches the
answer rather than comparing strings. The attribute is decided from the ground truth alone.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from unified_vlm.tokens import IMAGE_MARKER

ATTRIBUTES = ("time", "weather", "position", "battery")
WEATHER_WORDS = frozenset({"sunny", "raining", "cloudy"})

_TIME_RE = re.compile(r"(\d{2}):(\d{2}):(\d{2})")
# An integer 0..100 (not part of a longer number) directly followed by "%".
_BATTERY_RE = re.compile(r"(?<!\d)(100|\d{1,2})%")


def classify_ground_truth(gt: str) -> str | None:
    """Attribute of a ground-truth answer, checked in the paper's order (time, weather, position, battery)."""
    if ":" in gt:
        return "time"
    if gt in WEATHER_WORDS:
        return "weather"
    if "-" in gt:
        return "position"
    if "%" in gt:
        return "battery"
    return None


def _circular(a: int, b: int, period: int) -> int:
    """Distance on a clock face; reduced mod ``period`` so out-of-range answers (e.g. hour 23) stay in [0, period/2]."""
    d = abs(a - b) % period
    return min(d, period - d)


def score_time(gt: str, answer: str) -> float:
    """1 - (e_h/6 + e_m/30 + e_s/30)/3 with circular errors (hours over 12, so 00 and 12 are the same)."""
    g, a = _TIME_RE.search(gt), _TIME_RE.search(answer)
    if g is None or a is None:
        return 0.0
    (gh, gm, gs), (ah, am, as_) = [int(x) for x in g.groups()], [int(x) for x in a.groups()]
    e_h, e_m, e_s = _circular(gh, ah, 12), _circular(gm, am, 60), _circular(gs, as_, 60)
    return 1.0 - (e_h / 6 + e_m / 30 + e_s / 30) / 3


def score_weather(gt: str, answer: str) -> float:
    """1 if the weather word appears anywhere in the answer."""
    return float(gt in answer)


def score_position(gt: str, answer: str) -> float:
    """1 if the corner name (e.g. "top-left") appears anywhere in the answer."""
    return float(gt in answer)


def score_battery(gt: str, answer: str) -> float:
    """1 - |answer% - gt%| / 100 using the first 0..100 percentage in each; 0 if none."""
    g, a = _BATTERY_RE.search(gt), _BATTERY_RE.search(answer)
    if g is None or a is None:
        return 0.0
    return 1.0 - abs(int(a.group(1)) - int(g.group(1))) / 100


_SCORERS = {"time": score_time, "weather": score_weather, "position": score_position, "battery": score_battery}


def score_answer(
    question: str, gt: str, answer: str, image_conditioned: bool | None = None
) -> tuple[str, float] | None:
    """``(attribute, score)`` for a scorable question, else None.

    Scored only if the question is image-conditioned and the ground truth has no space (this
    skips captions). ``image_conditioned=None`` infers it from the question (the paper checks
    the prompt starts with "<"); pass True for later VQA turns, which do not repeat "<image>".
    """
    if image_conditioned is None:
        image_conditioned = IMAGE_MARKER in question or question.startswith("<")
    gt = gt.strip()
    if not image_conditioned or " " in gt:
        return None
    attribute = classify_ground_truth(gt)
    if attribute is None:
        return None
    return attribute, _SCORERS[attribute](gt, answer)


@dataclass
class VQAResult:
    """One scored question; kept so per-question results can be inspected after a run."""

    record_id: str
    turn: int
    question: str
    ground_truth: str
    answer: str
    attribute: str
    score: float


class VQAScorer:
    """Accumulates scored VQA turns; reports all turns and the paper's first-turn-only protocol."""

    def __init__(self) -> None:
        self.results: list[VQAResult] = []

    def add(
        self,
        record_id: str,
        turn: int,
        question: str,
        ground_truth: str,
        answer: str,
        image_conditioned: bool | None = None,
    ) -> VQAResult | None:
        """Score one turn; returns the result, or None if the rules skip it.

        By default turn 0 must contain "<image>" and later turns count as image-conditioned
        (they continue a conversation about the image).
        """
        if image_conditioned is None:
            image_conditioned = turn > 0 or IMAGE_MARKER in question or question.startswith("<")
        scored = score_answer(question, ground_truth, answer, image_conditioned=image_conditioned)
        if scored is None:
            return None
        result = VQAResult(str(record_id), int(turn), question, ground_truth, answer, scored[0], float(scored[1]))
        self.results.append(result)
        return result

    def __len__(self) -> int:
        return len(self.results)

    @staticmethod
    def _summarise(results: list[VQAResult]) -> dict:
        """Per-attribute means (None when unscored) plus the micro-averaged total."""
        counts = {a: 0 for a in ATTRIBUTES}
        sums = {a: 0.0 for a in ATTRIBUTES}
        for r in results:
            counts[r.attribute] += 1
            sums[r.attribute] += r.score
        out: dict = {a: (sums[a] / counts[a] if counts[a] else None) for a in ATTRIBUTES}
        n = len(results)
        out["total"] = sum(sums.values()) / n if n else None
        out["count"] = n
        out["count_per_attribute"] = counts
        return out

    def summary(self) -> dict:
        """``{"all_turns": {...}, "first_turn": {...}}``; first_turn is what the paper's code measured."""
        return {
            "all_turns": self._summarise(self.results),
            "first_turn": self._summarise([r for r in self.results if r.turn == 0]),
        }

    def to_json(self, path: str | Path) -> None:
        """Write the summary and every per-question result; atomic so a crash never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"summary": self.summary(), "results": [asdict(r) for r in self.results]}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(payload, f, indent=2)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def format_table(self) -> str:
        """Fixed-width table of both summaries, for logs and the console."""
        s = self.summary()
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        header = f"{'attribute':<10} {'all_turns':>10} {'n':>6} {'first_turn':>11} {'n':>6}"
        lines = [header, "-" * len(header)]
        for a in ATTRIBUTES:
            all_n, first_n = s["all_turns"]["count_per_attribute"][a], s["first_turn"]["count_per_attribute"][a]
            lines.append(f"{a:<10} {fmt(s['all_turns'][a]):>10} {all_n:>6} {fmt(s['first_turn'][a]):>11} {first_n:>6}")
        lines.append("-" * len(header))
        lines.append(
            f"{'total':<10} {fmt(s['all_turns']['total']):>10} {s['all_turns']['count']:>6}"
            f" {fmt(s['first_turn']['total']):>11} {s['first_turn']['count']:>6}"
        )
        return "\n".join(lines)


def score_answers(answers: list[dict]) -> VQAScorer:
    """A :class:`VQAScorer` holding every answer of ``record_tasks.answer_vqa`` (dicts with
    ``record_id``, ``turn``, ``question``, ``ground_truth``, ``answer``)."""
    scorer = VQAScorer()
    for a in answers:
        scorer.add(a["record_id"], a["turn"], a["question"], a["ground_truth"], a["answer"])
    return scorer
