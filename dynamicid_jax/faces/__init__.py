"""Face analysis for DynamicID: detection, identity embedding, landmarks, pose, expression.

    analyzer = load_face_analyzer()              # offline YuNet + SFace (bundled, Apache-2.0)
    analyzer = load_face_analyzer("/models/buffalo_l")   # insightface buffalo_l folder
    face = analyzer.largest_face(image_rgb, "ref.jpg")   # NoFaceError when none
"""

from __future__ import annotations

import pathlib

from dynamicid_jax.faces.analyzer import FaceAnalyzer
from dynamicid_jax.faces.conditioning import landmark_image, source_face_prompt
from dynamicid_jax.faces.face import MIN_FACE_SIZE, Face, NoFaceError, SmallFaceError, check_face_size
from dynamicid_jax.faces.pose import pose_bins


def load_face_analyzer(spec: str = "default") -> FaceAnalyzer:
    """"default": the offline YuNet + SFace set; otherwise a buffalo_l folder path."""
    if spec == "default":
        from dynamicid_jax.faces.offline import load_offline_analyzer

        return load_offline_analyzer()
    from dynamicid_jax.faces.buffalo import load_buffalo_analyzer

    return load_buffalo_analyzer(pathlib.Path(spec))


__all__ = ["MIN_FACE_SIZE", "Face", "FaceAnalyzer", "NoFaceError", "SmallFaceError", "check_face_size",
           "landmark_image", "load_face_analyzer", "pose_bins", "source_face_prompt"]
