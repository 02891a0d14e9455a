"""Dataset variants (docs/paper.md 1.5, 3.4, 5.3, 5.4): data scaling, knowledge-transfer bias, fixed layout,
style and wording; streamed == materialised, deterministic, default unchanged, bad input named."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from unified_vlm.datamodules import templates
from unified_vlm.datamodules.materialize import main, materialize
from unified_vlm.datamodules.records import RecordDataset, load_records
from unified_vlm.datamodules.streams import WatchStream
from unified_vlm.datamodules.unified_datamodule import UnifiedDataModule
from unified_vlm.datamodules.variants import DataVariant, ExtraData, SplitStyle, UnderstandingBias, VariantError
from unified_vlm.datamodules.watch import CORNERS, WEATHERS, WatchStyle, render_watch, sample_watch, weather_icon

SIZE = 24


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def records(stream: WatchStream) -> list[dict]:
    return [stream.record(i) for i in range(len(stream))]


def attribute_key(attrs: dict) -> str:
    return json.dumps(attrs, sort_keys=True)


# ----------------------------------------------------------------------------------------------
# The empty variant is the standard data


def test_default_variant_is_the_standard_data():
    plain = WatchStream(split="train", num_watches=6, seed=2, image_size=SIZE)
    explicit = WatchStream(split="train", num_watches=6, seed=2, image_size=SIZE,
                           variant={"train": {"layout": "random", "wording": "base", "icons": "default",
                                              "battery_color": "green", "font": "default", "render": "native"}})
    assert DataVariant.from_mapping(None).is_default() and not DataVariant().changes("train")
    assert records(plain) == records(explicit)
    for i in range(len(plain)):
        assert np.array_equal(pixels(plain[i]["image"]), pixels(explicit[i]["image"]))


# ----------------------------------------------------------------------------------------------
# Data scaling


def test_extra_sizes_follow_the_paper_and_scale_with_the_base():
    assert ExtraData("generation", size="33k").num_watches(60000) == 33000
    assert ExtraData("understanding", size="120k").num_watches(60000) == 61897  # 123,794 records
    assert ExtraData("understanding", size="180k").num_watches(60000) == 90000
    assert ExtraData("generation", size="68k").num_watches(20000) == 22667  # a third of the base: a third of the size
    assert ExtraData("understanding", size="68k").num_watches(20000) == 11333
    assert ExtraData("generation", watches=7).num_watches(20000) == 7
    assert ExtraData("generation", size="33k").num_watches(1) == 1  # the smallest size still adds a watch


@pytest.mark.parametrize("task, extra_tasks", [("generation", ("generation",)), ("understanding", ("vqa", "caption"))])
def test_extra_records_come_from_new_watches_after_the_base(task, extra_tasks):
    base = WatchStream(split="train", num_watches=30, seed=1, image_size=SIZE)
    grown = WatchStream(split="train", num_watches=30, seed=1, image_size=SIZE, variant={"extra": {"task": task, "watches": 40}})
    assert len(grown) == len(base) + 40 * len(extra_tasks)
    assert records(grown)[: len(base)] == records(base)  # the base mix is untouched
    extra = records(grown)[len(base):]
    assert [r["task"] for r in extra] == list(extra_tasks) * 40
    assert all(r["stream"] == f"train+{task}" and r["image"].startswith("images/extra/") for r in extra)
    assert len({r["id"] for r in records(grown)}) == len(grown)
    base_watches = {attribute_key(r["attributes"]) for r in records(base)}
    assert not base_watches & {attribute_key(r["attributes"]) for r in extra}  # no watch repeats
    assert [grown.task(i) for i in range(len(grown))] == [r["task"] for r in records(grown)]
    again = WatchStream(split="train", num_watches=30, seed=1, image_size=SIZE, variant={"extra": {"task": task, "watches": 40}})
    assert records(again) == records(grown)
    # the validation split is never grown
    val = WatchStream(split="val", num_watches=5, seed=1, variant={"extra": {"task": task, "watches": 40}})
    assert len(val) == 15


# ----------------------------------------------------------------------------------------------
# Knowledge transfer


def test_weather_bias_restricts_only_the_understanding_records_of_train():
    variant = {"bias": {"attribute": "weather", "values": ["sunny", "raining"]}}
    base = WatchStream(split="train", num_watches=60, seed=0, image_size=SIZE)
    biased = WatchStream(split="train", num_watches=60, seed=0, image_size=SIZE, variant=variant)
    plain_records, biased_records = records(base), records(biased)
    understanding_weathers = [r["attributes"]["weather"] for r in biased_records if r["task"] != "generation"]
    assert set(understanding_weathers) == {"sunny", "raining"}  # both allowed values, nothing else
    assert {r["attributes"]["weather"] for r in biased_records if r["task"] == "generation"} == set(WEATHERS)
    changed = 0
    for plain, record in zip(plain_records, biased_records):
        if record["task"] == "generation" or plain["attributes"] == record["attributes"]:
            assert record == plain
            continue
        changed += 1
        assert {k for k in plain["attributes"] if plain["attributes"][k] != record["attributes"][k]} == {"weather"}
        assert plain["attributes"]["weather"] == "cloudy" and record["image"].endswith("-biased.png")
        for turn_plain, turn in zip(plain["conversations"], record["conversations"]):  # same questions, new answers
            if turn["from"] == "human" and record["task"] == "vqa":
                assert turn == turn_plain
    assert changed == 2 * sum(a["weather"] == "cloudy" for a in (r["attributes"] for r in plain_records[::3]))
    # a changed watch is drawn with its biased icon; the generation record keeps the original picture
    i = next(k for k, r in enumerate(biased_records) if r["image"].endswith("-biased.png"))
    watch = i // 3
    assert np.array_equal(pixels(biased[3 * watch]["image"]), pixels(base[3 * watch]["image"]))
    assert not np.array_equal(pixels(biased[i]["image"]), pixels(base[i]["image"]))
    # validation and test stay unbiased
    for split in ("val", "test"):
        assert records(WatchStream(split=split, num_watches=20, seed=0, variant=variant)) == records(WatchStream(split=split, num_watches=20, seed=0))


def test_battery_bias_keeps_the_range_and_answers_follow():
    biased = WatchStream(split="train", num_watches=80, seed=3, image_size=SIZE, tasks=["vqa"],
                         variant={"bias": {"attribute": "battery", "low": 0, "high": 20}})
    levels = [r["attributes"]["battery"] for r in records(biased)]
    assert min(levels) >= 0 and max(levels) <= 20 and len(set(levels)) > 10
    for record in records(biased):
        for question, reply in zip(record["conversations"][::2], record["conversations"][1::2]):
            if reply["value"].endswith("%"):
                assert reply["value"] == f"{record['attributes']['battery']}%"


# ----------------------------------------------------------------------------------------------
# Fixed layout, style and wording


def test_weather_tl_layout_keeps_the_other_attributes():
    seen = set()
    for i in range(60):
        fixed, free = sample_watch(4, "train", i, layout="weather_tl"), sample_watch(4, "train", i)
        assert fixed.weather_pos == "top-left" and fixed.battery_pos != "top-left"
        assert dataclasses.replace(fixed, weather_pos=free.weather_pos, battery_pos=free.battery_pos) == free
        seen.add(fixed.battery_pos)
    assert seen == set(CORNERS[1:])
    stream = WatchStream(split="test", num_watches=40, seed=4, tasks=["vqa"], variant={"test": {"layout": "weather_tl"}})
    answers = [(q["value"], a["value"]) for r in records(stream) for q, a in zip(r["conversations"][::2], r["conversations"][1::2])]
    where_weather = [a for q, a in answers if any(q.endswith(p) for p in templates.WEATHER_POSITION_QUESTIONS)]
    assert where_weather and set(where_weather) == {"top-left"}


@pytest.mark.parametrize("style", [
    WatchStyle(icons="flat"), WatchStyle(battery_color="blue"), WatchStyle(font="large"), WatchStyle(font="bitmap"),
    WatchStyle(render="downscale"), WatchStyle(icons="paper"), WatchStyle(battery_bar="paper"),
])
@pytest.mark.parametrize("size", [64, 224])
def test_every_style_changes_the_picture(style, size):
    attrs = dataclasses.replace(sample_watch(0, "train", 3), battery=88)
    default = pixels(render_watch(attrs, size))
    styled = pixels(render_watch(attrs, size, style))
    if style.render == "downscale" and size == 224:
        assert np.array_equal(styled, default)  # drawn at 224 already: nothing to resize
    else:
        assert not np.array_equal(styled, default)
    assert np.array_equal(styled, pixels(render_watch(attrs, size, style)))


def test_downscale_is_the_224_picture_resized():
    attrs = sample_watch(0, "train", 5)
    expected = render_watch(attrs, 224).resize((64, 64), Image.BICUBIC)
    assert np.array_equal(pixels(render_watch(attrs, 64, WatchStyle(render="downscale"))), pixels(expected))


@pytest.mark.parametrize("design", ["flat", "paper"])
def test_other_icon_designs_differ_from_the_default_icons_for_every_weather(design):
    for weather in WEATHERS:
        attrs = dataclasses.replace(sample_watch(0, "train", 0), weather=weather)
        assert not np.array_equal(pixels(render_watch(attrs, 64)), pixels(render_watch(attrs, 64, WatchStyle(icons=design))))


def test_paper_cloudy_icon_is_a_pale_cloud_with_a_sun_at_its_top_left():
    """The icon the reader must not take for sunny: nearly white on white, a small sun top left."""
    icon = np.asarray(weather_icon("cloudy", 120, "paper").convert("RGBA")).astype(int)
    opaque = icon[..., 3] > 128
    r, g, b = icon[..., 0], icon[..., 1], icon[..., 2]
    yellow = opaque & (r > 200) & (g > 150) & (b < 100)
    pale = opaque & (r > 240) & (g > 240) & (b > 240)
    assert pale.sum() > 3 * yellow.sum() > 0
    ys, xs = np.nonzero(yellow)
    assert xs.mean() < 60 and ys.mean() < 60  # the sun peeks out at the top left


def test_alternative_wording_is_disjoint_and_asks_the_same_things():
    for attribute, pool in templates.QUESTIONS.items():
        assert len(templates.ALT_QUESTIONS[attribute]) == len(pool)
        assert not set(pool) & set(templates.ALT_QUESTIONS[attribute])
    assert not set(templates.CAPTION_PROMPTS) & set(templates.ALT_CAPTION_PROMPTS)
    assert not set(templates.GENERATION_REQUESTS) & set(templates.ALT_GENERATION_REQUESTS)
    all_base = {q for pool in templates.QUESTIONS.values() for q in pool}
    all_alt = {q for pool in templates.ALT_QUESTIONS.values() for q in pool}

    def questions(wording: str) -> tuple[list[str], list[str]]:
        stream = WatchStream(split="test", num_watches=40, seed=0, tasks=["vqa"], variant={"test": {"wording": wording}})
        turns = [t for r in records(stream) for t in r["conversations"]]
        return [t["value"].replace("<image>\n", "") for t in turns[::2]], [t["value"] for t in turns[1::2]]

    base_q, base_a = questions("base")
    alt_q, alt_a = questions("alt")
    mixed_q, mixed_a = questions("all")
    assert set(base_q) <= all_base and set(alt_q) <= all_alt
    assert set(mixed_q) & all_base and set(mixed_q) & all_alt
    assert base_a == alt_a == mixed_a  # the same attributes asked in every wording


def test_battery_bar_style_is_validated_and_reaches_the_renderer():
    with pytest.raises(ValueError, match="battery_bar"):
        WatchStyle(battery_bar="long")
    with pytest.raises(VariantError, match="data.variant.train.battery_bar"):
        DataVariant.from_mapping({"train": {"battery_bar": "long"}})
    stream = WatchStream(split="test", num_watches=2, seed=0, image_size=224, variant={"test": {"battery_bar": "paper"}})
    expected = render_watch(sample_watch(0, "test", 0), 224, WatchStyle(battery_bar="paper"))
    assert np.array_equal(pixels(stream[1]["image"]), pixels(expected))
    assert not np.array_equal(pixels(stream[1]["image"]), pixels(render_watch(sample_watch(0, "test", 0), 224)))


def test_styles_are_chosen_per_split():
    variant = DataVariant.from_mapping({"train": {"icons": "flat", "wording": "alt"},
                                        "test": {"battery_color": "orange", "render": "downscale"}})
    assert variant.style("train") == variant.style("val") == SplitStyle(icons="flat", wording="alt")
    assert variant.style("test") == SplitStyle(battery_color="orange", render="downscale")
    test = WatchStream(split="test", num_watches=2, seed=0, image_size=32, variant=variant)
    item = test[1]
    expected = render_watch(sample_watch(0, "test", 0), 32, WatchStyle(battery_color="orange", render="downscale"))
    assert np.array_equal(pixels(item["image"]), pixels(expected))


# ----------------------------------------------------------------------------------------------
# Materialised == streamed


COMBINED = {
    "extra": {"task": "understanding", "watches": 3},
    "bias": {"attribute": "weather", "values": ["sunny"]},
    "train": {"layout": "weather_tl", "icons": "flat", "font": "bitmap", "wording": "all"},
}


def test_materialised_variant_equals_the_stream(tmp_path):
    path = materialize(tmp_path, split="train", num_watches=5, seed=7, image_size=32, progress=False, variant=COMBINED)
    streamed = WatchStream(split="train", num_watches=5, seed=7, image_size=32, variant=COMBINED)
    on_disk = RecordDataset(path)
    assert load_records(path) == records(streamed)
    assert len(on_disk) == len(streamed) == 5 * 3 + 3 * 2
    for i in range(len(streamed)):
        assert np.array_equal(pixels(on_disk[i]["image"]), pixels(streamed[i]["image"])), i
    images = {p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("images/**/*.png")}
    assert images == {r["image"] for r in records(streamed)}
    understanding = [r for r in records(streamed) if r["task"] != "generation"]
    assert {r["attributes"]["weather"] for r in understanding} == {"sunny"}  # extra understanding records are biased too
    assert {r["attributes"]["weather_pos"] for r in records(streamed)} == {"top-left"}


def test_data_command_takes_a_variant_inline_or_from_a_config(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {}, "data": {"image_size": 32, "variant": COMBINED}}))
    argv = ["--split", "train", "--num-watches", "4", "--image-size", "32", "--seed", "7", "--no-progress"]
    assert main(["--out", str(tmp_path / "a"), "--variant", str(config)] + argv) == 0
    assert main(["--out", str(tmp_path / "b"), "--variant", json.dumps(COMBINED)] + argv) == 0
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()
    streamed = WatchStream(split="train", num_watches=4, seed=7, image_size=32, variant=COMBINED)
    assert load_records(tmp_path / "a" / "train.jsonl") == records(streamed)
    capsys.readouterr()
    assert main(["--out", str(tmp_path / "c"), "--variant", "{bias: {attribute: weather, values: [snowy]}}"] + argv) == 2
    assert "data.variant.bias.values" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------------------------
# The DataModule and the CLI keys


def datamodule(**kwargs) -> UnifiedDataModule:
    defaults = dict(image_size=16, num_train_watches=6, num_val_watches=2, num_test_watches=2, global_batch_size=2,
                    num_workers=0, collator=lambda batch, **_: batch)
    return UnifiedDataModule(**{**defaults, **kwargs})


def test_datamodule_streams_the_variant_and_keeps_plain_hyperparameters():
    dm = datamodule(mode="understanding", variant={"extra": {"task": "understanding", "watches": 4},
                                                   "bias": {"attribute": "battery", "low": 90, "high": 100}})
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6 * 2 + 4 * 2
    assert dm.datasets["train"].tasks() == ["vqa", "caption"] * 10
    assert all(90 <= dm.datasets["train"].records.record(i)["attributes"]["battery"] <= 100 for i in range(20))
    assert dm.hparams.variant == {"extra": {"task": "understanding", "watches": 4},
                                  "bias": {"attribute": "battery", "low": 90, "high": 100},
                                  "train": dataclasses.asdict(SplitStyle())}
    assert datamodule().hparams.variant is None


def test_cli_keys_reach_the_typed_variant():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(UnifiedDataModule, "data")
    config = parser.parse_args(["--data.variant.bias.attribute", "weather", "--data.variant.bias.values", "[cloudy]",
                                "--data.variant.test.icons", "flat", "--data.variant.extra", "{task: generation, size: 33k}"])
    assert parser.dump(config)  # round-trips to YAML
    variant = parser.instantiate(config).data.variant
    assert variant.bias == UnderstandingBias("weather", values=["cloudy"])
    assert variant.extra == ExtraData("generation", size="33k") and variant.style("test").icons == "flat"
    with pytest.raises(ValueError, match=r"data\.variant\.train\.font"):
        parser.instantiate(parser.parse_args(["--data.variant.train.font", "comic"]))


@pytest.mark.parametrize("spec, where", [
    ({"bias": {"attribute": "weather", "values": ["snowy"]}}, "data.variant.bias.values: unknown weather"),
    ({"bias": {"attribute": "weather", "values": []}}, "data.variant.bias.values: the understanding records need"),
    ({"bias": {"attribute": "face_color", "values": ["red"]}}, "data.variant.bias.attribute: unknown attribute"),
    ({"bias": {"attribute": "battery", "low": -5, "high": 20}}, "data.variant.bias.low: battery bounds"),
    ({"bias": {"attribute": "battery", "low": 10, "high": 101}}, "data.variant.bias.high: battery bounds"),
    ({"bias": {"attribute": "battery", "low": 60, "high": 20}}, "range would be empty"),
    ({"bias": {"attribute": "battery", "values": ["sunny"]}}, "data.variant.bias.values restricts weather"),
    ({"bias": {"attribute": "battery"}}, "needs both data.variant.bias.low"),
    ({"bias": {"values": ["sunny"]}}, r"data.variant.bias: missing required key\(s\) \['attribute'\]"),
    ({"extra": {"task": "vqa", "watches": 3}}, "data.variant.extra.task: unknown value 'vqa'"),
    ({"extra": {"task": "generation", "size": "180k"}}, "data.variant.extra.size: unknown size '180k' for generation"),
    ({"extra": {"task": "generation"}}, "give exactly one of data.variant.extra.size"),
    ({"extra": {"task": "generation", "watches": 0}}, "data.variant.extra.watches: must be a positive integer"),
    ({"test": {"wording": "pirate"}}, "data.variant.test.wording: unknown value 'pirate'"),
    ({"val": {"layout": "battery_tl"}}, "data.variant.val.layout: unknown value"),
    ({"train": {"colour": "red"}}, r"data.variant.train: unknown key\(s\) \['colour'\]"),
    ({"style": {}}, r"data.variant: unknown key\(s\) \['style'\]"),
])
def test_bad_variants_name_the_key(spec, where):
    with pytest.raises(VariantError, match=where):
        DataVariant.from_mapping(spec)


@pytest.mark.parametrize("kwargs, where", [
    (dict(mode="generation", variant={"extra": {"task": "understanding", "size": "68k"}}), "data.mode"),
    (dict(mode="understanding", variant={"extra": {"task": "generation", "watches": 5}}), "data.variant.extra.task"),
    (dict(mode="generation", variant={"bias": {"attribute": "weather", "values": ["sunny"]}}), "data.variant.bias"),
    (dict(train_records="train.jsonl", variant={"extra": {"task": "generation", "size": "33k"}}), "data.train_records"),
    (dict(train_records="train.jsonl", variant={"train": {"icons": "flat"}}), "data.train_records"),
    (dict(test_records="test.jsonl", variant={"bias": {"attribute": "weather", "values": ["sunny"]}, "train": {"icons": "flat"}}),
     "data.test_records"),
])
def test_datamodule_refuses_variants_that_leave_a_task_without_records(kwargs, where):
    with pytest.raises(VariantError, match=where):
        datamodule(**kwargs)
