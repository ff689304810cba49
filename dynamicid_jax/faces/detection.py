"""Shared detector plumbing: letterboxing into a fixed input and greedy non-maximum suppression."""

from __future__ import annotations

import cv2
import numpy as np


def letterbox(image: np.ndarray, size: int, *, via_aspect_ratio: bool = False) -> tuple[np.ndarray, float]:
    """Resize keeping the aspect ratio so the longer side is `size`, pad bottom/right with 0.

    image (H, W, 3) -> ((size, size, 3) same dtype, scale); detector coordinates / scale give
    pixel coordinates of the input image. via_aspect_ratio: round the shorter side as
    insightface's SCRFD does, int(size / (long / short)) instead of int(size * short / long);
    for some sizes (e.g. 928 x 1280) that is 1 px less.
    """
    height, width = image.shape[:2]
    long_side, short_side = max(height, width), min(height, width)
    short = int(size / (long_side / short_side)) if via_aspect_ratio else int(size * short_side / long_side)
    new_h, new_w = (size, max(1, short)) if height >= width else (max(1, short), size)
    scale = new_h / height
    canvas = np.zeros((size, size, image.shape[2]), dtype=image.dtype)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
    return canvas, scale


def box_iou(box: np.ndarray, boxes: np.ndarray, *, pixel_inclusive: bool = False) -> np.ndarray:
    """IoU of one (4,) x0y0x1y1 box against (N, 4) boxes -> (N,).

    pixel_inclusive: widths and heights are x1 - x0 + 1 (insightface's SCRFD convention).
    """
    one = 1.0 if pixel_inclusive else 0.0
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0 + one, 0, None) * np.clip(y1 - y0 + one, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0] + one) * (b[..., 3] - b[..., 1] + one)
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, *, pixel_inclusive: bool = False) -> np.ndarray:
    """Greedy NMS: indices of kept boxes, highest score first. boxes (N, 4), scores (N,)."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(best)
        order = order[box_iou(boxes[best], boxes[order], pixel_inclusive=pixel_inclusive) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)
