"""Turning an analysed face into IMR's conditioning inputs: landmark image and face prompt."""

from __future__ import annotations

import numpy as np

from dynamicid_jax.faces.face import Face
from dynamicid_jax.faces.pose import pose_bins

RELEASE_IMAGE_SIZE = 512  # the release resizes every image to 512 x 512 before landmarks


def landmark_image(face: Face, image_hw: tuple[int, int], size: int = 96) -> np.ndarray:
    """The KeyPointEncoder's input: (size, size) float32, -1 background, +1 at each landmark.

    As the release does, landmark coordinates are taken in the image resized to 512 x 512
    (x * 512 / W, y * 512 / H, aspect not kept), then scaled to `size`; each lands on the pixel
    floor(coordinate) (nearest-neighbour, so a landmark stays a single white pixel instead of
    being blurred away by an interpolating resize). Landmarks outside the image are dropped;
    landmarks sharing a pixel light it once.
    """
    height, width = image_hw
    points = np.asarray(face.landmarks, np.float64)
    scale = np.array([RELEASE_IMAGE_SIZE / width, RELEASE_IMAGE_SIZE / height]) * (size / RELEASE_IMAGE_SIZE)
    pixels = np.floor(points * scale).astype(np.int64)
    inside = np.all((pixels >= 0) & (pixels < size), axis=1)
    canvas = np.full((size, size), -1.0, np.float32)
    canvas[pixels[inside, 1], pixels[inside, 0]] = 1.0
    return canvas


def source_face_prompt(emotion: str, pose) -> str:
    """The automatic source prompt of the release.

    "in a {emotion} expression, [facing up, |facing down, ]in {front|side} view"
    """
    vertical, view = pose_bins(pose)
    facing = {None: "", "up": "facing up, ", "down": "facing down, "}[vertical]
    return f"in a {emotion} expression, {facing}in {view} view"
