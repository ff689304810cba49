"""What face analysis returns: one `Face` per detected face, and the no-face error."""

from __future__ import annotations

import dataclasses

import numpy as np

from dynamicid_jax.errors import UserError


class NoFaceError(UserError, ValueError):
    """No face was detected where one is required (never replaced by a zero embedding)."""


# Identity models see a face as an aligned 112 x 112 crop (ArcFace, SFace): a face whose
# detector box has a shorter side below this many pixels is upsampled almost 2x or more and
# its identity vector says little about the person. Sampling warns (naming file and size),
# the precompute jobs reject such an input with that reason.
MIN_FACE_SIZE = 64


class SmallFaceError(NoFaceError):
    """The largest face is smaller than MIN_FACE_SIZE (message: file and size)."""

    reject_reason = "face too small"


@dataclasses.dataclass(frozen=True)
class Face:
    """One detected face, all coordinates in pixels of the analysed image.

    bbox:      (4,) x0, y0, x1, y1.
    score:     detector confidence in [0, 1].
    kps:       (5, 2) right eye, left eye, nose tip, right and left mouth corner (x, y).
    landmarks: (K, 2) K = 106 (buffalo_l 2d106det) or 5 (offline set: the keypoints).
    embedding: (D,) L2-normalised identity vector; D = 512 (ArcFace) or 128 (SFace).
    pose:      (3,) pitch, yaw, roll in degrees (see faces.pose for the signs).
    model_set: name of the model set that produced it.
    """

    bbox: np.ndarray
    score: float
    kps: np.ndarray
    landmarks: np.ndarray
    embedding: np.ndarray
    pose: np.ndarray
    model_set: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the box in whole pixels."""
        x0, y0, x1, y1 = self.bbox
        return int(round(max(x1 - x0, 0.0))), int(round(max(y1 - y0, 0.0)))

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.bbox
        return float(max(x1 - x0, 0.0) * max(y1 - y0, 0.0))


def l2_normalise(vector: np.ndarray) -> np.ndarray:
    """(D,) -> (D,) float32 unit vector; a zero vector is an error, not a silent zero."""
    vector = np.asarray(vector, np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(f"face embedding has norm {norm}: cannot normalise")
    return vector / norm


def check_face_size(face: Face, source_name: str, *, reject: bool, min_size: int = MIN_FACE_SIZE) -> Face:
    """`face` when its box's shorter side is >= min_size; else a warning naming the source and
    the size (once per source and size: logging on "dynamicid_jax"), or SmallFaceError when
    `reject`."""
    w, h = face.size
    if min(w, h) >= min_size:
        return face
    message = (f"{source_name}: the face is {w}x{h} px, below the {min_size} px minimum for a reliable "
               "identity vector (use a larger or closer photo)")
    if reject:
        raise SmallFaceError(message)
    _warn_once(message)
    return face


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    import logging

    if message not in _WARNED:
        _WARNED.add(message)
        logging.getLogger("dynamicid_jax").warning("warning: %s", message)
