"""Text lines rendered with a DejaVu font, as PP-OCR's recognizer reads them, and its CTC decoding."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
LINES = ("Hello World 2024", "graph optimizer", "Invoice No. 58213", "THE QUICK BROWN FOX",
         "total: 42.50 EUR", "ONNX Runtime 1.32")


def render_line(text: str, height: int = 48, width: int = 320) -> np.ndarray:
    """[1, 3, height, width] float32: black text on white, resized to ``height``, normalized to
    [-1, 1] and padded with zeros on the right (PP-OCR's recognition preprocessing)."""
    font = ImageFont.truetype(FONT, 28)
    left, top, right, _ = font.getbbox(text)
    img = Image.new("L", (right - left + 16, 40), 255)
    ImageDraw.Draw(img).text((8 - left, 6 - top), text, fill=0, font=font)
    w = min(width, round(img.width * height / img.height))
    img = img.resize((w, height), Image.BILINEAR)
    out = np.zeros((1, 3, height, width), np.float32)
    out[0, :, :, :w] = (np.asarray(img, np.float32) / 255 - 0.5) / 0.5
    return out


def ctc_decode(logits: np.ndarray, chars: list[str]) -> str:
    """Greedy CTC: the best class per step, repeats merged, blanks (class 0) dropped."""
    best = logits.argmax(-1)[0]
    keep = (best != 0) & np.concatenate([[True], best[1:] != best[:-1]])
    return "".join(chars[i - 1] for i in best[keep] if i - 1 < len(chars))


def render_page(lines=LINES, size: int = 640) -> np.ndarray:
    """[1, 3, size, size] float32: the lines drawn on a white page, ImageNet-normalized (PP-OCR's
    detection preprocessing)."""
    font = ImageFont.truetype(FONT, 30)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(lines):
        draw.text((30 + 15 * (i % 3), 40 + i * (size - 80) // len(lines)), text, fill=(20, 20, 20), font=font)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = (np.asarray(img, np.float64) / 255 - mean) / std
    return x.transpose(2, 0, 1)[None].astype(np.float32)
