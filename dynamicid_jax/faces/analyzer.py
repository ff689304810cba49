"""`FaceAnalyzer`: detector + recogniser + landmarks + pose behind one interface.

A model set is four callables (see `offline.py`, `buffalo.py`):
    detect(image)                     -> boxes (N, 4), scores (N,), kps (N, 5, 2)
    embed(image, kps)                 -> (D,) raw identity vector (normalised here)
    landmarks(image, box, kps)        -> (K, 2)
    pose(image, box, kps, landmarks)  -> (3,) pitch, yaw, roll degrees
All take the RGB uint8 image (H, W, 3).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from dynamicid_jax.faces.face import Face, NoFaceError, check_face_size, l2_normalise


@dataclasses.dataclass(frozen=True)
class FaceAnalyzer:
    name: str
    embedding_dim: int
    detect: Callable
    embed: Callable
    landmarks: Callable
    pose: Callable

    def analyze(self, image_rgb: np.ndarray) -> list[Face]:
        """Every face in an RGB uint8 (H, W, 3) image, largest box first."""
        image_rgb = check_rgb_uint8(image_rgb)
        boxes, scores, all_kps = self.detect(image_rgb)
        faces = []
        for box, score, kps in zip(boxes, scores, all_kps):
            landmarks = np.asarray(self.landmarks(image_rgb, box, kps), np.float32)
            faces.append(
                Face(
                    bbox=np.asarray(box, np.float32),
                    score=float(score),
                    kps=np.asarray(kps, np.float32),
                    landmarks=landmarks,
                    embedding=l2_normalise(self.embed(image_rgb, kps)),
                    pose=np.asarray(self.pose(image_rgb, box, kps, landmarks), np.float32),
                    model_set=self.name,
                )
            )
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def largest_face(self, image_rgb: np.ndarray, source_name: str, small: str = "warn") -> Face:
        """The largest face, or NoFaceError naming `source_name` (a file name, a frame id).

        small: what a face below faces.MIN_FACE_SIZE px gets: "warn" (once, naming the source
        and the size; sampling, evaluation references), "reject" (SmallFaceError; precompute)."""
        faces = self.analyze(image_rgb)
        if not faces:
            raise NoFaceError(f"no face found in {source_name}")
        if small not in ("warn", "reject"):
            raise ValueError(f"small must be 'warn' or 'reject', got {small!r}")
        return check_face_size(faces[0], source_name, reject=small == "reject")


def check_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)
