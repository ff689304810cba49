"""The raw inputs of the precompute jobs: which files, which captions / face prompts, decoding.

Anchor input: a folder of images (searched recursively) with captions either in
`captions.jsonl` at its root (`{"file": "sub/a.jpg", "caption": "..."}` per line) or in a
`.txt` sidecar beside each image (`sub/a.txt`). An image without a caption is kept as an
input and rejected later with a reason; giving both caption sources for one file is an error.

Reconfig input: one sub-folder per identity (`<identity>/<images>`). A face prompt per image
comes, in this order, from `face_prompts.jsonl` at the root (`{"file": "id/a.jpg", "prompt":
"..."}`) or a `.txt` sidecar beside the image; else from a KDEF-style file name; else it is
made from the face itself at precompute time (`face_prompt is None`). An identity folder whose
every image has a KDEF name has source "kdef", any other "multi".
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Optional

import numpy as np

from dynamicid_jax import images
from dynamicid_jax.data import face_prompts
from dynamicid_jax.errors import ConfigError, MissingFileError

IMAGE_EXTENSIONS = images.IMAGE_SUFFIXES
CAPTIONS_JSONL = "captions.jsonl"
FACE_PROMPTS_JSONL = "face_prompts.jsonl"


# One reader for every image of the project (EXIF orientation, every PIL mode, bomb limit).
CorruptImageError = images.ImageError
load_image = images.read_rgb


@dataclasses.dataclass(frozen=True)
class AnchorInput:
    key: str  # path relative to the input folder, posix separators
    caption: Optional[str]  # None: no caption found (rejected at precompute)


@dataclasses.dataclass(frozen=True)
class ReconfigInput:
    key: str  # "<identity>/<file>"
    identity: str
    source: str  # "multi" | "kdef"
    face_prompt: Optional[str]  # None: generated from the face at precompute time


def _image_files(folder: pathlib.Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _read_jsonl(path: pathlib.Path, value_field: str) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                file, value = obj["file"], obj[value_field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{line_no}: expected {{\"file\": ..., \"{value_field}\": ...}}: {e}") from None
            if file in out:
                raise ConfigError(f"{path}:{line_no}: {file!r} listed twice")
            out[file] = value
    return out


def _sidecar_text(folder: pathlib.Path, key: str) -> Optional[str]:
    sidecar = (folder / key).with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.exists() else None


def find_anchor_inputs(folder: str | pathlib.Path) -> list[AnchorInput]:
    """Every image under `folder`, sorted by relative path, with its caption (or None)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"anchor input folder {folder} does not exist")
    files = _image_files(folder)
    from_jsonl = _read_jsonl(folder / CAPTIONS_JSONL, "caption") if (folder / CAPTIONS_JSONL).exists() else {}
    unknown = sorted(set(from_jsonl) - set(files))
    if unknown:
        raise ConfigError(f"{folder / CAPTIONS_JSONL} names files that are not images in {folder}: {unknown[:5]}")
    out = []
    for key in files:
        sidecar = _sidecar_text(folder, key)
        if key in from_jsonl and sidecar is not None:
            raise ConfigError(f"{key}: caption given both in {CAPTIONS_JSONL} and in a .txt sidecar")
        out.append(AnchorInput(key, from_jsonl.get(key, sidecar)))
    if not out:
        raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return out


def find_identity_inputs(folder: str | pathlib.Path) -> list[tuple[str, list[ReconfigInput]]]:
    """[(identity, its images)] sorted by identity then file; identities = sub-folders of `folder`."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"reconfig input folder {folder} does not exist")
    loose = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise ConfigError(f"images directly under {folder} belong to no identity folder: {sorted(loose)[:5]}")
    prompts_jsonl = (
        _read_jsonl(folder / FACE_PROMPTS_JSONL, "prompt") if (folder / FACE_PROMPTS_JSONL).exists() else {}
    )
    out, seen = [], set()
    for identity_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        identity = identity_dir.name
        names = _image_files(identity_dir)
        if not names:
            continue
        keys = [f"{identity}/{n}" for n in names]
        source = "kdef" if all(face_prompts.parse_kdef_name(n) for n in names) else "multi"
        items = []
        for key in keys:
            seen.add(key)
            sidecar = _sidecar_text(folder, key)
            if key in prompts_jsonl and sidecar is not None:
                raise ConfigError(f"{key}: face prompt given both in {FACE_PROMPTS_JSONL} and in a .txt sidecar")
            prompt = prompts_jsonl.get(key, sidecar)
            if prompt is None:
                kdef = face_prompts.parse_kdef_name(key)
                prompt = face_prompts.kdef_face_prompt(kdef) if kdef else None
            items.append(ReconfigInput(key, identity, source, prompt))
        out.append((identity, items))
    unknown = sorted(set(prompts_jsonl) - seen)
    if unknown:
        raise ConfigError(f"{folder / FACE_PROMPTS_JSONL} names files that are not identity images: {unknown[:5]}")
    if not out:
        raise ConfigError(f"no identity folders with images under {folder}")
    return out


def vae_pixels(image: np.ndarray, resolution: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> (resolution, resolution, 3) float32 in [-1, 1].

    Shorter side resized to `resolution` (bilinear), then a center crop: the usual SD training
    preprocessing, so cached latents match what training on pixels would see.
    """
    return vae_crop(image, resolution)[0]


def vae_crop(image: np.ndarray, size: int | tuple[int, int]) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """`vae_pixels` for a square side or an aspect-ratio bucket (height, width), and where the
    pixels came from: (pixels (h, w, 3), original (H, W), crop (top, left) in the resized image),
    the micro-conditioning SDXL's time ids describe. Geometry: `buckets.crop_geometry`."""
    from PIL import Image

    from dynamicid_jax.data.buckets import crop_geometry

    bh, bw = (size, size) if isinstance(size, int) else size
    h, w = image.shape[:2]
    nh, nw, top, left = crop_geometry(h, w, (bh, bw))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    crop = resized[top : top + bh, left : left + bw]
    return crop / 127.5 - 1.0, (h, w), (top, left)
