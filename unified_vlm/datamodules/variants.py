"""Dataset variants of the paper's experiments (docs/paper.md 1.5, 3.4, 5.3, 5.4), as one typed spec.

``DataVariant`` is what ``data.variant`` of the LightningCLI config and ``--variant`` of
``python -m unified_vlm data`` hold. Every part is optional and the empty spec is the standard
dataset, bit for bit:

- ``extra``: data scaling. Extra generation-only or understanding-only (vqa + caption) records
  from *new* watches (their own stream key ``"<split>+<task>"``, so no watch of the base set
  repeats), appended to the base records of the train split.
- ``bias``: knowledge transfer. The understanding records (vqa + caption) of the train split see
  a restricted attribute (weather from a set of values, or battery in a range); the generation
  records keep the full distribution. Validation and test are never biased.
- ``train`` / ``val`` / ``test``: the look and wording of each split (``SplitStyle``): a fixed
  layout (``weather_tl``), other icon designs, battery colours, fonts, 224 px-then-downscale
  rendering, and other paraphrases, so a model can be trained on one style and tested on another.
  ``val`` and ``test`` default to the train style.

Errors name the config key (``data.variant.bias.values`` ...), and ``check`` refuses a variant that
the data mode would silently drop (extra records of a task it leaves out, a bias on understanding
records in generation-only training). A paper size scales to at least one new watch for any base
of one watch or more (33k per 180k is the smallest: 0.55 watches per base watch).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from unified_vlm.datamodules.templates import PROMPTS, QUESTION_MIXES, WORDINGS
from unified_vlm.datamodules.watch import (
    BATTERY_BARS,
    BATTERY_COLORS,
    FONTS,
    ICON_DESIGNS,
    LAYOUTS,
    RENDER_MODES,
    WEATHERS,
    WatchAttributes,
    WatchStyle,
    stable_rng,
)

KEY = "data.variant"
UNDERSTANDING_TASKS = ("vqa", "caption")
EXTRA_TASKS = {"generation": ("generation",), "understanding": UNDERSTANDING_TASKS}
BIASABLE = ("weather", "battery")
BIASED_SPLIT = "train"  # bias and extra records change only this split; val and test stay standard
PAPER_BASE_WATCHES = 60000  # the paper's 180k mixed records = 60k watches x 3 tasks (1.4)
# Extra records per 180k base records in the paper's data-scaling files (1.5, 3.4). 33kg and 120ku
# are the sizes its generator code shows (120ku = 61,897 watches x 2 records); the others are the
# nominal sizes of the file names.
PAPER_EXTRA_RECORDS = {
    "generation": {"33k": 33000, "68k": 68000, "120k": 120000},
    "understanding": {"68k": 68000, "120k": 123794, "180k": 180000},
}


class VariantError(ValueError):
    """A dataset variant that cannot be built; the message names the config key to change."""


@dataclass(frozen=True)
class SplitStyle:
    """How the watches of one split look and are asked about; the defaults are the standard data.

    Args:
        layout: ``random`` (two distinct random corners) or ``weather_tl`` (weather icon always
            top-left, battery in one of the other three corners).
        wording: paraphrase pools: ``base``, ``alt`` (disjoint, never-seen paraphrases) or ``all``.
        icons: weather icon design, ``default``, ``flat`` or ``paper`` (after the paper's icons).
        battery_color: battery bar colour, ``green`` (default), ``blue``, ``orange`` or ``purple``.
        font: battery text font, ``default``, ``large`` or ``bitmap`` (PIL's old fixed-size font).
        render: ``native`` (drawn at the image size) or ``downscale`` (drawn at 224 px and resized).
        battery_bar: ``short`` (the default, one column shorter than the paper's at 224 px) or
            ``paper`` (the paper generator's bar exactly).
        prompts: generation prompts: ``paper`` (time always, every other attribute with p=1/2) or
            ``all`` (every attribute stated; the phrasings of the paper's pools).
        questions: VQA turns: ``paper`` (the paper's draw) or ``position`` (corner questions only).
    """

    layout: str = "random"
    wording: str = "base"
    icons: str = "default"
    battery_color: str = "green"
    font: str = "default"
    render: str = "native"
    battery_bar: str = "short"
    prompts: str = "paper"
    questions: str = "paper"

    def watch_style(self) -> WatchStyle:
        return WatchStyle(icons=self.icons, battery_color=self.battery_color, font=self.font, render=self.render,
                          battery_bar=self.battery_bar)

    def _validate(self, key: str) -> None:
        for name, allowed in (
            ("layout", LAYOUTS), ("wording", WORDINGS), ("icons", ICON_DESIGNS),
            ("battery_color", tuple(BATTERY_COLORS)), ("font", FONTS), ("render", RENDER_MODES),
            ("battery_bar", BATTERY_BARS),
            ("prompts", PROMPTS), ("questions", QUESTION_MIXES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise VariantError(f"{key}.{name}: unknown value {value!r}; expected one of {list(allowed)}")


@dataclass(frozen=True)
class UnderstandingBias:
    """Restrict one attribute in the understanding records (vqa + caption) of the train split.

    The watch of such a record is the base watch with only the biased attribute changed: a value
    outside ``values`` (weather) or outside ``low..high`` (battery) is re-drawn uniformly inside it
    from an RNG keyed by the watch, so the restricted attribute is uniform over the allowed values
    and everything else (time, colour, corners) is the base draw. A changed watch is rendered to
    its own image; the generation record keeps the unbiased watch and image.

    Args:
        attribute: ``weather`` or ``battery``.
        values: weather only: the weather values the understanding records may show.
        low: battery only: the lowest battery percentage they may show (0..100).
        high: battery only: the highest (0..100, at least ``low``).
    """

    attribute: str
    values: Optional[list[str]] = None
    low: Optional[int] = None
    high: Optional[int] = None

    def __post_init__(self) -> None:
        if self.values is not None and not isinstance(self.values, (str, tuple)):
            object.__setattr__(self, "values", tuple(self.values))

    def _validate(self, key: str) -> None:
        if self.attribute not in BIASABLE:
            raise VariantError(f"{key}.attribute: unknown attribute {self.attribute!r}; can bias one of {list(BIASABLE)}")
        if self.attribute == "weather":
            if self.low is not None or self.high is not None:
                raise VariantError(f"{key}: low/high restrict battery; for weather give {key}.values")
            if isinstance(self.values, str):
                raise VariantError(f"{key}.values: give a list of weather values, e.g. [{self.values!r}], not a string")
            if not self.values:
                raise VariantError(f"{key}.values: the understanding records need at least one weather value; "
                                   f"choose from {list(WEATHERS)}")
            unknown = [v for v in self.values if v not in WEATHERS]
            if unknown:
                raise VariantError(f"{key}.values: unknown weather value(s) {unknown}; expected values from {list(WEATHERS)}")
            if len(set(self.values)) != len(self.values):
                raise VariantError(f"{key}.values: repeated values in {list(self.values)}")
        else:
            if self.values is not None:
                raise VariantError(f"{key}.values restricts weather; for battery give {key}.low and {key}.high")
            if self.low is None or self.high is None:
                raise VariantError(f"{key}: a battery bias needs both {key}.low and {key}.high (0..100)")
            for name in ("low", "high"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
                    raise VariantError(f"{key}.{name}: battery bounds are integers in 0..100, got {value!r}")
            if self.low > self.high:
                raise VariantError(f"{key}: low ({self.low}) is above high ({self.high}); the range would be empty")

    def allowed(self) -> tuple:
        return tuple(self.values) if self.attribute == "weather" else tuple(range(self.low, self.high + 1))

    def apply(self, attrs: WatchAttributes, key: tuple) -> WatchAttributes:
        """``attrs`` with the biased attribute inside the allowed set (unchanged when already inside)."""
        value = getattr(attrs, self.attribute)
        allowed = self.allowed()
        if value in allowed:
            return attrs
        return dataclasses.replace(attrs, **{self.attribute: stable_rng(*key, "bias").choice(allowed)})


@dataclass(frozen=True)
class ExtraData:
    """Extra task-specific records from new watches, appended to the train split (data scaling).

    Give exactly one of ``size`` or ``watches``. ``size`` is the paper's name (per 180k base
    records: ``33k``/``68k``/``120k`` generation, ``68k``/``120k``/``180k`` understanding) and is
    scaled to the base: new watches = paper records / records per watch x num_train_watches /
    60,000, rounded. A generation watch adds 1 record, an understanding watch 2 (vqa + caption).

    Args:
        task: ``generation`` or ``understanding``.
        size: the paper's size name, scaled to the base set.
        watches: or an absolute number of new watches.
    """

    task: str
    size: Optional[str] = None
    watches: Optional[int] = None

    @property
    def tasks(self) -> tuple[str, ...]:
        return EXTRA_TASKS[self.task]

    def _validate(self, key: str) -> None:
        if self.task not in EXTRA_TASKS:
            raise VariantError(f"{key}.task: unknown value {self.task!r}; expected one of {list(EXTRA_TASKS)}")
        if (self.size is None) == (self.watches is None):
            raise VariantError(f"{key}: give exactly one of {key}.size (the paper's sizes, scaled) or {key}.watches")
        if self.size is not None and self.size not in PAPER_EXTRA_RECORDS[self.task]:
            raise VariantError(f"{key}.size: unknown size {self.size!r} for {self.task} records; "
                               f"the paper's sizes are {list(PAPER_EXTRA_RECORDS[self.task])}")
        if self.watches is not None and (isinstance(self.watches, bool) or not isinstance(self.watches, int) or self.watches < 1):
            raise VariantError(f"{key}.watches: must be a positive integer, got {self.watches!r}")

    def num_watches(self, base_watches: int) -> int:
        """New watches for a base of ``base_watches`` watches."""
        if self.watches is not None:
            return self.watches
        paper_watches = PAPER_EXTRA_RECORDS[self.task][self.size] / len(self.tasks)
        return round(paper_watches * base_watches / PAPER_BASE_WATCHES)


@dataclass(frozen=True)
class DataVariant:
    """The dataset variant; every field optional, the empty spec is the standard data (see module doc).

    Args:
        extra: extra generation-only or understanding-only records from new watches (train only).
        bias: an attribute restricted in the understanding records (train only).
        train: look and wording of the train split.
        val: of the validation split (default: the train style).
        test: of the test split (default: the train style).
    """

    extra: Optional[ExtraData] = None
    bias: Optional[UnderstandingBias] = None
    train: SplitStyle = field(default_factory=SplitStyle)
    val: Optional[SplitStyle] = None
    test: Optional[SplitStyle] = None

    def __post_init__(self) -> None:
        for name, kind in (("extra", ExtraData), ("bias", UnderstandingBias)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise VariantError(f"{KEY}.{name}: expected a mapping of {kind.__name__} fields, got {value!r}")
        for name in ("train", "val", "test"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, SplitStyle):
                raise VariantError(f"{KEY}.{name}: expected a mapping of SplitStyle fields, got {value!r}")
        if self.train is None:
            object.__setattr__(self, "train", SplitStyle())
        if self.extra is not None:
            self.extra._validate(f"{KEY}.extra")
        if self.bias is not None:
            self.bias._validate(f"{KEY}.bias")
        for name in ("train", "val", "test"):
            if getattr(self, name) is not None:
                getattr(self, name)._validate(f"{KEY}.{name}")

    # ------------------------------------------------------------------ per split
    def style(self, split: str) -> SplitStyle:
        """The style of ``split``: its own for val/test when set, otherwise the train style."""
        own = getattr(self, split, None) if split in ("val", "test") else None
        return own if own is not None else self.train

    def bias_for(self, split: str) -> Optional[UnderstandingBias]:
        return self.bias if split == BIASED_SPLIT else None

    def extra_for(self, split: str) -> Optional[ExtraData]:
        return self.extra if split == BIASED_SPLIT else None

    def changes(self, split: str) -> bool:
        """Whether ``split`` differs from the standard data under this variant."""
        return self.bias_for(split) is not None or self.extra_for(split) is not None or self.style(split) != SplitStyle()

    def is_default(self) -> bool:
        return self == DataVariant()

    # ------------------------------------------------------------------ checks
    def check(self, tasks: Sequence[str], mode_key: str = "data.mode") -> None:
        """Refuse a variant whose extra records or bias the task set would silently drop."""
        if self.extra is not None:
            kept = [t for t in self.extra.tasks if t in tasks]
            if not kept:
                raise VariantError(
                    f"{KEY}.extra.task={self.extra.task!r} adds only {list(self.extra.tasks)} records, which {mode_key} "
                    f"(tasks {list(tasks)}) drops; change {KEY}.extra.task or {mode_key}"
                )
        if self.bias is not None and not any(t in tasks for t in UNDERSTANDING_TASKS):
            raise VariantError(
                f"{KEY}.bias restricts the understanding records, and {mode_key} (tasks {list(tasks)}) keeps none; "
                f"remove {KEY}.bias or change {mode_key}"
            )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """Plain data (for hyper-parameters and YAML); ``None`` fields are left out."""
        def clean(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items() if v is not None}
            if isinstance(value, tuple):
                return list(value)
            return value

        return clean(dataclasses.asdict(self))

    @classmethod
    def from_mapping(cls, mapping: Optional[Mapping[str, Any]]) -> "DataVariant":
        """Build from plain data, naming any unknown key; accepts the variant or a config holding ``data.variant``."""
        if mapping is None:
            return cls()
        if not isinstance(mapping, Mapping):
            raise VariantError(f"{KEY}: expected a mapping, got {type(mapping).__name__}")
        if "data" in mapping and isinstance(mapping["data"], Mapping):
            mapping = mapping["data"].get("variant") or {}
        parts = {}
        kinds = {"extra": ExtraData, "bias": UnderstandingBias, "train": SplitStyle, "val": SplitStyle, "test": SplitStyle}
        _check_keys(mapping, kinds, KEY)
        for name, value in mapping.items():
            if value is None:
                continue
            if isinstance(value, Mapping):
                kind = kinds[name]
                _check_keys(value, {f.name: None for f in dataclasses.fields(kind)}, f"{KEY}.{name}")
                missing = [f.name for f in dataclasses.fields(kind)
                           if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in value]
                if missing:
                    raise VariantError(f"{KEY}.{name}: missing required key(s) {missing}")
                value = kind(**value)
            parts[name] = value
        return cls(**parts)

    @classmethod
    def coerce(cls, value: Any) -> "DataVariant":
        """A DataVariant from ``None``, a mapping or a DataVariant."""
        return value if isinstance(value, cls) else cls.from_mapping(value)


def _check_keys(mapping: Mapping[str, Any], known: Mapping[str, Any], key: str) -> None:
    unknown = [k for k in mapping if k not in known]
    if unknown:
        raise VariantError(f"{key}: unknown key(s) {unknown}; known keys: {list(known)}")
