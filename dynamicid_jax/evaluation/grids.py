"""Contact sheets: one PNG per identity group and prompt, edits down, seeds across.

The first column holds the reference photo(s) (the first of each person, side by side);
each row is labelled with its requested edit(s). Cells of images not generated yet are gray.
"""

from __future__ import annotations

import pathlib
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from dynamicid_jax.evaluation.protocol import EvalCase
from dynamicid_jax.outputs import atomic_write_bytes, png_bytes

LABEL_HEIGHT = 14


def _scaled(im: Image.Image, width: int, height: int) -> Image.Image:
    """Resized to fit width x height, aspect kept; small generated images are enlarged too."""
    scale = min(width / im.width, height / im.height)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)


def _fit(image: Optional[np.ndarray], size: int) -> Image.Image:
    """Letterbox an RGB uint8 image into a size x size cell (gray when None)."""
    cell = Image.new("RGB", (size, size), (128, 128, 128))
    if image is not None:
        im = _scaled(Image.fromarray(image), size, size)
        cell.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return cell


def _references(cases: Sequence[EvalCase], size: int, read) -> Image.Image:
    """The first reference photo of each person, side by side in one size x size cell."""
    refs = [read(s.identity.refs[0]) for s in cases[0].subjects]
    cell, width = Image.new("RGB", (size, size), (128, 128, 128)), size // len(refs)
    for i, ref in enumerate(refs):
        im = _scaled(Image.fromarray(ref), width, size)
        cell.paste(im, (i * width + (width - im.width) // 2, (size - im.height) // 2))
    return cell


def contact_sheet(cases: Sequence[EvalCase], images: dict[str, Optional[np.ndarray]], read_reference,
                  cell: int = 192) -> np.ndarray:
    """cases of one group/prompt/ablation; images: case.stem -> RGB uint8 or None.
    read_reference(path) -> RGB uint8. Returns the sheet as RGB uint8 (H, W, 3)."""
    edits = sorted({c.edit_tag for c in cases}, key=[c.edit_tag for c in cases].index)
    seeds = sorted({c.seed for c in cases})
    width, height = cell * (len(seeds) + 1), (cell + LABEL_HEIGHT) * len(edits) + LABEL_HEIGHT
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 1), "reference", fill=(0, 0, 0))
    for j, seed in enumerate(seeds):
        draw.text(((j + 1) * cell + 2, 1), f"seed {seed}", fill=(0, 0, 0))
    ref = _references(cases, cell, read_reference)
    by_key = {(c.edit_tag, c.seed): c for c in cases}
    for i, edit in enumerate(edits):
        top = LABEL_HEIGHT + i * (cell + LABEL_HEIGHT)
        draw.text((2, top + 1), edit, fill=(0, 0, 0))
        sheet.paste(ref, (0, top + LABEL_HEIGHT))
        for j, seed in enumerate(seeds):
            case = by_key.get((edit, seed))
            sheet.paste(_fit(images.get(case.stem) if case else None, cell), ((j + 1) * cell, top + LABEL_HEIGHT))
    return np.asarray(sheet)


def write_contact_sheets(out_dir: pathlib.Path, cases: Sequence[EvalCase], read_image, read_reference) -> list[pathlib.Path]:
    """One sheet per (mode, ablation, group, prompt) under out_dir/grids/. read_image(case) -> RGB
    uint8 or None. Returns the written paths."""
    groups: dict[tuple, list[EvalCase]] = {}
    for c in cases:
        groups.setdefault((c.mode, c.ablation.tag, c.group, c.prompt.name), []).append(c)
    paths = []
    for (mode, tag, group, prompt), members in groups.items():
        images = {c.stem: read_image(c) for c in members}
        path = pathlib.Path(out_dir) / "grids" / mode / tag / f"{group}__{prompt}.png"
        atomic_write_bytes(path, png_bytes(contact_sheet(members, images, read_reference)))
        paths.append(path)
    return paths
