"""The synthetic "smart watch" of the paper (docs/paper.md section 1.1): attributes, sampling, rendering.

Every watch is a pure function of ``(seed, split, index)``: its attributes come from an RNG
seeded by a SHA-256 hash of ``f"{seed}/{split}/{index}"``, so watch 42 of the train split is the
same picture whatever the worker count, batch size or generation order, and different splits
draw from unrelated streams.

Hour sampling (the paper's 00/12 ambiguity): the paper draws the hour from 0..12, and hours 0
and 12 render identically but are labelled "00" and "12", which is label noise. By default we
draw the hour from 1..12 (the top position is always "12"); ``paper_hours=True`` restores the
paper's 0..12 draw.

The renderer scales every length by ``size / 224`` so any square size is drawn natively rather
than resized from a 224 px picture. ``WatchStyle`` varies the look for out-of-distribution tests
(other icon designs, battery colours and fonts, or rendering at 224 px then downscaling as a
paper-style pipeline does); the default style draws exactly the pictures drawn before it existed.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from PIL import Image, ImageDraw, ImageFont

WEATHERS = ("sunny", "cloudy", "raining")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
LAYOUTS = ("random", "weather_tl")  # weather_tl: the weather icon always top-left (docs/paper.md 1.5, for the probe)

REFERENCE_SIZE = 224  # the paper's canvas; all pixel constants below are at this size
CORNER_ANCHORS_224 = {"top-left": (10, 10), "top-right": (174, 10), "bottom-left": (10, 194), "bottom-right": (174, 194)}
HAND_LENGTHS = {"hour": 0.5, "minute": 0.7, "second": 0.9}  # fractions of the face radius
HAND_WIDTHS_224 = {"hour": 6, "minute": 4, "second": 2}
ICON_SIZE_224 = 30

BACKGROUND = (255, 255, 255)
HAND_COLOR = (255, 255, 255)
BATTERY_GREEN = (0, 170, 0)
BLACK = (0, 0, 0)
SUN_YELLOW = (255, 196, 0)
SUN_EDGE = (235, 140, 0)
CLOUD_LIGHT = (190, 192, 198)
CLOUD_DARK = (105, 110, 122)
CLOUD_EDGE = (90, 92, 100)
RAIN_BLUE = (25, 100, 235)

# --- Style variants (out-of-distribution looks); the first entry of each is the default.
ICON_DESIGNS = ("default", "flat", "paper")
BATTERY_COLORS = {"green": BATTERY_GREEN, "blue": (0, 90, 230), "orange": (245, 130, 0), "purple": (140, 40, 180)}
FONTS = ("default", "large", "bitmap")
RENDER_MODES = ("native", "downscale")
BATTERY_BARS = ("short", "paper")


@dataclass(frozen=True)
class WatchStyle:
    """How a watch is drawn, apart from its attributes; the defaults are the look every shipped
    weight was trained on (the paper's, but for the battery bar: see ``battery_bar``).

    ``icons``: ``default`` (the procedural icons below), ``flat`` (another design: an orange sun
    with a ring of dots, an outlined white cloud, a blue-grey cloud with rain streaks) or ``paper``
    (after the paper's PNG icons: a plain yellow sun with a pale halo; cloudy a pale white cloud,
    barely visible on the white background, with a small sun peeking out at its top left; a grey
    cloud over blue drops).
    ``battery_color``: the fill bar colour, one of BATTERY_COLORS. ``font``: the battery text.
    ``default`` is Pillow's scalable default font, Aileron Regular (``ImageFont.load_default(size=)``,
    which needs FreeType), at 11 px at 224 (at least 6); ``large`` the same font at 14 px (at least 8,
    so it differs at 64 px too); ``bitmap`` Pillow's old fixed 11 px bitmap font
    (``load_default_imagefont()``, what ``load_default()`` returned before Pillow 10.1), drawn at 224
    and resized. All scale with the canvas. The paper's generator called ``load_default()`` under
    Pillow 10.4: Aileron at its default 10 px, not the bitmap font. ``default`` draws the same face
    1 px larger; it stays so, as changing it would change every picture and the assets trained on them. ``render``:
    ``native`` draws at the requested size; ``downscale`` draws at 224 px and resizes with BICUBIC,
    as a pipeline that stores 224 px pictures and lets the image processor resize them does.
    ``battery_bar``: ``short`` draws ``int(23 * s * p / 100)`` columns of fill (s = size / 224), which at
    224 px is one column fewer than the paper's bar; ``paper`` draws the paper's bar exactly (PIL's
    inclusive rectangle: ``int(23 * p / 100) + 1`` columns at 224, one column at 0 %, over the
    outline's right edge at 100 %), scaled. ``short`` stays the default because every shipped
    weight and measured result in this repository was made with it.
    """

    icons: str = "default"
    battery_color: str = "green"
    font: str = "default"
    render: str = "native"
    battery_bar: str = "short"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("icons", self.icons, ICON_DESIGNS),
            ("battery_color", self.battery_color, tuple(BATTERY_COLORS)),
            ("font", self.font, FONTS),
            ("render", self.render, RENDER_MODES),
            ("battery_bar", self.battery_bar, BATTERY_BARS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


DEFAULT_STYLE = WatchStyle()
# Every field of a WatchStyle and the values it takes; the first value is the default.
STYLE_CHOICES: dict[str, tuple[str, ...]] = {
    "icons": ICON_DESIGNS, "battery_color": tuple(BATTERY_COLORS), "font": FONTS, "render": RENDER_MODES,
    "battery_bar": BATTERY_BARS,
}


def style_setting(text: str) -> tuple[str, str]:
    """``"icons=paper"`` -> ``("icons", "paper")``, checked against STYLE_CHOICES."""
    name, eq, value = text.partition("=")
    if not eq or name not in STYLE_CHOICES or value not in STYLE_CHOICES[name]:
        choices = ", ".join(f"{k}={'|'.join(v)}" for k, v in STYLE_CHOICES.items())
        raise ValueError(f"unknown style setting {text!r}; expected FIELD=VALUE, one of {choices}")
    return name, value


def style_variations() -> dict[str, WatchStyle]:
    """The default style and each style that differs from it in one field, by name
    (``default``, ``icons=flat``, ``battery_color=blue``, ...): the looks a reader is checked on."""
    out = {"default": DEFAULT_STYLE}
    for name, values in STYLE_CHOICES.items():
        for value in values[1:]:
            out[f"{name}={value}"] = dataclasses.replace(DEFAULT_STYLE, **{name: value})
    return out


def stable_seed(*key: Any) -> int:
    """A 64-bit seed from a key via SHA-256; unlike ``hash()`` it is the same in every process."""
    text = "/".join(str(part) for part in key)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def stable_rng(*key: Any) -> random.Random:
    """An independent ``random.Random`` for one key, e.g. ``(seed, split, index)``."""
    return random.Random(stable_seed(*key))


@dataclass(frozen=True)
class WatchAttributes:
    """Everything that determines one watch picture; validated so a bad value fails at creation."""

    hour: int
    minute: int
    second: int
    weather: str
    battery: int
    weather_pos: str
    battery_pos: str
    face_color: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "face_color", tuple(int(c) for c in self.face_color))
        checks = [
            (0 <= self.hour <= 12, f"hour must be in 0..12, got {self.hour}"),
            (0 <= self.minute <= 59, f"minute must be in 0..59, got {self.minute}"),
            (0 <= self.second <= 59, f"second must be in 0..59, got {self.second}"),
            (self.weather in WEATHERS, f"weather must be one of {WEATHERS}, got {self.weather!r}"),
            (0 <= self.battery <= 100, f"battery must be in 0..100, got {self.battery}"),
            (self.weather_pos in CORNERS, f"weather_pos must be one of {CORNERS}, got {self.weather_pos!r}"),
            (self.battery_pos in CORNERS, f"battery_pos must be one of {CORNERS}, got {self.battery_pos!r}"),
            (self.weather_pos != self.battery_pos, f"weather and battery share the corner {self.weather_pos!r}"),
            (
                len(self.face_color) == 3 and all(0 <= c <= 255 for c in self.face_color),
                f"face_color must be three ints in 0..255, got {self.face_color}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def time_str(self) -> str:
        return f"{self.hour:02d}:{self.minute:02d}:{self.second:02d}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["face_color"] = list(self.face_color)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WatchAttributes":
        return cls(**{**d, "face_color": tuple(d["face_color"])})


def sample_watch(seed: int, split: str, index: int, paper_hours: bool = False, layout: str = "random") -> WatchAttributes:
    """Attributes of watch ``index`` of ``split``; the same for the same arguments, always.

    Hour is uniform in 1..12 by default (no 00/12 label noise); ``paper_hours=True`` draws it
    from 0..12 as the paper does. Minute and second are uniform 0..59, battery 0..100, the two
    corners are distinct, and the face colour is uniform over all RGB triples.

    ``layout="weather_tl"`` puts the weather icon top-left and the battery in one of the other
    three corners, uniformly, from a separate RNG so every other attribute is the one the
    ``random`` layout draws for the same watch.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rng = stable_rng(seed, split, index)
    hour = rng.randint(0, 12) if paper_hours else rng.randint(1, 12)
    minute = rng.randint(0, 59)
    second = rng.randint(0, 59)
    weather = rng.choice(WEATHERS)
    battery = rng.randint(0, 100)
    weather_pos, battery_pos = rng.sample(CORNERS, 2)
    face_color = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
    if layout == "weather_tl":
        weather_pos = "top-left"
        battery_pos = stable_rng(seed, split, index, "layout").choice(CORNERS[1:])
    return WatchAttributes(hour, minute, second, weather, battery, weather_pos, battery_pos, face_color)


def _scale(size: int) -> float:
    return size / REFERENCE_SIZE


def face_geometry(size: int) -> tuple[float, int]:
    """(centre coordinate, face radius) for a ``size`` x ``size`` canvas."""
    return size / 2, int(0.4 * size)


def corner_anchor(corner: str, size: int) -> tuple[int, int]:
    """Top-left pixel of an element placed in ``corner``, the paper's anchors scaled."""
    ax, ay = CORNER_ANCHORS_224[corner]
    s = _scale(size)
    return round(ax * s), round(ay * s)


def hand_angles(attrs: WatchAttributes) -> dict[str, float]:
    """Degrees clockwise from 12 o'clock; minute and hour hands ignore seconds, as in the paper."""
    return {
        "hour": (attrs.hour % 12 + attrs.minute / 60) * 30,
        "minute": attrs.minute * 6.0,
        "second": attrs.second * 6.0,
    }


def hand_tips(attrs: WatchAttributes, size: int) -> dict[str, tuple[float, float]]:
    """Pixel coordinates (x, y) of the hour, minute and second hand tips."""
    centre, radius = face_geometry(size)
    tips = {}
    for name, degrees in hand_angles(attrs).items():
        length = HAND_LENGTHS[name] * radius
        theta = math.radians(degrees)
        tips[name] = (centre + length * math.sin(theta), centre - length * math.cos(theta))
    return tips


def hand_width(name: str, size: int) -> int:
    return max(1, round(HAND_WIDTHS_224[name] * _scale(size)))


def battery_line_width(size: int) -> int:
    return max(1, round(_scale(size)))


def battery_outline_box(attrs: WatchAttributes, size: int) -> tuple[int, int, int, int]:
    """Inclusive (x0, y0, x1, y1) of the black battery outline: 26 x 11 px at 224."""
    x, y = corner_anchor(attrs.battery_pos, size)
    s = _scale(size)
    return x, y, x + round(25 * s), y + round(10 * s)


def battery_fill_box(attrs: WatchAttributes, size: int, bar: str = "short") -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the green fill bar, x1 and y1 EXCLUSIVE (numpy-slice style); rows y+2..y+8.

    ``paper``: the paper's bar, drawn with PIL's inclusive rectangle from x+2 to x+2+int(23*p/100):
    at 224 px that is columns x+2 .. x+3+int(23*p/100) (exclusive), one column at 0 % and the
    outline's right edge covered at 100 %; other sizes scale both ends. ``short`` (the default
    style): ``int(23 * scale * p / 100)`` columns, never reaching the outline's right edge; one
    column fewer than the paper's at 224 px.
    """
    if bar not in BATTERY_BARS:
        raise ValueError(f"unknown battery bar {bar!r}; expected one of {BATTERY_BARS}")
    x, y = corner_anchor(attrs.battery_pos, size)
    s = _scale(size)
    x0, y0 = x + round(2 * s), y + round(2 * s)
    if bar == "paper":
        x1 = x + round((3 + int(23 * attrs.battery / 100)) * s)
    else:
        inside_right = battery_outline_box(attrs, size)[2] - battery_line_width(size) + 1  # exclusive
        x1 = min(x0 + int(23 * s * attrs.battery / 100), inside_right)
    return x0, y0, x1, y + round(9 * s)


def weather_icon_box(attrs: WatchAttributes, size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), x1 and y1 exclusive, of the weather icon: 30 x 30 px at 224."""
    x, y = corner_anchor(attrs.weather_pos, size)
    icon = max(1, round(ICON_SIZE_224 * _scale(size)))
    return x, y, x + icon, y + icon


@functools.lru_cache(maxsize=None)
def _battery_font(size: int, points_224: int = 11, smallest: int = 6) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(smallest, round(points_224 * _scale(size))))


def _cloud(draw: ImageDraw.ImageDraw, u: float, dx: float, dy: float, fill: tuple, edge: tuple) -> None:
    """A cloud from three puffs and a flat base, in unit coordinates times ``u``; edge drawn first, larger."""
    puffs = [(0.34, 0.58, 0.16), (0.54, 0.47, 0.21), (0.73, 0.60, 0.14)]
    base = (0.18, 0.58, 0.86, 0.76)
    for colour, grow in ((edge, 0.035), (fill, 0.0)):
        for cx, cy, r in puffs:
            r += grow
            draw.ellipse([(cx - r + dx) * u, (cy - r + dy) * u, (cx + r + dx) * u, (cy + r + dy) * u], fill=colour)
        x0, y0, x1, y1 = base
        draw.rounded_rectangle(
            [(x0 - grow + dx) * u, (y0 - grow + dy) * u, (x1 + grow + dx) * u, (y1 + grow + dy) * u],
            radius=0.09 * u, fill=colour,
        )


def _sun(draw: ImageDraw.ImageDraw, u: float, cx: float, cy: float, r: float, rays: bool) -> None:
    if rays:
        for k in range(8):
            a = math.radians(k * 45)
            inner, outer = r + 0.06, r + 0.19
            draw.line(
                [((cx + inner * math.cos(a)) * u, (cy + inner * math.sin(a)) * u),
                 ((cx + outer * math.cos(a)) * u, (cy + outer * math.sin(a)) * u)],
                fill=SUN_YELLOW, width=max(1, round(0.08 * u)),
            )
    draw.ellipse([(cx - r - 0.03) * u, (cy - r - 0.03) * u, (cx + r + 0.03) * u, (cy + r + 0.03) * u], fill=SUN_EDGE)
    draw.ellipse([(cx - r) * u, (cy - r) * u, (cx + r) * u, (cy + r) * u], fill=SUN_YELLOW)


FLAT_ORANGE = (250, 120, 20)
FLAT_CLOUD = (250, 250, 250)
FLAT_OUTLINE = (40, 40, 48)
FLAT_RAIN_CLOUD = (110, 128, 158)
FLAT_RAIN = (70, 170, 255)


def _flat_icon(draw: ImageDraw.ImageDraw, u: float, weather: str) -> None:
    """The ``flat`` design: same meanings, other shapes and colours than the default icons."""
    if weather == "sunny":  # an orange disc in a ring of eight dots
        draw.ellipse([0.32 * u, 0.32 * u, 0.68 * u, 0.68 * u], fill=FLAT_ORANGE)
        for k in range(8):
            a = math.radians(k * 45 + 22.5)
            cx, cy = 0.5 + 0.34 * math.cos(a), 0.5 + 0.34 * math.sin(a)
            draw.ellipse([(cx - 0.06) * u, (cy - 0.06) * u, (cx + 0.06) * u, (cy + 0.06) * u], fill=FLAT_ORANGE)
    elif weather == "cloudy":  # a white cloud with a dark outline, no sun
        _cloud(draw, u, -0.02, -0.02, FLAT_CLOUD, FLAT_OUTLINE)
    else:  # raining: a blue-grey cloud over four straight light-blue streaks
        _cloud(draw, u, 0.0, -0.24, FLAT_RAIN_CLOUD, FLAT_RAIN_CLOUD)
        for x in (0.26, 0.42, 0.58, 0.74):
            draw.line([(x * u, 0.6 * u), (x * u, 0.9 * u)], fill=FLAT_RAIN, width=round(0.06 * u))


PAPER_CLOUD = (250, 250, 252)
PAPER_CLOUD_EDGE = (222, 224, 230)
PAPER_RAIN_CLOUD = (150, 154, 162)
PAPER_DROP = (40, 120, 240)


def _paper_icon(draw: ImageDraw.ImageDraw, u: float, weather: str) -> None:
    """The ``paper`` design, after the paper's PNG icons (docs/paper.md 1.1): on a white background its
    cloudy icon is little more than a faint outline and a small sun at the top left."""
    if weather == "sunny":  # a yellow disc with a thin pale halo, no rays
        draw.ellipse([0.2 * u, 0.2 * u, 0.8 * u, 0.8 * u], fill=(255, 236, 150))
        draw.ellipse([0.26 * u, 0.26 * u, 0.74 * u, 0.74 * u], fill=SUN_YELLOW)
    elif weather == "cloudy":  # a small sun peeking out at the top left of a pale white cloud
        draw.ellipse([0.1 * u, 0.12 * u, 0.42 * u, 0.44 * u], fill=SUN_YELLOW)
        _cloud(draw, u, 0.04, 0.08, PAPER_CLOUD, PAPER_CLOUD_EDGE)
    else:  # raining: a grey cloud over blue drops
        _cloud(draw, u, 0.0, -0.22, PAPER_RAIN_CLOUD, PAPER_RAIN_CLOUD)
        for cx, cy in ((0.3, 0.72), (0.5, 0.82), (0.7, 0.72)):
            draw.ellipse([(cx - 0.06) * u, (cy - 0.08) * u, (cx + 0.06) * u, (cy + 0.08) * u], fill=PAPER_DROP)


@functools.lru_cache(maxsize=None)
def weather_icon(weather: str, icon_px: int, design: str = "default") -> Image.Image:
    """The RGBA icon for ``weather`` at ``icon_px`` pixels in ``design``, drawn procedurally.

    Drawn on a larger canvas and downsampled (like the paper's 101 px PNG icons resized to 30 px),
    so the icons stay smooth and distinct by colour even when only a few pixels wide.
    Cached: callers must not modify the returned image.
    """
    if weather not in WEATHERS:
        raise ValueError(f"unknown weather {weather!r}; expected one of {WEATHERS}")
    if design not in ICON_DESIGNS:
        raise ValueError(f"unknown icon design {design!r}; expected one of {ICON_DESIGNS}")
    u = max(120, 4 * icon_px)
    canvas = Image.new("RGBA", (u, u), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    if design == "flat":
        _flat_icon(draw, u, weather)
    elif design == "paper":
        _paper_icon(draw, u, weather)
    elif weather == "sunny":
        _sun(draw, u, 0.5, 0.5, 0.23, rays=True)
    elif weather == "cloudy":
        _sun(draw, u, 0.68, 0.34, 0.2, rays=False)
        _cloud(draw, u, -0.04, 0.06, CLOUD_LIGHT, CLOUD_EDGE)
    elif weather == "raining":
        _cloud(draw, u, 0.0, -0.2, CLOUD_DARK, CLOUD_EDGE)
        for x in (0.3, 0.5, 0.7):
            draw.line([(x * u, 0.68 * u), ((x - 0.07) * u, 0.92 * u)], fill=RAIN_BLUE, width=round(0.09 * u))
    else:
        raise ValueError(f"unknown weather {weather!r}; expected one of {WEATHERS}")
    return canvas.resize((icon_px, icon_px), Image.LANCZOS)


def _paste_bitmap_text(image: Image.Image, xy: tuple[int, int], text: str, size: int) -> None:
    """PIL's fixed 11 px bitmap font, drawn at 224 px scale and resized to ``size`` (a scaled mask)."""
    font = ImageFont.load_default_imagefont()
    x0, y0, x1, y1 = font.getbbox(text)
    mask = Image.new("L", (x1, y1), 0)
    ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=font)
    s = _scale(size)
    if s != 1:
        mask = mask.resize((max(1, round(x1 * s)), max(1, round(y1 * s))), Image.LANCZOS)
    image.paste(BLACK, (xy[0], xy[1], xy[0] + mask.width, xy[1] + mask.height), mask)


def render_watch(attrs: WatchAttributes, size: int = 224, style: WatchStyle = DEFAULT_STYLE) -> Image.Image:
    """The RGB ``size`` x ``size`` picture of a watch (draw order: face, hands, weather, battery)."""
    if style.render == "downscale" and size != REFERENCE_SIZE:
        native = dataclasses.replace(style, render="native")
        return render_watch(attrs, REFERENCE_SIZE, native).resize((size, size), Image.BICUBIC)
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)

    centre, radius = face_geometry(size)
    draw.ellipse([centre - radius, centre - radius, centre + radius, centre + radius], fill=attrs.face_color)

    for name, tip in hand_tips(attrs, size).items():  # hour, minute, second
        draw.line([(centre, centre), tip], fill=HAND_COLOR, width=hand_width(name, size))

    x0, y0, x1, _ = weather_icon_box(attrs, size)
    icon = weather_icon(attrs.weather, x1 - x0, style.icons)
    image.paste(icon, (x0, y0), icon)

    bx0, by0, bx1, by1 = battery_outline_box(attrs, size)
    draw.rectangle([bx0, by0, bx1, by1], outline=BLACK, width=battery_line_width(size))
    fx0, fy0, fx1, fy1 = battery_fill_box(attrs, size, style.battery_bar)
    if fx1 > fx0:
        draw.rectangle([fx0, fy0, fx1 - 1, fy1 - 1], fill=BATTERY_COLORS[style.battery_color])
    text_xy = (bx0 + round(30 * _scale(size)), by0)
    if style.font == "bitmap":
        _paste_bitmap_text(image, text_xy, f"{attrs.battery}%", size)
    else:
        font = _battery_font(size, 14, 8) if style.font == "large" else _battery_font(size)
        draw.text(text_xy, f"{attrs.battery}%", fill=BLACK, font=font)
    return image
