"""The one image reader: any file PIL decodes -> upright RGB uint8, the same way everywhere.

    image = read_rgb("phone_photo.jpg")       # (H, W, 3) uint8; ImageError naming the file

Used by sampling (references, target landmarks), evaluation (references, generated images),
the precompute jobs and their inputs, so a photo gives the same pixels, hence the same face
box and identity vector, wherever it is read. What it does, in order:
  1. EXIF orientation applied (`ImageOps.exif_transpose`): phones store pixels rotated and
     say so in the tag; without it the face is sideways and no face is found.
  2. The first frame of a multi-frame file (GIF, TIFF).
  3. Every PIL mode to RGB by one rule (`to_rgb`): grey (1, L, I;16, I, F) repeated on three
     channels, 16-bit and 32-bit integer grey scaled to 8 bits (not clipped), palette and
     CMYK/YCbCr/LAB through PIL's conversion, and transparency (LA, PA, RGBA, a palette with
     a transparent index) composited over white.
  4. PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, ~179M pixels as an error)
     is kept; a file over it is refused with its pixel count.
Anything that is not a decodable image (a text file, a truncated JPEG) raises ImageError
naming the file and the reason.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, TypeVar

import numpy as np

from dynamicid_jax.errors import UserError

T = TypeVar("T")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_BACKGROUND = (255, 255, 255)  # transparent pixels become white (what viewers show)


class ImageError(UserError, ValueError):
    """A file that cannot be read as an image; the message names it."""


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth grey -> uint8 by scaling its range (16-bit: /257), never clipping."""
    values = np.asarray(values)
    if mode.startswith("I;16"):
        return np.round(values.astype(np.float64) / 257.0).astype(np.uint8)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    top = float(finite.max()) if finite.size else 0.0
    if top <= 1.0 and values.dtype.kind == "f":  # float images in [0, 1]
        scale = 255.0
    elif top <= 255.0:
        scale = 1.0
    elif top <= 65535.0:
        scale = 1.0 / 257.0
    else:
        scale = 255.0 / top
    return np.clip(np.round(np.nan_to_num(values.astype(np.float64)) * scale), 0, 255).astype(np.uint8)


def to_rgb(im) -> np.ndarray:
    """A PIL image of any mode -> RGB uint8 (H, W, 3) (rules in the module docstring)."""
    from PIL import Image

    mode = im.mode
    if mode.startswith("I") or mode == "F":
        grey = _grey_to_uint8(np.asarray(im), mode)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
    has_alpha = mode in ("LA", "La", "PA", "RGBA", "RGBa") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    if mode == "1":
        im = im.convert("L")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to upright RGB uint8 (H, W, 3); ImageError naming the file."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if not path.is_file():
        raise ImageError(f"cannot read image {path}: it is a folder, not a file")
    return decode_upright(path, to_rgb, lambda reason: ImageError(f"cannot read image {path}: {reason}"))


def decode_upright(path: pathlib.Path, convert: Callable[[Any], T], fail: Callable[[str], Exception]) -> T:
    """convert(the image of `path`, first frame, EXIF orientation applied); every decoding
    failure becomes fail(reason) (the one place PIL's many error types are mapped)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.seek(0)
            im.load()
            return convert(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as e:
        raise fail(f"too large ({e})") from None
    except UnidentifiedImageError:
        raise fail("not an image file PIL can decode") from None
    except Exception as e:  # PIL raises many types for damaged data; all mean "not a usable image"
        raise fail(f"{type(e).__name__}: {e}") from None


def check_image(path: str | os.PathLike) -> None:
    """ImageError naming `path` unless it is an image file PIL recognises (its header only:
    cheap enough to check every file a test set or request names before any model loads)."""
    from PIL import Image, UnidentifiedImageError

    path = pathlib.Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}" if not path.exists() else
                         f"cannot read image {path}: it is a folder, not a file")
    try:
        with Image.open(path):
            pass
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {path}: not an image file PIL can decode") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"cannot read image {path}: too large ({e})") from None
