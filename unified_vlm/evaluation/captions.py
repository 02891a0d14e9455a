"""Which watch attributes a caption (or a generation prompt) states, and whether each is right.

Captions and generation prompts come from one builder (docs/paper.md 1.3; ``datamodules/templates.py``):
a base sentence, then ", <clause>" per stated attribute, lower-cased after the first letter.
The parser reads the values those clauses carry, and is lenient enough for model output
(any case, extra words, clauses in another order). Parsing rules:

- **time**: every ``H:MM:SS`` or ``HH:MM:SS`` (hour 0-23 read as written, scored on a 12 h
  dial); a time without seconds is not a time statement.
- **weather**: every whole word ``sunny``, ``cloudy`` or ``raining``.
- **battery**: every integer directly followed by ``%`` (0-100; a larger number is kept and
  scores as far off).
- **weather_pos / battery_pos**: every corner name (``top-left`` ... ``bottom-right``; a space
  instead of the hyphen is accepted). The text is split into clauses at commas and periods; a
  corner belongs to the subject word (``weather`` or ``battery``) nearest before it in its
  clause, else the nearest after it. A corner in a clause with neither word is not attributed.
- An attribute stated with two different values (e.g. "sunny" and "raining") is **conflicting**:
  it counts as stated and scores 0.

Scores use the VQA rules (docs/paper.md 4.2, ``unified_vlm.evaluation.vqa``): time circular score,
battery 1 - error/100, weather and corners exact.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from unified_vlm.datamodules.watch import CORNERS, WEATHERS
from unified_vlm.evaluation.vqa import score_battery, score_position, score_time, score_weather

ATTRIBUTES = ("time", "weather", "battery", "weather_pos", "battery_pos")

_TIME_RE = re.compile(r"(?<![\d:])(\d{1,2}):(\d{2}):(\d{2})(?![\d:])")
_WEATHER_RE = re.compile(r"\b(" + "|".join(WEATHERS) + r")\b")
_BATTERY_RE = re.compile(r"(?<![\d.])(\d{1,3})\s?%")
_CORNER_RE = re.compile(r"\b(top|bottom)[- ](left|right)\b")
_SUBJECT_RE = re.compile(r"\b(weather|battery)\b")


@dataclass(frozen=True)
class Parsed:
    """Every value a text states, per attribute, in order of appearance."""

    values: Mapping[str, tuple] = field(default_factory=dict)

    def stated(self) -> set[str]:
        return {a for a, v in self.values.items() if v}

    def conflicting(self, attribute: str) -> bool:
        return len(set(self.values.get(attribute, ()))) > 1

    def value(self, attribute: str) -> Any | None:
        """The single value stated for ``attribute``; None when it is not stated or conflicting."""
        values = self.values.get(attribute, ())
        return values[0] if values and not self.conflicting(attribute) else None


def parse_text(text: str) -> Parsed:
    """The attributes ``text`` states (rules in the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"expected a caption or prompt string, got {type(text).__name__}")
    lowered = text.lower()
    found: dict[str, list] = {a: [] for a in ATTRIBUTES}
    for h, m, s in _TIME_RE.findall(lowered):
        found["time"].append(f"{int(h):02d}:{m}:{s}")
    found["weather"] = _WEATHER_RE.findall(lowered)
    found["battery"] = [int(v) for v in _BATTERY_RE.findall(lowered)]
    for clause in re.split(r"[,.;\n](?!\d)", lowered):
        subjects = [(m.start(), m.group(1)) for m in _SUBJECT_RE.finditer(clause)]
        for corner in _CORNER_RE.finditer(clause):
            before = [name for pos, name in subjects if pos < corner.start()]
            after = [name for pos, name in subjects if pos > corner.start()]
            owner = before[-1] if before else (after[0] if after else None)
            if owner is not None:
                found[f"{owner}_pos"].append(f"{corner.group(1)}-{corner.group(2)}")
    return Parsed({a: tuple(v) for a, v in found.items() if v})


def truth_strings(attributes: Mapping[str, Any]) -> dict[str, str]:
    """Ground-truth attributes (a record's ``attributes`` or a reader's reading) as VQA answer strings."""
    missing = [k for k in ("hour", "minute", "second", "weather", "battery", "weather_pos", "battery_pos") if k not in attributes]
    if missing:
        raise ValueError(f"attributes lack {missing}; expected a WatchAttributes dict (record['attributes'])")
    return {
        "time": f"{int(attributes['hour']):02d}:{int(attributes['minute']):02d}:{int(attributes['second']):02d}",
        "weather": str(attributes["weather"]),
        "battery": f"{int(attributes['battery'])}%",
        "weather_pos": str(attributes["weather_pos"]),
        "battery_pos": str(attributes["battery_pos"]),
    }


def _as_answer(attribute: str, value: Any) -> str:
    return f"{value}%" if attribute == "battery" else str(value)


def score_value(attribute: str, truth: str, value: Any) -> float:
    """One stated value against the truth string, by the VQA rule for ``attribute``."""
    answer = _as_answer(attribute, value)
    if attribute == "time":
        return score_time(truth, answer)
    if attribute == "battery":
        return max(0.0, score_battery(truth, answer)) if int(value) <= 100 else 0.0
    if attribute == "weather":
        return score_weather(truth, answer) if answer in WEATHERS else 0.0
    if attribute in ("weather_pos", "battery_pos"):
        return score_position(truth, answer) if answer in CORNERS else 0.0
    raise ValueError(f"unknown attribute {attribute!r}; expected one of {ATTRIBUTES}")


def score_statements(parsed: Parsed, truth: Mapping[str, str]) -> dict[str, float]:
    """Score per stated attribute that ``truth`` covers: 0 if conflicting, else the VQA score."""
    scores = {}
    for attribute in parsed.stated():
        if attribute not in truth:
            continue
        scores[attribute] = 0.0 if parsed.conflicting(attribute) else score_value(attribute, truth[attribute], parsed.value(attribute))
    return scores


class CaptionScorer:
    """Accumulates generated captions; reports per attribute how often it is stated, how right
    the statements are (precision) and how many reference statements it reproduces (recall).

    - ``precision[a]``: mean score of the captions that state ``a`` (against the ground truth
      attributes when given, else against the reference caption's value);
    - ``recall[a]``: over captions whose reference states ``a``, the mean score of the generated
      caption's statement of ``a`` (0 when it does not state it);
    - ``stated[a]``: share of captions stating ``a``; ``stated_recall[a]``: share of reference
      statements of ``a`` that the caption also states (right or wrong);
    - ``total``: the same quantities micro-averaged over all (caption, attribute) pairs.
    """

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, caption: str, attributes: Mapping[str, Any] | None = None, reference: str | None = None,
            record_id: str = "") -> dict:
        """Score one caption; ``attributes`` (ground truth) and/or ``reference`` (the dataset caption) are needed."""
        if attributes is None and reference is None:
            raise ValueError("score a caption against the watch's attributes or a reference caption (got neither)")
        parsed = parse_text(caption)
        ref = parse_text(reference) if reference is not None else None
        if attributes is not None:
            truth = truth_strings(attributes)
        else:
            truth = {a: _as_answer(a, ref.value(a)) for a in ref.stated() if not ref.conflicting(a)}
        row = {
            "id": record_id,
            "caption": caption,
            "stated": sorted(parsed.stated()),
            "reference_stated": sorted(ref.stated()) if ref is not None else None,
            "scores": score_statements(parsed, truth),
        }
        self.rows.append(row)
        return row

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self) -> dict:
        """Per attribute and ``total``: stated, precision, recall, stated_recall and their counts; None where undefined."""
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        out: dict = {}
        pooled = {"stated": [], "precision": [], "recall": [], "stated_recall": []}
        for a in ATTRIBUTES:
            stated = [a in r["stated"] for r in self.rows]
            precision = [r["scores"][a] for r in self.rows if a in r["scores"]]
            with_ref = [r for r in self.rows if r["reference_stated"] is not None and a in r["reference_stated"]]
            recall = [r["scores"].get(a, 0.0) if a in r["stated"] else 0.0 for r in with_ref]
            stated_recall = [a in r["stated"] for r in with_ref]
            out[a] = {"stated": mean(stated), "precision": mean(precision), "recall": mean(recall),
                      "stated_recall": mean(stated_recall), "n_stated": len(precision), "n_reference": len(with_ref)}
            for key, values in (("stated", stated), ("precision", precision), ("recall", recall), ("stated_recall", stated_recall)):
                pooled[key] += values
        out["total"] = {k: mean(v) for k, v in pooled.items()}
        out["total"]["count"] = len(self.rows)
        return out


def score_captions(captions: Iterable[str], records: Iterable[Mapping[str, Any]]) -> dict:
    """Score ``captions`` against caption records (``conversations`` + ``attributes``) in the same order."""
    scorer = CaptionScorer()
    captions, records = list(captions), list(records)
    if len(captions) != len(records):
        raise ValueError(f"{len(captions)} captions for {len(records)} records")
    for caption, record in zip(captions, records):
        turns = record.get("conversations") or []
        reference = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
        scorer.add(caption, record.get("attributes"), reference, record_id=str(record.get("id", "")))
    return scorer.summary()
