"""Pictures the page shows beside the form: detected faces, the layout, activation overlays.

All return RGB uint8 arrays (H, W, 3); nothing here touches the models. `png_file` turns one
into the file the page is handed.
"""

from __future__ import annotations

import hashlib
import io
import pathlib
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from dynamicid_jax.atomic_write import atomic_write_bytes

# One colour per person, in person order (also used for their activation overlays).
COLOURS = ((230, 57, 70), (29, 120, 230), (46, 170, 80), (240, 160, 20))
PREVIEW_SIDE = 256


def face_preview(image: np.ndarray, bbox, colour=COLOURS[0]) -> np.ndarray:
    """The face's surroundings (box grown by half its size) with the detected box drawn."""
    x0, y0, x1, y1 = (float(v) for v in bbox[:4])
    grow_x, grow_y = 0.5 * (x1 - x0), 0.5 * (y1 - y0)
    h, w = image.shape[:2]
    left, top = max(0, int(x0 - grow_x)), max(0, int(y0 - grow_y))
    right, bottom = min(w, int(x1 + grow_x)), min(h, int(y1 + grow_y))
    crop = Image.fromarray(image[top:bottom, left:right])
    draw = ImageDraw.Draw(crop)
    width = max(2, round(max(crop.size) / 100))
    draw.rectangle([x0 - left, y0 - top, x1 - left, y1 - top], outline=colour, width=width)
    crop.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    return np.asarray(crop)


def canvas_size(height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of the layout canvas: the output's aspect ratio, longer side PREVIEW_SIDE."""
    scale = PREVIEW_SIDE / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def box_from_corners(first: Sequence[float], second: Sequence[float], height: int, width: int) -> list[float]:
    """Two clicked canvas pixels (x, y), any two opposite corners, -> the normalised box
    [y_min, x_min, y_max, x_max] (3 decimals). The first and last pixel column/row map to 0
    and 1, so a click on the canvas edge reaches the picture's edge."""
    ch, cw = canvas_size(height, width)
    xs = sorted(min(max(p[0] / max(cw - 1, 1), 0.0), 1.0) for p in (first, second))
    ys = sorted(min(max(p[1] / max(ch - 1, 1), 0.0), 1.0) for p in (first, second))
    return [round(ys[0], 3), round(xs[0], 3), round(ys[1], 3), round(xs[1], 3)]


def layout_preview(boxes: Sequence[Optional[Sequence[float]]], height: int, width: int,
                   labels: Sequence[str], masks: Sequence[Optional[np.ndarray]] = ()) -> np.ndarray:
    """A canvas of the output's aspect ratio with each box (normalised [y0, x0, y1, x1]) as a
    coloured rectangle labelled with its person, or each mask ((h, w) in [0, 1], `masks.read_mask`;
    stretched to the canvas) painted in the person's colour where at least half white; None
    entries are skipped."""
    ch, cw = canvas_size(height, width)
    canvas = Image.new("RGB", (cw, ch), (245, 245, 245))
    masks = list(masks) + [None] * (len(labels) - len(masks))
    for k, mask in enumerate(masks):
        if mask is None:
            continue
        shown = np.asarray(Image.fromarray(np.asarray(mask, np.float32), "F").resize((cw, ch), Image.BOX)) >= 0.5
        paint = np.asarray(canvas, np.float32)
        colour = np.asarray(COLOURS[k % len(COLOURS)], np.float32)
        paint[shown] = 0.55 * paint[shown] + 0.45 * colour
        canvas = Image.fromarray(paint.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas, "RGBA")
    for k, (mask, label) in enumerate(zip(masks, labels)):
        if mask is not None and mask.max() > 0:
            row, col = divmod(int(np.argmax(np.asarray(mask) >= 0.5 * mask.max())), mask.shape[1])  # first white px
            at = (col * cw / mask.shape[1] + 4, row * ch / mask.shape[0] + 4)
            draw.text(at, label, fill=COLOURS[k % len(COLOURS)] + (255,))
    for k, (box, label) in enumerate(zip(boxes, labels)):
        if box is None or masks[k] is not None:
            continue
        y0, x0, y1, x1 = box
        colour = COLOURS[k % len(COLOURS)]
        rect = [x0 * cw, y0 * ch, x1 * cw - 1, y1 * ch - 1]
        draw.rectangle(rect, fill=colour + (60,), outline=colour + (255,), width=2)
        draw.text((rect[0] + 4, rect[1] + 4), label, fill=colour + (255,))
    draw.rectangle([0, 0, cw - 1, ch - 1], outline=(120, 120, 120))
    return np.asarray(canvas)


def activation_overlay(image: np.ndarray, activation: np.ndarray, colour) -> np.ndarray:
    """image (H, W, 3) uint8; activation (h, w) >= 0 on the latent grid -> the picture in
    dimmed grey, painted in `colour` where the activation is high (normalised by its max, so
    the shape reads even where the weights are small)."""
    h, w = image.shape[:2]
    peak = float(activation.max())
    a = activation / peak if peak > 0 else np.zeros_like(activation)
    a = np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((w, h), Image.NEAREST), np.float32) / 255
    grey = image.astype(np.float32).mean(axis=-1, keepdims=True) * 0.45
    tint = np.asarray(colour, np.float32)[None, None]
    strength = 0.8 * a[..., None]
    out = grey * (1.0 - strength) + tint * strength
    return out.clip(0, 255).astype(np.uint8)


def png_file(image: np.ndarray, folder: pathlib.Path) -> str:
    """image (H, W, 3) uint8 as FOLDER/<sha256 of the PNG>.png, written once and atomically.

    Returned to gradio instead of the array: gradio writes an array to its cache by truncating
    and rewriting the file named by its content every time, so a canvas redrawn unchanged (each
    keystroke in a box field redraws it) could be served half written to a browser fetching
    the same file, which then shows a broken image. A file path it copies atomically, once."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    path = pathlib.Path(folder) / f"{hashlib.sha256(data).hexdigest()}.png"
    if not path.is_file():
        atomic_write_bytes(path, data)
    return str(path)
