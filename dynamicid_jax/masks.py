"""Mask files of people's regions: read, checked against the picture, brought to the picture's pixels.

    region = picture_region("left_person.png", (512, 512), (64, 64))   # (512, 512) bool

A mask is any image PIL reads, of any size with the picture's aspect ratio: white is the
region. Its value at a pixel is its grey level (0..1) times its opacity, so a greyscale PNG,
a black-and-white one and a painted layer on a transparent background (the app's brush) all
work; colour is taken as its luminance. What SAA gets is the mask on the picture's pixels by
the mask rule (`regions.mask_cells`: each pixel takes the mask's pixel just before its far
corner, at least half white), no resize filter: each attention grid samples that by the same rule.

Refused, with one line naming the file (MaskError, a UserError: the CLI exits 2): a file PIL
cannot read, another aspect ratio than the picture (naming both), an empty mask (no pixel
above black), a mask that covers no cell of the latent grid by the mask rule (`regions.mask_cells`).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import threading
from typing import Sequence

import numpy as np

from dynamicid_jax import images
from dynamicid_jax.dynamicid.regions import mask_cells
from dynamicid_jax.errors import UserError
from dynamicid_jax.input_files import file_sha256


class MaskError(UserError, ValueError):
    """A mask file that cannot be used; the message names it."""


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file -> (h, w) float32 in [0, 1]: grey level times opacity, upright (EXIF)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MaskError(f"mask {path}: {'is a folder' if path.is_dir() else 'file not found'}")
    return images.decode_upright(path, _coverage_values, lambda reason: MaskError(f"mask {path}: {reason}"))


def _coverage_values(im) -> np.ndarray:
    """A decoded PIL image -> (h, w) float32 in [0, 1]: grey level times opacity."""
    if im.mode in ("I", "I;16", "F"):  # high bit depth grey: scale its range to [0, 1]
        values = np.asarray(im, np.float64)
        top = 65535.0 if values.max() > 255 else 255.0
        return np.clip(values / top, 0.0, 1.0).astype(np.float32)
    has_alpha = "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info)
    la = np.asarray(im.convert("LA") if has_alpha else im.convert("L"), np.float32) / 255.0
    return la[..., 0] * la[..., 1] if has_alpha else la


def check_aspect(path, mask_hw: Sequence[int], picture_hw: Sequence[int]) -> None:
    """The mask must have the picture's aspect ratio, to within one of the mask's pixels."""
    (mh, mw), (ph, pw) = mask_hw, picture_hw
    if abs(mw * ph / pw - mh) >= 1.0 and abs(mh * pw / ph - mw) >= 1.0:
        raise MaskError(f"mask {path} is {mw}x{mh} px, another aspect ratio than the {pw}x{ph} picture")


_CACHE: dict[tuple, np.ndarray] = {}
_LOCK = threading.Lock()


def picture_region(path, picture_hw: Sequence[int], latent_hw: Sequence[int]) -> np.ndarray:
    """The region of mask `path` for a picture of `picture_hw` px: (H, W) bool, the mask rule
    at the picture's pixels; MaskError naming the file when it is unusable (`latent_hw`: the
    grid it must cover a cell of). Remembered per file content, so the checks and the batch
    rows decode it once."""
    path = pathlib.Path(path)
    try:  # by content: a file rewritten within one modification-time tick is still read again
        key = (hashlib.sha256(path.read_bytes()).hexdigest(), tuple(picture_hw), tuple(latent_hw))
    except OSError:
        key = None  # read_mask names the problem
    with _LOCK:
        if key is not None and key in _CACHE:
            return _CACHE[key]
    mask = read_mask(path)
    check_aspect(path, mask.shape, picture_hw)
    if not mask.any():
        raise MaskError(f"mask {path} is empty: no pixel above black (white marks the region)")
    region = mask_cells(mask, picture_hw).reshape(tuple(picture_hw))
    if not mask_cells(region, latent_hw).any():
        h, w = latent_hw
        raise MaskError(f"mask {path} covers no cell of the {w}x{h} latent grid (no cell's last pixel is white): "
                        "draw a larger region")
    with _LOCK:
        if key is not None:
            if len(_CACHE) > 64:  # a 1024x1024 picture's region is 1 MiB
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = region
    return region


def record(path) -> dict:
    """What a sidecar keeps of a mask file: {"file", "sha256"} (--from_json checks the bytes)."""
    return {"file": str(path), "sha256": file_sha256(path)}


def check_unchanged(records, where: str) -> None:
    """MaskError when a mask file recorded in a sidecar has other bytes now (`where` names
    the sidecar, e.g. "--from_json out/0.json")."""
    for rec in records or []:
        file = pathlib.Path(rec["file"])
        if file.is_file() and file_sha256(file) != rec["sha256"]:
            raise MaskError(f"{where}: mask {file} changed since (sha256 differs from the sidecar's)")
