"""Caption / prompt parsing and caption scoring, on hand-made captions and on the builder's own texts."""
from __future__ import annotations

import pytest

from unified_vlm.datamodules.streams import WatchStream
from unified_vlm.evaluation.captions import (
    ATTRIBUTES,
    CaptionScorer,
    parse_text,
    score_captions,
    score_statements,
    score_value,
    truth_strings,
)

TRUTH = {"hour": 7, "minute": 13, "second": 7, "weather": "sunny", "battery": 57,
         "weather_pos": "top-left", "battery_pos": "bottom-right", "face_color": [1, 2, 3]}


def test_parses_every_builder_phrasing():
    text = ("The image shows a smart watch, the time is 07:13:07, with a sunny weather icon, battery level at 57%, "
            "weather icon at the top-left corner, battery displayed at the bottom-right corner.")
    parsed = parse_text(text)
    assert parsed.stated() == set(ATTRIBUTES)
    assert [parsed.value(a) for a in ATTRIBUTES] == ["07:13:07", "sunny", 57, "top-left", "bottom-right"]


def test_builder_texts_parse_back_to_their_attributes():
    """Every caption and generation prompt the data engine writes states only true values, and
    states time always (docs/paper.md 1.3)."""
    stream = WatchStream(split="val", num_watches=150, tasks=("generation", "caption"), image_size=32)
    seen = set()
    for i in range(len(stream)):
        record = stream.record(i)
        turn = 0 if record["task"] == "generation" else 1
        parsed = parse_text(record["conversations"][turn]["value"])
        assert "time" in parsed.stated()
        seen |= parsed.stated()
        scores = score_statements(parsed, truth_strings(record["attributes"]))
        assert scores and all(s == 1.0 for s in scores.values()), (record["conversations"], scores)
    assert seen == set(ATTRIBUTES)


def test_corner_goes_to_the_nearest_subject_and_order_does_not_matter():
    parsed = parse_text("The battery is at top-right and the weather at bottom-left; 57% battery")
    assert parsed.value("battery_pos") == "top-right"
    assert parsed.value("weather_pos") == "bottom-left"
    parsed = parse_text("Top left corner shows the weather, a smart watch")
    assert parsed.value("weather_pos") == "top-left"
    assert "battery_pos" not in parse_text("a watch with something at top-left").stated()


def test_missing_malformed_and_conflicting_values():
    assert parse_text("A smart watch showing the time 7:13").stated() == set()  # no seconds: no time statement
    assert parse_text("displaying 7:13:07").value("time") == "07:13:07"
    parsed = parse_text("A watch, showing sunny weather, with the weather being raining")
    assert parsed.conflicting("weather") and parsed.value("weather") is None and "weather" in parsed.stated()
    assert parse_text("with 130% battery").value("battery") == 130
    assert score_value("battery", "57%", 130) == 0.0
    assert parse_text("Sunny").value("weather") == "sunny"  # any case
    assert parse_text("it is unsunny").stated() == set()  # whole words only


def test_scorer_precision_recall_per_attribute():
    scorer = CaptionScorer()
    reference = "This is a smart watch, the time is 07:13:07, with 57% battery, battery indicator at bottom-right."
    # right time, battery 10 points off, wrong battery corner, extra weather statement (right), no conflict
    scorer.add("The image shows a smart watch, displaying 07:13:07, with 47% battery, battery indicator at top-left, "
               "showing sunny weather.", TRUTH, reference)
    # time 1 minute off, states nothing else
    scorer.add("This is a smart watch, with the time 07:14:07.", TRUTH, reference)
    s = scorer.summary()
    assert s["time"]["precision"] == pytest.approx((1.0 + 1 - (1 / 30) / 3) / 2)
    assert s["battery"]["precision"] == pytest.approx(0.9)
    assert s["battery"]["recall"] == pytest.approx(0.9 / 2)  # second caption leaves it out
    assert s["battery"]["stated_recall"] == pytest.approx(0.5)
    assert s["battery_pos"]["precision"] == 0.0 and s["battery_pos"]["recall"] == 0.0
    assert s["weather"]["precision"] == 1.0 and s["weather"]["n_reference"] == 0 and s["weather"]["recall"] is None
    assert s["weather_pos"]["precision"] is None and s["weather_pos"]["stated"] == 0.0
    # micro total over (caption, attribute) pairs: 5 statements scored 1, 0.9, 0, 1, 0.9889
    assert s["total"]["precision"] == pytest.approx((1 + 0.9 + 0 + 1 + (1 - 1 / 90)) / 5)
    assert s["total"]["count"] == 2


def test_reference_only_and_bad_input():
    scorer = CaptionScorer()
    row = scorer.add("A watch, with 60% battery, showing cloudy weather", reference="A watch, with 50% battery.")
    assert row["scores"] == {"battery": pytest.approx(0.9)}  # weather: the reference says nothing to check against
    with pytest.raises(ValueError, match="neither"):
        scorer.add("a watch")
    with pytest.raises(ValueError, match="attributes lack"):
        scorer.add("a watch", {"hour": 1})
    with pytest.raises(TypeError, match="string"):
        parse_text(None)


def test_score_captions_on_records():
    stream = WatchStream(split="val", num_watches=20, tasks=("caption",), image_size=32)
    records = [stream.record(i) for i in range(len(stream))]
    references = [r["conversations"][1]["value"] for r in records]
    perfect = score_captions(references, records)
    assert perfect["total"]["precision"] == 1.0 and perfect["total"]["recall"] == 1.0
    shifted = score_captions(references[1:] + references[:1], records)  # captions of other watches
    assert shifted["total"]["precision"] < 0.9
    with pytest.raises(ValueError, match="captions for"):
        score_captions(references[:3], records)
