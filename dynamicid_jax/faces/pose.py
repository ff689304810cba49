"""Head pose (pitch, yaw, roll) in degrees, insightface's convention, and DynamicID's pose bins.

Frame and signs (those of insightface's 1k3d68 pose, which DynamicID's bins assume): points in
image axes, x to the right, y down, z toward the viewer; R maps the frontal template onto the
observed face and pose = Euler angles of R with pitch about x, yaw about y, roll about z.
pitch > 0: the face looks up (nose moves up in the image); yaw > 0: the nose turns toward the
image's right side.
"""

from __future__ import annotations

import math
from typing import Optional

import cv2
import numpy as np

# Generic frontal 5-point face (right eye, left eye, nose tip, right and left mouth corner),
# in the units of the 112-px ArcFace template whose 2-D layout it takes. Depths: the nose tip
# 16 px (about 0.45 inter-ocular distances, a typical adult proportion) in front of the eyes
# and mouth corners; with these, the neutral frontal test photos come out within 5 degrees
# of pitch 0 (a smile lifts the mouth corners and biases pitch down: see the report/tests).
FIVE_POINT_TEMPLATE_3D = np.array(
    [
        [38.2946 - 56.0, 51.6963 - 71.7, 0.0],
        [73.5318 - 56.0, 51.5014 - 71.7, 0.0],
        [56.0252 - 56.0, 71.7366 - 71.7, 16.0],
        [41.5493 - 56.0, 92.3655 - 71.7, 0.0],
        [70.7299 - 56.0, 92.2041 - 71.7, 0.0],
    ],
    dtype=np.float64,
)

# opencv's camera frame has z pointing away from the viewer; ours toward it.
_FLIP_Z = np.diag([1.0, 1.0, -1.0])


def rotation_to_pose(rotation: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> (pitch, yaw, roll) degrees, R = Rz(roll) Ry(yaw) Rx(pitch).

    The decomposition insightface's `matrix2angle` uses, including its gimbal-lock branch.
    """
    r = rotation
    sy = math.hypot(r[0, 0], r[1, 0])
    if sy > 1e-6:
        pitch, yaw, roll = math.atan2(r[2, 1], r[2, 2]), math.atan2(-r[2, 0], sy), math.atan2(r[1, 0], r[0, 0])
    else:
        pitch, yaw, roll = math.atan2(-r[1, 2], r[1, 1]), math.atan2(-r[2, 0], sy), 0.0
    return np.degrees(np.array([pitch, yaw, roll], dtype=np.float64)).astype(np.float32)


def pose_from_five_points(kps: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Pose of a face from its 5 keypoints (5, 2) pixels -> (pitch, yaw, roll) degrees.

    Perspective-n-point (cv2 SQPnP) against FIVE_POINT_TEMPLATE_3D with a generic camera:
    focal length = the longer image side, no distortion, and the principal point on the face
    (the keypoints' mean), so that, like insightface's affine fit, the pose does not depend on
    where in the frame the face sits.
    """
    kps = np.asarray(kps, np.float64).reshape(5, 2)
    focal = float(max(image_hw))
    cx, cy = kps.mean(axis=0)
    camera = np.array([[focal, 0, cx], [0, focal, cy], [0, 0, 1]], dtype=np.float64)
    model_cv = FIVE_POINT_TEMPLATE_3D @ _FLIP_Z
    ok, rvec, _ = cv2.solvePnP(
        model_cv, kps.reshape(5, 1, 2), camera, None, flags=cv2.SOLVEPNP_SQPNP
    )
    if not ok:
        raise ValueError(f"pose: solvePnP failed for keypoints {kps.tolist()}")
    rotation_cv, _ = cv2.Rodrigues(rvec)
    return rotation_to_pose(_FLIP_Z @ rotation_cv @ _FLIP_Z)


def pose_from_landmarks_3d(landmarks_3d: np.ndarray, mean_shape: np.ndarray) -> np.ndarray:
    """insightface's pose for 1k3d68: affine fit of the mean shape onto 68 3-D landmarks.

    landmarks_3d, mean_shape: (68, 3) in the frame above. Least-squares 3x4 affine P with
    landmarks ~ P [mean; 1]; its first two rows, normalised, and their cross product give R.
    """
    homogeneous = np.hstack([mean_shape, np.ones((len(mean_shape), 1))])
    affine = np.linalg.lstsq(homogeneous, landmarks_3d, rcond=None)[0].T  # (3, 4)
    r1 = affine[0, :3] / np.linalg.norm(affine[0, :3])
    r2 = affine[1, :3] / np.linalg.norm(affine[1, :3])
    return rotation_to_pose(np.stack([r1, r2, np.cross(r1, r2)]))


def pose_bins(pose, threshold: float = 10.0) -> tuple[Optional[str], str]:
    """(pitch, yaw, roll) degrees -> (vertical, view) as DynamicID's face prompts use them.

    vertical: "up" when pitch > threshold, "down" when pitch < -threshold, else None.
    view: "front" when |yaw| < threshold, else "side".
    """
    pitch, yaw = float(pose[0]), float(pose[1])
    vertical = "up" if pitch > threshold else "down" if pitch < -threshold else None
    return vertical, "front" if abs(yaw) < threshold else "side"
