"""Hand-computed checks of the docs/paper.md 4.2 VQA scoring rules."""
import json

import pytest

from unified_vlm.evaluation.vqa import (
    ATTRIBUTES,
    VQAScorer,
    classify_ground_truth,
    score_answer,
    score_battery,
    score_position,
    score_time,
    score_weather,
)

Q0 = "<image>\nWhat time does the watch show?"


@pytest.mark.parametrize(
    "gt, expected",
    [
        ("07:13:07", "time"),
        ("sunny", "weather"),
        ("raining", "weather"),
        ("cloudy", "weather"),
        ("top-left", "position"),
        ("bottom-right", "position"),
        ("45%", "battery"),
        ("12:00%", "time"),  # ":" is checked before "%"
        ("50%-ish", "position"),  # "-" is checked before "%"
        ("snowy", None),
        ("The watch shows 07:13:07.", "time"),  # classification alone ignores spaces...
    ],
)
def test_classify_ground_truth(gt, expected):
    assert classify_ground_truth(gt) == expected


def test_exact_matches_score_one():
    assert score_time("07:13:07", "07:13:07") == 1.0
    assert score_weather("sunny", "sunny") == 1.0
    assert score_position("top-left", "top-left") == 1.0
    assert score_battery("45%", "45%") == 1.0


def test_no_match_answers_score_zero():
    answer = "I don't know"
    assert score_time("07:13:07", answer) == 0.0
    assert score_weather("sunny", answer) == 0.0
    assert score_position("top-left", answer) == 0.0
    assert score_battery("45%", answer) == 0.0
    assert score_battery("45%", "150%") == 0.0  # not a 0..100 percentage


def test_time_wraps_around_the_clock():
    # e_h = min(11, 1) = 1, e_m = min(59, 1) = 1, e_s = min(58, 2) = 2
    assert score_time("11:59:59", "00:00:01") == pytest.approx(1 - (1 / 6 + 1 / 30 + 2 / 30) / 3)
    # 1 vs 11 o'clock is 2 hours apart on the dial
    assert score_time("01:00:00", "11:00:00") == pytest.approx(1 - (2 / 6) / 3)
    assert score_time("00:00:00", "12:00:00") == 1.0
    # out-of-range hours stay on the dial instead of producing a score above 1
    assert score_time("01:00:00", "23:00:00") == pytest.approx(1 - (2 / 6) / 3)


def test_time_maximal_error_is_zero():
    assert score_time("00:00:00", "06:30:30") == pytest.approx(0.0)


def test_time_partial_error():
    # e_h = 1, e_m = 15, e_s = 0 -> 1 - (1/6 + 1/2)/3 = 7/9
    assert score_time("03:10:00", "04:25:00") == pytest.approx(7 / 9)


def test_answers_with_extra_text():
    assert score_time("07:13:07", "<s> 07:13:07</s>") == 1.0
    assert score_weather("sunny", "it is sunny") == 1.0
    assert score_position("top-left", "the battery is at the top-left corner") == 1.0
    assert score_battery("45%", "<s> 40%</s>") == pytest.approx(0.95)
    assert score_weather("sunny", "Sunny") == 0.0  # substring test is case-sensitive, as in the paper


def test_battery_extremes():
    assert score_battery("0%", "100%") == 0.0
    assert score_battery("100%", "0%") == 0.0
    assert score_battery("100%", "100%") == 1.0
    assert score_battery("0%", "0%") == 1.0


def test_score_answer_rules():
    assert score_answer(Q0, "07:13:07", "07:13:07") == ("time", 1.0)
    # captions (ground truth with spaces) are never scored
    assert score_answer("<image>\nDescribe the watch.", "The image shows a smart watch.", "x") is None
    # text-only prompt: not image-conditioned
    assert score_answer("what is the weather?", "sunny", "sunny") is None
    # later VQA turns do not repeat <image>; the caller says they are image-conditioned
    assert score_answer("what is the weather?", "sunny", "sunny", image_conditioned=True) == ("weather", 1.0)
    assert score_answer(Q0, "sunny", "sunny", image_conditioned=False) is None
    assert score_answer(Q0, "snowy", "snowy") is None  # unknown attribute


def _hand_made_scorer() -> VQAScorer:
    s = VQAScorer()
    s.add("a", 0, Q0, "07:13:07", "07:13:07")  # time 1.0
    s.add("a", 1, "What is the weather?", "sunny", "cloudy")  # weather 0.0
    s.add("a", 2, "Battery?", "40%", "20%")  # battery 0.8
    s.add("b", 0, "<image>\nWhere is the battery?", "top-left", "top-left")  # position 1.0
    s.add("b", 1, "Weather?", "raining", "raining")  # weather 1.0
    s.add("c", 0, "<image>\nBattery level?", "50%", "40%")  # battery 0.9
    assert s.add("d", 0, "<image>\nDescribe it.", "A smart watch.", "A watch.") is None
    return s


def test_summary_micro_average_and_first_turn():
    summary = _hand_made_scorer().summary()
    all_turns, first = summary["all_turns"], summary["first_turn"]
    assert all_turns["count"] == 6
    assert all_turns["count_per_attribute"] == {"time": 1, "weather": 2, "position": 1, "battery": 2}
    assert all_turns["time"] == 1.0
    assert all_turns["weather"] == pytest.approx(0.5)
    assert all_turns["position"] == 1.0
    assert all_turns["battery"] == pytest.approx(0.85)
    # micro-average (4.7 / 6), not the macro mean of attributes (0.8375)
    assert all_turns["total"] == pytest.approx(4.7 / 6)
    assert first["count"] == 3
    assert first["weather"] is None  # no first-turn weather question
    assert first["count_per_attribute"]["weather"] == 0
    assert first["battery"] == pytest.approx(0.9)
    assert first["total"] == pytest.approx(2.9 / 3)
    assert first["total"] != all_turns["total"]


def test_empty_summary_has_none_not_nan():
    s = VQAScorer().summary()["all_turns"]
    assert all(s[a] is None for a in ATTRIBUTES)
    assert s["total"] is None and s["count"] == 0


def test_to_json_and_table(tmp_path):
    scorer = _hand_made_scorer()
    out = tmp_path / "sub" / "vqa.json"
    scorer.to_json(out)
    data = json.loads(out.read_text())
    assert data["summary"] == json.loads(json.dumps(scorer.summary()))
    assert len(data["results"]) == 6
    assert data["results"][2] == {
        "record_id": "a",
        "turn": 2,
        "question": "Battery?",
        "ground_truth": "40%",
        "answer": "20%",
        "attribute": "battery",
        "score": pytest.approx(0.8),
    }
    assert [p.name for p in out.parent.iterdir()] == ["vqa.json"]  # no temp file left behind
    table = scorer.format_table()
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert any(line.startswith("weather") and "0.5000" in line and " - " in line for line in lines)
    assert lines[-1].split() == ["total", f"{4.7 / 6:.4f}", "6", f"{2.9 / 3:.4f}", "3"]
