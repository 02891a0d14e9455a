"""The smart-watch generator: sampling, rendering fidelity, text templates, and the streamed dataset."""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from unified_vlm.datamodules import templates
from unified_vlm.datamodules.streams import WatchStream
from unified_vlm.datamodules.templates import TASKS, build_records
from unified_vlm.datamodules.watch import (
    BATTERY_GREEN,
    CORNER_ANCHORS_224,
    CORNERS,
    HAND_LENGTHS,
    WEATHERS,
    WatchAttributes,
    WatchStyle,
    battery_fill_box,
    battery_outline_box,
    face_geometry,
    hand_angles,
    hand_tips,
    render_watch,
    sample_watch,
    weather_icon_box,
)

TIME_RE = re.compile(r"^\d{2}:\d{2}:\d{2}$")
BATTERY_RE = re.compile(r"^\d{1,3}%$")


def attribute_tuple(a: WatchAttributes) -> tuple:
    return (a.hour, a.minute, a.second, a.weather, a.battery, a.weather_pos, a.battery_pos, a.face_color)


def pixels(attrs: WatchAttributes, size: int) -> np.ndarray:
    return np.asarray(render_watch(attrs, size)).astype(int)


# ----------------------------------------------------------------------------------------------
# Sampling


def test_sampling_is_deterministic_and_in_range():
    watches = [sample_watch(0, "train", i) for i in range(2000)]
    assert watches == [sample_watch(0, "train", i) for i in range(2000)]
    assert {w.hour for w in watches} == set(range(1, 13))  # default: no "00" label
    assert {w.minute for w in watches} == set(range(60))
    assert {w.second for w in watches} == set(range(60))
    assert {w.weather for w in watches} == set(WEATHERS)
    assert min(w.battery for w in watches) == 0 and max(w.battery for w in watches) == 100
    assert len({(w.weather_pos, w.battery_pos) for w in watches}) == 12  # ordered distinct corner pairs
    assert all(w.weather_pos != w.battery_pos for w in watches)
    assert all(0 <= c <= 255 for w in watches for c in w.face_color)


def test_paper_hours_samples_0_to_12():
    hours = {sample_watch(0, "train", i, paper_hours=True).hour for i in range(2000)}
    assert hours == set(range(13))
    assert sample_watch(0, "train", 0, paper_hours=True).time_str()[:2] in {f"{h:02d}" for h in range(13)}


def test_splits_and_seeds_never_share_a_watch():
    train = {attribute_tuple(sample_watch(0, "train", i)) for i in range(3000)}
    test = {attribute_tuple(sample_watch(0, "test", i)) for i in range(200)}
    assert len(train) == 3000 and len(test) == 200
    assert not train & test
    assert sample_watch(0, "train", 7) != sample_watch(1, "train", 7)


def test_sampling_does_not_depend_on_python_hash_seed():
    code = (
        "import json; from unified_vlm.datamodules.watch import sample_watch; "
        "print(json.dumps(sample_watch(3, 'train', 41).to_dict()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == sample_watch(3, "train", 41).to_dict()


def test_attributes_round_trip_and_validation():
    attrs = sample_watch(0, "train", 5)
    d = json.loads(json.dumps(attrs.to_dict()))
    assert WatchAttributes.from_dict(d) == attrs
    assert replace(attrs, hour=7, minute=3, second=9).time_str() == "07:03:09"
    with pytest.raises(ValueError, match="share the corner"):
        replace(attrs, battery_pos=attrs.weather_pos)
    with pytest.raises(ValueError, match="battery"):
        replace(attrs, battery=101)
    with pytest.raises(ValueError, match="weather"):
        replace(attrs, weather="snowy")


# ----------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("size", [48, 64, 224])
def test_render_is_deterministic_at_any_size(size):
    attrs = sample_watch(0, "train", 11)
    image = render_watch(attrs, size)
    assert image.mode == "RGB" and image.size == (size, size)
    assert image.tobytes() == render_watch(sample_watch(0, "train", 11), size).tobytes()
    assert image.tobytes() != render_watch(sample_watch(0, "train", 12), size).tobytes()


def test_hand_tips_follow_the_papers_angles():
    """12:15:30 puts the minute hand at 3 o'clock and the second hand at 6; the hour hand is just past 12."""
    attrs = replace(sample_watch(0, "train", 0), hour=12, minute=15, second=30)
    centre, radius = face_geometry(224)
    tips = hand_tips(attrs, 224)
    assert tips["minute"] == pytest.approx((centre + 0.7 * radius, centre))
    assert tips["second"] == pytest.approx((centre, centre + 0.9 * radius), abs=1e-9)
    hour_angle = math.radians(15 / 60 * 30)
    assert tips["hour"] == pytest.approx((centre + 0.5 * radius * math.sin(hour_angle), centre - 0.5 * radius * math.cos(hour_angle)))
    assert hand_angles(replace(attrs, hour=3, minute=30))["hour"] == pytest.approx(105.0)


def _window_has_white(img: np.ndarray, x: float, y: float, radius: int) -> bool:
    xi, yi = int(round(x)), int(round(y))
    patch = img[yi - radius : yi + radius + 1, xi - radius : xi + radius + 1].reshape(-1, 3)
    return bool((patch == 255).all(axis=1).any())


def _well_separated(attrs: WatchAttributes, min_degrees: float = 30) -> bool:
    angles = list(hand_angles(attrs).values())
    gaps = [abs(a - b) % 360 for a, b in itertools.combinations(angles, 2)]
    return min(min(g, 360 - g) for g in gaps) >= min_degrees and max(attrs.face_color) < 230


@pytest.mark.parametrize("size", [224, 96])
def test_hand_tips_are_white_and_hands_end_there(size):
    """PIL's wide lines are off by up to ~1.5 px, hence the small search windows."""
    s = size / 224
    centre, radius = face_geometry(size)
    watches = [w for w in (sample_watch(0, "hands", i) for i in range(200)) if _well_separated(w)][:25]
    assert len(watches) == 25
    for attrs in watches:
        img = pixels(attrs, size)
        for name, (tx, ty) in hand_tips(attrs, size).items():
            length = HAND_LENGTHS[name] * radius
            ux, uy = (tx - centre) / length, (ty - centre) / length
            inside = max(1.5, 2 * s)
            assert _window_has_white(img, tx - ux * inside, ty - uy * inside, 2), (attrs, name)
            beyond = max(4.0, 4 * s)
            if length + beyond + 2 < radius:  # still on the face: must show the face colour, not a hand
                assert not _window_has_white(img, tx + ux * beyond, ty + uy * beyond, 1), (attrs, name)


@pytest.mark.parametrize("size", [224, 96])
@pytest.mark.parametrize("battery", [0, 1, 37, 50, 99, 100])
def test_battery_fill_width_matches_percentage(size, battery):
    attrs = replace(sample_watch(0, "train", 2), battery=battery)
    img = pixels(attrs, size)
    x0, y0, x1, y1 = battery_fill_box(attrs, size)
    assert x1 - x0 == int(23 * (size / 224) * battery / 100)
    is_green = (img == BATTERY_GREEN).all(axis=2)
    assert is_green[y0:y1, x0:x1].all()
    assert is_green.sum() == (x1 - x0) * (y1 - y0)  # green only inside the bar
    if battery < 100:
        assert not is_green[y0:y1, x1].any()
    ox0, oy0, ox1, oy1 = battery_outline_box(attrs, size)
    assert ox0 < x0 and x1 <= ox1 and oy0 < y0 and y1 <= oy1


def _paper_battery(attrs: WatchAttributes) -> np.ndarray:
    """The battery as the paper's generator draws it at 224 px (docs/paper.md 1.1): PIL's
    rectangle, end coordinates inclusive, outline first and the fill bar over it."""
    from PIL import Image, ImageDraw

    x, y = CORNER_ANCHORS_224[attrs.battery_pos]
    image = Image.new("RGB", (224, 224), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle([x, y, x + 25, y + 10], outline=(0, 0, 0), width=1)
    draw.rectangle([x + 2, y + 2, x + 2 + int(23 * attrs.battery / 100), y + 8], fill=BATTERY_GREEN)
    return np.asarray(image)[y: y + 11, x: x + 26]


@pytest.mark.parametrize("battery", [0, 1, 4, 37, 50, 63, 99, 100])
def test_paper_battery_bar_is_the_paper_generators_bar(battery):
    """``battery_bar="paper"``: the outline and bar pixels equal the paper's drawing at 224 px
    (63 %: 15 green columns; 0 %: one; 100 %: over the outline's right edge)."""
    attrs = replace(sample_watch(0, "train", 2), battery=battery)
    x, y = CORNER_ANCHORS_224[attrs.battery_pos]
    img = np.asarray(render_watch(attrs, 224, WatchStyle(battery_bar="paper")))
    assert np.array_equal(img[y: y + 11, x: x + 26], _paper_battery(attrs))
    x0, y0, x1, y1 = battery_fill_box(attrs, 224, "paper")
    assert x1 - x0 == int(23 * battery / 100) + 1
    short = battery_fill_box(attrs, 224)
    assert short[2] - short[0] == x1 - x0 - 1  # the default bar: one column fewer


def _colour_counts(crop: np.ndarray) -> dict[str, int]:
    r, g, b = crop.reshape(-1, 3).T
    return {
        "yellow": int(((r > 200) & (g > 120) & (b < 100)).sum()),
        "blue": int(((b > r + 60) & (b > g + 30)).sum()),
        "grey": int(((abs(r - g) < 20) & (abs(g - b) < 25) & (r < 215)).sum()),
    }


@pytest.mark.parametrize("size", [224, 64])
def test_weather_icons_differ_and_are_told_apart_by_colour(size):
    base = sample_watch(0, "train", 3)
    crops = {}
    for weather in WEATHERS:
        attrs = replace(base, weather=weather)
        x0, y0, x1, y1 = weather_icon_box(attrs, size)
        crops[weather] = pixels(attrs, size)[y0:y1, x0:x1]
    for a, b in itertools.combinations(WEATHERS, 2):
        assert not np.array_equal(crops[a], crops[b])
    sunny, cloudy, raining = (_colour_counts(crops[w]) for w in WEATHERS)
    assert sunny["yellow"] > 0 and sunny["grey"] == 0 and sunny["blue"] == 0
    assert cloudy["grey"] > 0 and cloudy["yellow"] > 0 and cloudy["blue"] == 0
    assert raining["grey"] > 0 and raining["blue"] > 0 and raining["yellow"] == 0


@pytest.mark.parametrize("size", [224, 96])
def test_weather_and_battery_are_drawn_in_their_corners(size):
    base = sample_watch(0, "train", 4)
    for weather_pos, battery_pos in itertools.permutations(CORNERS, 2):
        attrs = replace(base, weather_pos=weather_pos, battery_pos=battery_pos)
        img = pixels(attrs, size)
        x0, y0, x1, y1 = weather_icon_box(attrs, size)
        icon = img[y0:y1, x0:x1].reshape(-1, 3)
        is_icon = ~(icon == 255).all(axis=1) & ~(icon == attrs.face_color).all(axis=1)
        assert is_icon.sum() > 0.1 * len(icon), (weather_pos, battery_pos)
        bx0, by0, bx1, by1 = battery_outline_box(attrs, size)
        assert (img[by0, bx0:bx1 + 1] == 0).all() and (img[by0:by1 + 1, bx0] == 0).all()
        for corner in set(CORNERS) - {weather_pos, battery_pos}:  # unused corners stay blank
            empty = replace(attrs, weather_pos=corner, battery_pos=weather_pos)
            ex0, ey0, ex1, ey1 = weather_icon_box(empty, size)
            assert (img[ey0:ey1, ex0:ex1] == 255).all(), corner


# ----------------------------------------------------------------------------------------------
# Text templates


def test_template_pools_have_the_papers_sizes():
    sizes = {name: len(pool) for name, pool in templates.QUESTIONS.items()}
    assert sizes == {"weather": 9, "time": 10, "battery": 10, "battery_pos": 10, "weather_pos": 10}
    assert len(templates.GENERATION_REQUESTS) == 3 and len(templates.CAPTION_BASES) == 3
    assert any("is show " in base for base in templates.CAPTION_BASES)
    assert len(templates.CAPTION_PROMPTS) == 10 and all(p.startswith("<image>\n") for p in templates.CAPTION_PROMPTS)
    assert len(templates.GENERATION_ACKNOWLEDGEMENTS) == 3
    assert all(a.endswith("\n<image>") for a in templates.GENERATION_ACKNOWLEDGEMENTS)
    assert [len(phrasings) for _, phrasings in templates.CLAUSES.values()] == [4, 3, 3, 3, 3]


@pytest.fixture(scope="module")
def sampled_records():
    out = []
    for i in range(3000):
        attrs = sample_watch(0, "train", i)
        out.append((attrs, build_records(attrs, (0, "train", i), f"images/{i:06d}.png", f"train-{i:06d}", i)))
    return out


def _asked_attribute(question: str) -> str:
    question = question.removeprefix("<image>\n")
    return next(name for name, pool in templates.QUESTIONS.items() if question in pool)


def test_vqa_turn_counts_question_mix_and_answers(sampled_records):
    pair_counts, asked = [], []
    for attrs, (_, vqa, _) in sampled_records:
        turns = vqa["conversations"]
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        pair_counts.append(len(turns) // 2)
        for question, reply in zip(turns[::2], turns[1::2]):
            attribute = _asked_attribute(question["value"])
            asked.append(attribute)
            expected = {
                "weather": attrs.weather, "time": attrs.time_str(), "battery": f"{attrs.battery}%",
                "battery_pos": attrs.battery_pos, "weather_pos": attrs.weather_pos,
            }[attribute]
            assert reply["value"] == expected
            if attribute == "time":
                assert TIME_RE.match(reply["value"])
            if attribute == "battery":
                assert BATTERY_RE.match(reply["value"])
    assert set(pair_counts) == {1, 2, 3, 4}
    assert abs(np.mean(pair_counts) - 2.2) < 0.08
    for attribute in templates.QUESTIONS:
        assert abs(asked.count(attribute) / len(asked) - 0.2) < 0.03, attribute


def _mentions(text: str, attrs: WatchAttributes) -> dict[str, bool]:
    return {
        "time": attrs.time_str() in text,
        "weather": attrs.weather in text,
        "battery": f"{attrs.battery}%" in text,
        "weather_pos": attrs.weather_pos in text,
        "battery_pos": attrs.battery_pos in text,
    }


def test_captions_and_generation_prompts(sampled_records):
    rates = {"caption": [], "generation": []}
    for attrs, (generation, _, caption) in sampled_records:
        prompt, ack = (t["value"] for t in generation["conversations"])
        question, description = (t["value"] for t in caption["conversations"])
        assert "<image>" not in prompt and ack.endswith("\n<image>")
        assert question.startswith("<image>\n") and "<image>" not in description
        for text in (prompt, description):
            assert text.endswith(".") and not text.endswith(",.") and "  " not in text
            assert text == text.capitalize() and text[0].isupper()
        rates["generation"].append(_mentions(prompt, attrs))
        rates["caption"].append(_mentions(description, attrs))
    for task, mentions in rates.items():
        assert all(m["time"] for m in mentions), task
        for attribute in ("weather", "battery", "weather_pos", "battery_pos"):
            rate = np.mean([m[attribute] for m in mentions])
            assert abs(rate - 0.5) < 0.04, (task, attribute, rate)
    # sampled independently: both mention the weather about a quarter of the time
    both = np.mean([g["weather"] and c["weather"] for g, c in zip(rates["generation"], rates["caption"])])
    assert abs(both - 0.25) < 0.04


def test_records_schema_and_determinism(sampled_records):
    attrs, records = sampled_records[42]
    assert [r["task"] for r in records] == list(TASKS)
    assert [r["id"] for r in records] == [f"train-000042-{t}" for t in TASKS]
    assert all(r["image"] == "images/000042.png" and r["watch"] == 42 for r in records)
    assert all(WatchAttributes.from_dict(r["attributes"]) == attrs for r in records)
    assert build_records(attrs, (0, "train", 42), "images/000042.png", "train-000042", 42) == records
    json.dumps(records)


# ----------------------------------------------------------------------------------------------
# Streamed dataset


def test_stream_indexing_and_task_filtering():
    full = WatchStream(split="train", num_watches=5, seed=0, image_size=48)
    assert len(full) == 15
    assert [full.record(i)["task"] for i in range(3)] == list(TASKS)
    assert full.record(7)["watch"] == 2 and full.record(7)["task"] == "vqa"
    vqa_only = WatchStream(split="train", num_watches=5, seed=0, image_size=48, tasks=["vqa"])
    assert len(vqa_only) == 5
    assert vqa_only.record(2) == full.record(7)  # filtering tasks never changes a record's text
    swapped = WatchStream(num_watches=5, image_size=48, tasks=["caption", "generation"])
    assert swapped.tasks == ("generation", "caption")
    with pytest.raises(ValueError, match="unknown task"):
        WatchStream(tasks=["segmentation"])
    with pytest.raises(IndexError):
        full.record(15)


def test_stream_items_render_their_attributes():
    stream = WatchStream(split="test", num_watches=2, seed=3, image_size=64, paper_hours=True)
    item = stream[5]
    assert set(item) == {"id", "task", "conversations", "image", "image_path", "attributes"}
    assert item["id"] == "test-000001-caption" and item["image_path"] == "images/000001.png"
    attrs = sample_watch(3, "test", 1, paper_hours=True)
    assert item["attributes"] == attrs.to_dict()
    assert item["image"].size == (64, 64)
    assert item["image"].tobytes() == render_watch(attrs, 64).tobytes()
    assert len(stream) == 6


def test_the_font_docs_say_what_the_installed_pillow_draws(monkeypatch):
    """The paper's generator drew its battery text with ``ImageFont.load_default()``, which since Pillow
    10.1 (with FreeType) is the scalable Aileron at 10 px, not the old bitmap font; the default style
    draws that face at 11 px at 224. docs/data.md and WatchStyle's docstring must say so."""
    from pathlib import Path

    from PIL import ImageDraw, ImageFont

    from unified_vlm.datamodules.watch import WatchStyle

    paper = ImageFont.load_default()
    assert isinstance(paper, ImageFont.FreeTypeFont), "this Pillow has no FreeType: the scalable styles cannot draw"
    fonts = []
    draw_text = ImageDraw.ImageDraw.text

    def spy(self, xy, text, *args, **kwargs):
        fonts.append(kwargs["font"])
        return draw_text(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", spy)
    render_watch(sample_watch(0, "train", 0), 224)
    (drawn,) = fonts
    assert drawn.getname() == paper.getname() == ("Aileron", "Regular") and (paper.size, drawn.size) == (10, 11)

    def stated(pattern: str, text: str) -> str:
        match = re.search(pattern, text)
        assert match, f"the docs do not say {pattern!r}: {text}"
        return match[1]

    row = next(line for line in (Path(__file__).parents[1] / "docs" / "data.md").read_text().splitlines()
               if line.startswith("| `font` |"))
    assert stated(r"`default` \(Pillow's scalable default font, Aileron Regular, at (\d+) px at 224\)", row) == "11"
    assert stated(r"`ImageFont.load_default\(\)` under Pillow 10.4: Aileron at (\d+) px, not the bitmap font", row) == "10"
    doc = " ".join(WatchStyle.__doc__.split())
    assert stated(r"``default`` is Pillow's scalable default font, Aileron Regular .*? at (\d+) px at 224", doc) == "11"
    assert stated(r"Aileron at its default (\d+) px, not the bitmap font", doc) == "10"
    assert "paper's PIL drew" not in row + doc
