"""Generated images on disk: THE writer of every PNG + sidecar, and the rule for reusing them.

Each image `X.png` has a sidecar `X.json` holding the full sampler request, the index of the
image within the request, what the run resolved and the weights' provenance, so
`launch/sample.py --from_json X.json` reproduces it. Sampling (`save_outputs`), batch
generation (`generation`) and evaluation all write through `save_image`. The sidecar is
written after the image, each by write-to-temp then rename, so an interrupted run leaves
either a complete pair or something that is redone.

An image is reused only when its sidecar's request and weights equal the current ones and
every input file (reference photos, landmark photos, masks, textual-inversion files) still
has the bytes the sidecar records (`input_records`, under `resolved`); a pair made with other
settings or from other bytes under the same path is an error (StaleImageError), never
silently mixed in. A sidecar written before input files were recorded is trusted on its request.
"""

from __future__ import annotations

import io
import json
import pathlib
from typing import TYPE_CHECKING, Optional

import numpy as np
from PIL import Image

from dynamicid_jax import images
from dynamicid_jax.atomic_write import atomic_write_bytes, atomic_write_text  # noqa: F401  (public here too)
from dynamicid_jax.errors import UserError
from dynamicid_jax.input_files import FileFormatError, file_sha256, read_json

if TYPE_CHECKING:  # request.py is light, but outputs need only the type's name
    from dynamicid_jax.request import SampleRequest


class StaleImageError(UserError, ValueError):
    """An existing image was generated with settings different from this run's."""


def png_bytes(image_uint8: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image_uint8, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jsonable(value):
    return json.loads(json.dumps(value))


def sidecar_path(image_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(image_path).with_suffix(".json")


def save_image(
    image_path: pathlib.Path, image_uint8: np.ndarray, request: "SampleRequest", details: dict, provenance: dict,
    image_index: int = 0,
) -> None:
    """Write the PNG (H, W, 3) uint8, then its sidecar (both atomically). image_index: which
    of the request's `num_images` pictures this is (its noise is that row of the seed's draw)."""
    import dynamicid_jax

    atomic_write_bytes(image_path, png_bytes(image_uint8))
    sidecar = {
        "request": request.to_json(), "image_index": int(image_index), "resolved": details, "weights": provenance,
        "dynamicid_jax_version": dynamicid_jax.__version__,
    }
    atomic_write_text(sidecar_path(image_path), json.dumps(_jsonable(sidecar), indent=1))


def _differences(stored: dict, current: dict) -> list[str]:
    keys = sorted(set(stored) | set(current))
    return [f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in keys if stored.get(k) != current.get(k)]


def input_records(request: "SampleRequest") -> list[dict]:
    """What a sidecar keeps of the files the picture is made from: [{"file", "sha256"}] in
    `request.input_files()` order (`reusable` compares the sha256s by position). The engine
    records them when it writes a picture (`resolved.input_files`)."""
    return [{"file": str(path), "sha256": file_sha256(path)} for path in request.input_files()]


def _changed_inputs(stored: dict, files: list[str]) -> list[str]:
    """The files among `files` whose bytes differ from the sidecar's records (all of them
    when the number of records differs); none when the sidecar records no input files."""
    records = stored.get("resolved", {}).get("input_files")
    if records is None:
        return []
    if len(records) != len(files):
        return list(files)
    return [str(f) for f, r in zip(files, records)
            if not pathlib.Path(f).is_file() or file_sha256(f) != r.get("sha256")]


def reusable(image_path: pathlib.Path, request: "SampleRequest", provenance: dict,
             inputs: Optional["SampleRequest"] = None) -> bool:
    """True when a complete image/sidecar pair made with exactly this request and weights,
    from input files with the same bytes, exists; False when it has to be (re)generated
    (absent, or interrupted before the sidecar). inputs: the request whose files are read
    (default `request`; the app compares a public copy whose paths are mere names).
    Raises StaleImageError when it exists but was made with other settings or bytes."""
    if not is_complete(image_path):
        return False
    side = sidecar_path(image_path)
    try:
        stored = read_json(side, "sidecar")
    except FileFormatError:
        return False  # a torn sidecar cannot happen with atomic writes, but one edited by hand can
    changes = _differences(stored.get("request", {}), _jsonable(request.to_json()))
    changes += [f"weights.{c}" for c in _differences(stored.get("weights", {}), _jsonable(provenance))]
    if changes:
        raise StaleImageError(
            f"{image_path} was generated with other settings ({'; '.join(changes[:5])}): "
            "use a new --out folder, or delete the old images to regenerate them"
        )
    changed = _changed_inputs(stored, (inputs or request).input_files())
    if changed:
        raise StaleImageError(
            f"{image_path} was generated from other bytes of {', '.join(changed[:3])} (its sha256 differs from "
            "the sidecar's, or it is gone): use a new --out folder, or delete the old images to regenerate them"
        )
    return True


def is_complete(image_path: pathlib.Path) -> bool:
    """Both the image and its sidecar are written."""
    image_path = pathlib.Path(image_path)
    return image_path.is_file() and sidecar_path(image_path).is_file()


def read_generated(image_path: pathlib.Path) -> Optional[np.ndarray]:
    """RGB uint8 (H, W, 3) of a stored image with its sidecar, or None when not (fully) written."""
    if not is_complete(image_path):
        return None
    return images.read_rgb(image_path)


def save_outputs(
    out_dir: str | pathlib.Path, images: np.ndarray, request: SampleRequest, details: dict, provenance: dict,
    stem: str = "dynamicid",
) -> list[pathlib.Path]:
    """Write `stem-SEED-K.png` and a sidecar `stem-SEED-K.json` per image (`outputs.save_image`).
    Returns the PNG paths.

    The sidecar holds the whole request (so `launch/sample.py --from_json` reproduces the
    image), what the run resolved (boxes, automatic prompts) and the weights' provenance.
    """
    paths = []
    for k, image in enumerate(images):
        png = output_path(out_dir, request, k, stem)
        save_image(png, image, request, details, provenance, image_index=k)
        paths.append(png)
    return paths


def output_path(out_dir: str | pathlib.Path, request: SampleRequest, index: int, stem: str = "dynamicid") -> pathlib.Path:
    """Where picture `index` of `request` goes: OUT/stem-SEED-K.png."""
    return pathlib.Path(out_dir) / f"{stem}-{request.seed}-{index}.png"
