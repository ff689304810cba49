"""Face crops: the 5-point similarity alignment of ArcFace/SFace and the box-centred crop.

Keypoint order everywhere: right eye (image left), left eye, nose tip, right mouth corner,
left mouth corner -- the order SCRFD, YuNet and the ArcFace template share.
"""

from __future__ import annotations

import cv2
import numpy as np

# Standard ArcFace 5-point template in a 112 x 112 crop (insightface `arcface_dst`; SFace's
# alignCrop uses the same numbers).
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src to dst.

    Umeyama's closed form, as skimage's SimilarityTransform.estimate computes it.
    src, dst: (N, 2). Returns the (2, 3) matrix M with dst ~ M @ [x, y, 1].
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:  # reflection: flip the smallest singular direction
        d[-1] = -1
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_c.var(0).sum()
    translation = dst_mean - scale * rotation @ src_mean
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def align_arcface(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp the face with 5 keypoints kps (5, 2) onto the ArcFace template: (size, size, C)."""
    matrix = similarity_transform(kps, ARCFACE_TEMPLATE_112 * (size / 112.0))
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def centred_crop_matrix(center: tuple[float, float], output_size: int, scale: float) -> np.ndarray:
    """(2, 3) affine that scales by `scale` about `center` and puts it in the crop's middle.

    The insightface landmark models' crop: scale = output_size / (1.5 * longest bbox side).
    """
    cx, cy = center
    return np.array(
        [[scale, 0.0, output_size / 2 - cx * scale], [0.0, scale, output_size / 2 - cy * scale]],
        dtype=np.float64,
    )


def apply_affine(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """points (N, 2) -> (N, 2) under a (2, 3) affine matrix."""
    return points @ matrix[:, :2].T + matrix[:, 2]
