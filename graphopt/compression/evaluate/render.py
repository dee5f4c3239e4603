"""Text lines and pages drawn with Pillow and the DejaVu fonts, with their content known exactly.

Everything is deterministic from ``(purpose, seed)``: the evaluation sets and the calibration sets use
different purposes, so their random streams never coincide whatever seeds they are given.

* ``text_lines``: short lines of words, numbers, dates, prices, codes and punctuation, keeping only
  tokens whose characters a model's dictionary contains.
* ``render_line``: one line as a tight crop (dark text on a light background, light noise), the way a
  detector's crop reaches a recognizer.
* ``render_page``: a light page of several lines at known positions; each line's box is the bounding
  box of its ink.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Collection

import numpy as np

from graphopt.core.errors import GraphoptError

FONT_DIR = "/usr/share/fonts/truetype/dejavu"
# Regular, serif, bold, monospace and condensed faces (Debian's fonts-dejavu-core has all five).
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf",
              "DejaVuSansCondensed.ttf")

# Purposes: one random stream each, so calibration data never repeats evaluation data.
EVALUATION = 0
CALIBRATION = 1

_WORDS = (
    "the of and to in is for on with as by at from this that are was be have it not or an will can "
    "all new more one about time year day people way work life world home page order total price date "
    "number name address phone email account invoice receipt payment amount balance customer service "
    "product item quantity unit tax discount shipping delivery store market city street road station "
    "report table figure section chapter note summary result value data model test sample level system "
    "network server client open close start stop check update version release build install window "
    "paper letter office school student teacher class group team member project plan meeting room "
    "water light green blue black white red morning evening monday friday march june october winter "
    "summer coffee bread apple orange garden river mountain island north south east west center public"
).split()
_UNITS = ("kg", "km", "ml", "cm", "mm", "GB", "MB", "Hz", "kW", "pcs")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_TRAIL = (".", ",", ":", ";", "!", "?")


def rng_for(purpose: int, seed: int, *stream: int) -> np.random.Generator:
    """The generator of one purpose (EVALUATION, CALIBRATION), seed and sub-stream."""
    return np.random.default_rng([int(purpose), int(seed), *map(int, stream)])


@functools.lru_cache(maxsize=None)
def font_paths() -> tuple[str, ...]:
    """The DejaVu font files present; none at all is a GraphoptError naming the package to install."""
    found = tuple(os.path.join(FONT_DIR, f) for f in FONT_FILES if os.path.isfile(os.path.join(FONT_DIR, f)))
    if not found:
        raise GraphoptError(f"no DejaVu fonts in {FONT_DIR}: install Debian's fonts-dejavu-core "
                            "(apt-get install fonts-dejavu-core) to render evaluation text")
    return found


@functools.lru_cache(maxsize=64)
def _font(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def _token(rng: np.random.Generator) -> str:
    kind = rng.integers(0, 12)
    word = str(rng.choice(_WORDS))
    if kind <= 3:
        return word
    if kind == 4:
        return word.capitalize()
    if kind == 5:
        return word.upper()
    if kind == 6:
        return str(rng.integers(0, 100000))
    if kind == 7:
        return f"${rng.integers(1, 1000)}.{rng.integers(0, 100):02d}"
    if kind == 8:
        y, m, d = rng.integers(1990, 2031), rng.integers(1, 13), rng.integers(1, 29)
        return (f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}", f"{d} {_MONTHS[m - 1]} {y}")[rng.integers(0, 3)]
    if kind == 9:
        return (f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}", f"{rng.integers(1, 100)}%",
                f"{rng.integers(1, 1000)}{rng.choice(_UNITS)}")[rng.integers(0, 3)]
    if kind == 10:
        letters = "".join(chr(ord("A") + int(i)) for i in rng.integers(0, 26, size=2))
        return (f"{letters}-{rng.integers(100, 10000)}", f"#{rng.integers(1, 1000)}",
                f"({word})", f"{word}@{rng.choice(_WORDS)}.com")[rng.integers(0, 4)]
    return word + str(rng.choice(_TRAIL))


def text_line(rng: np.random.Generator, charset: Collection[str] | None = None, words: tuple[int, int] = (2, 6)) -> str:
    """One line of ``words`` tokens (inclusive range), each drawn only from characters in ``charset``."""
    n = int(rng.integers(words[0], words[1] + 1))
    tokens: list[str] = []
    while len(tokens) < n:
        tok = _token(rng)
        if charset is None or all(c in charset for c in tok):
            tokens.append(tok)
    return " ".join(tokens)


@dataclasses.dataclass(frozen=True)
class Style:
    """How one line is drawn: font file, pixel size, ink and paper grey levels, noise sigma."""

    font: str
    size: int
    ink: int
    paper: int
    noise: float


def style(rng: np.random.Generator, sizes: tuple[int, int] = (28, 40)) -> Style:
    fonts = font_paths()
    return Style(fonts[int(rng.integers(0, len(fonts)))], int(rng.integers(sizes[0], sizes[1] + 1)),
                 int(rng.integers(0, 60)), int(rng.integers(215, 256)), float(rng.uniform(0.0, 6.0)))


def _noisy(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    if sigma <= 0:
        return img
    noise = rng.normal(0.0, sigma, size=img.shape[:2])[..., None]
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def line_width(text: str, st: Style) -> int:
    """Width in pixels of ``text`` drawn in ``st`` (its advance, margins excluded)."""
    return int(np.ceil(_font(st.font, st.size).getlength(text)))


def render_line(text: str, st: Style, rng: np.random.Generator) -> np.ndarray:
    """``text`` as a tight crop: an RGB uint8 image [H, W, 3] with a small margin around the ink."""
    from PIL import Image, ImageDraw

    font = _font(st.font, st.size)
    ascent, descent = font.getmetrics()
    pad_x, pad_y = int(rng.integers(2, st.size // 3 + 3)), int(rng.integers(2, st.size // 5 + 3))
    w, h = line_width(text, st) + 2 * pad_x, ascent + descent + 2 * pad_y
    img = Image.new("RGB", (w, h), (st.paper,) * 3)
    ImageDraw.Draw(img).text((pad_x, pad_y), text, font=font, fill=(st.ink,) * 3)
    return _noisy(np.asarray(img), st.noise, rng)


@dataclasses.dataclass
class Page:
    """A rendered page: RGB uint8 [H, W, 3], and per line its text and ink box (x0, y0, x1, y1)."""

    image: np.ndarray
    texts: list[str]
    boxes: np.ndarray  # float32 [n, 4]


# A line's known box is its ink box grown by this fraction of the ink's height on every side: detection
# labels (ICDAR, PP-OCR's training data) enclose the ink with a small margin, and a DB detector's boxes do
# too. Measured on 20 pages (133 lines) with PP-OCRv4 det fp32: F1 1.00 with the margin, 0.97 without
# (short tokens such as "57%" miss IoU 0.5 against the bare ink box).
BOX_MARGIN = 0.1


def render_page(rng: np.random.Generator, height: int, width: int, charset: Collection[str] | None = None,
                lines: tuple[int, int] = (4, 9)) -> Page:
    """A light page with several text lines at random, non-overlapping rows, their boxes known."""
    from PIL import Image, ImageDraw

    paper = int(rng.integers(225, 256))
    img = Image.new("RGB", (width, height), (paper,) * 3)
    draw = ImageDraw.Draw(img)
    texts: list[str] = []
    boxes: list[tuple[int, int, int, int]] = []
    want = int(rng.integers(lines[0], lines[1] + 1))
    y = int(rng.integers(8, max(9, height // 12)))
    margin = max(8, width // 40)
    while len(texts) < want:
        st = style(rng, sizes=(max(12, height // 40), max(14, height // 18)))
        font = _font(st.font, st.size)
        text = text_line(rng, charset, words=(1, 5))
        while line_width(text, st) > width - 2 * margin and " " in text:
            text = text.rsplit(" ", 1)[0]
        x = int(rng.integers(margin, max(margin + 1, width - margin - line_width(text, st))))
        x0, y0, x1, y1 = draw.textbbox((x, y), text, font=font)
        if y1 + margin > height or x1 > width - 2:
            break
        draw.text((x, y), text, font=font, fill=(st.ink,) * 3)
        texts.append(text)
        grow = BOX_MARGIN * (y1 - y0)
        boxes.append((max(0, x0 - grow), max(0, y0 - grow), min(width, x1 + grow), min(height, y1 + grow)))
        y = y1 + int(rng.integers(st.size // 2 + 4, st.size * 2 + 8))
    image = _noisy(np.asarray(img), float(rng.uniform(0.0, 5.0)), rng)
    return Page(image, texts, np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
