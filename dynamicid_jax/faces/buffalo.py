"""insightface `buffalo_l` model set, run by thin onnxruntime wrappers of our own.

The `insightface` package is not used: its dependencies pull opencv-python 5, which replaces
the opencv-python-headless<5 we need. Files (the user brings them; never shipped, their
licence is non-commercial research only):
    det_10g.onnx     SCRFD-10G detector, 5 keypoints
    w600k_r50.onnx   ArcFace R50 (WebFace600K), 512-d, on the 112 ArcFace-aligned crop
    2d106det.onnx    106 2-D landmarks
    1k3d68.onnx      68 3-D landmarks -> pose (needs insightface's meanshape_68.pkl)
Preprocessing (insightface's, with its BGR->RGB swap already done since we take RGB):
SCRFD (x - 127.5) / 128 on a letterboxed 640 input; ArcFace (x - 127.5) / 127.5; both
landmark models take raw 0-255 (their mxnet graphs normalise inside) on a 192 crop centred on
the box, scaled so that 1.5 x the longer box side fills it.
Checked against insightface 2.1's own classes on random-weight graphs with the real files'
signatures (tests/test_buffalo_parity.py); the SCRFD letterbox rounding and NMS follow
insightface's model_zoo/scrfd.py (`SCRFD.detect`, `nms`): `detection.letterbox(...,
via_aspect_ratio=True)`, `detection.nms(..., pixel_inclusive=True)` on image-pixel boxes.
"""

from __future__ import annotations

import importlib.util
import pathlib
import pickle

import cv2
import numpy as np

from dynamicid_jax.errors import MissingFileError
from dynamicid_jax.input_files import FileFormatError, check_file
from dynamicid_jax.faces import alignment, detection, onnx_session, pose
from dynamicid_jax.faces.analyzer import FaceAnalyzer

DETECTOR_FILE = "det_10g.onnx"
RECOGNISER_FILE = "w600k_r50.onnx"
LANDMARK_2D_FILE = "2d106det.onnx"
LANDMARK_3D_FILE = "1k3d68.onnx"
MEAN_SHAPE_FILE = "meanshape_68.pkl"
SCRFD_STRIDES = (8, 16, 32)
SCRFD_ANCHORS = 2  # anchors per cell in SCRFD's 9-output (with keypoints) layout


def nchw_blob(image: np.ndarray, mean: float, std: float) -> np.ndarray:
    """(H, W, 3) 0-255 -> (1, 3, H, W) float32 (x - mean) / std."""
    return ((image.astype(np.float32) - mean) / std).transpose(2, 0, 1)[None]


def decode_scrfd(outputs: list[np.ndarray], input_size: int, score_threshold: float):
    """SCRFD outputs [scores x3, bbox x3, kps x3] (strides 8, 16, 32) -> boxes, scores, kps.

    Anchor centres are the grid cell corners (x, y) * stride, each repeated for the 2 anchors;
    box = centre -/+ distances * stride (left, top, right, bottom); kps = centre + offsets * stride.
    """
    boxes, scores, kps = [], [], []
    squeeze = lambda a: a[0] if a.ndim == 3 else a  # batched exports carry a leading 1
    for level, stride in enumerate(SCRFD_STRIDES):
        score = squeeze(outputs[level])[:, 0]
        distances = squeeze(outputs[level + 3]) * stride
        offsets = squeeze(outputs[level + 6]).reshape(-1, 5, 2) * stride
        cells = input_size // stride
        ys, xs = np.mgrid[:cells, :cells]
        centres = np.repeat(np.stack([xs, ys], -1).reshape(-1, 2) * stride, SCRFD_ANCHORS, axis=0).astype(np.float32)
        keep = score >= score_threshold
        c = centres[keep]
        boxes.append(np.concatenate([c - distances[keep, :2], c + distances[keep, 2:]], axis=1))
        kps.append(c[:, None, :] + offsets[keep])
        scores.append(score[keep])
    return np.concatenate(boxes), np.concatenate(scores), np.concatenate(kps)


class SCRFDDetector:
    def __init__(self, path: pathlib.Path, input_size: int = 640, score_threshold: float = 0.5,
                 nms_threshold: float = 0.4):
        self.session = onnx_session.create_session(path)
        self.input_size, self.score_threshold, self.nms_threshold = input_size, score_threshold, nms_threshold

    def __call__(self, image_rgb: np.ndarray):
        canvas, scale = detection.letterbox(image_rgb, self.input_size, via_aspect_ratio=True)
        outputs = onnx_session.run_single_input(self.session, nchw_blob(canvas, 127.5, 128.0))
        boxes, scores, kps = decode_scrfd(outputs, self.input_size, self.score_threshold)
        boxes, kps = boxes / scale, kps / scale
        keep = detection.nms(boxes, scores, self.nms_threshold, pixel_inclusive=True)  # on image pixels, as insightface
        return boxes[keep], scores[keep], kps[keep]


class ArcFaceEmbedder:
    def __init__(self, path: pathlib.Path):
        self.session = onnx_session.create_session(path)

    def __call__(self, image_rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
        crop = alignment.align_arcface(image_rgb, kps, 112)
        return onnx_session.run_single_input(self.session, nchw_blob(crop, 127.5, 127.5))[0][0]


class BoxLandmarker:
    """insightface's landmark models: (K * dims,) in [-1, 1] crop coords -> image pixels.

    __call__ returns (K, 2); `points_3d` returns (K, 3) with z in image-pixel units.
    """

    def __init__(self, path: pathlib.Path, dims: int, count: int):
        self.session = onnx_session.create_session(path)
        self.crop = int(self.session.get_inputs()[0].shape[2])
        self.dims, self.count = dims, count

    def points_3d(self, image_rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        x0, y0, x1, y1 = box
        scale = self.crop / (1.5 * max(x1 - x0, y1 - y0))
        matrix = alignment.centred_crop_matrix(((x0 + x1) / 2, (y0 + y1) / 2), self.crop, scale)
        crop = cv2.warpAffine(image_rgb, matrix, (self.crop, self.crop), borderValue=0.0)
        raw = onnx_session.run_single_input(self.session, nchw_blob(crop, 0.0, 1.0))[0][0]
        points = raw.reshape(-1, self.dims)[-self.count:].astype(np.float64)
        points = points * (self.crop // 2)
        points[:, :2] += self.crop // 2
        out = np.zeros((self.count, 3))
        out[:, :2] = alignment.apply_affine(points[:, :2], cv2.invertAffineTransform(matrix))
        if self.dims == 3:
            out[:, 2] = points[:, 2] / scale
        return out

    def __call__(self, image_rgb: np.ndarray, box: np.ndarray, kps: np.ndarray = None) -> np.ndarray:
        return self.points_3d(image_rgb, box)[:, :2]


def find_mean_shape(folder: pathlib.Path) -> pathlib.Path:
    """meanshape_68.pkl from the model folder, else from an installed insightface package."""
    candidates = [folder / MEAN_SHAPE_FILE]
    spec = importlib.util.find_spec("insightface")
    if spec is not None and spec.origin is not None:
        candidates.append(pathlib.Path(spec.origin).parent / "data" / "objects" / MEAN_SHAPE_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MissingFileError(
        f"buffalo_l pose needs insightface's {MEAN_SHAPE_FILE} (68 x 3 mean face); looked in: "
        + ", ".join(str(c) for c in candidates)
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays only: any other global a pickle names is refused before
    it is imported (a pickle may otherwise call anything)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refuses the global {module}.{name} (only a numpy array is read)")
        return super().find_class(module, name)


def read_mean_shape(path: pathlib.Path) -> np.ndarray:
    """insightface's meanshape_68.pkl -> (68, 3) float64, read by `_ArrayUnpickler` from a file
    of at most 1 MiB (the real one is 974 bytes); FileFormatError naming it otherwise."""
    check_file(path, "mean-shape pickle", limit=2**20)
    try:
        with open(path, "rb") as handle:
            return np.asarray(_ArrayUnpickler(handle).load(), np.float64).reshape(68, 3)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise FileFormatError(f"{path}: not insightface's 68 x 3 mean face ({e})") from None


def load_buffalo_analyzer(folder: str | pathlib.Path) -> FaceAnalyzer:
    """The buffalo_l set from a local folder; errors name the folder and the missing file."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"buffalo_l model folder not found: {folder}")
    for name in (DETECTOR_FILE, RECOGNISER_FILE, LANDMARK_2D_FILE, LANDMARK_3D_FILE):
        if not (folder / name).is_file():
            raise MissingFileError(f"buffalo_l model file {name} missing in {folder}")
    mean_shape = read_mean_shape(find_mean_shape(folder))
    landmarks_3d = BoxLandmarker(folder / LANDMARK_3D_FILE, dims=3, count=68)
    return FaceAnalyzer(
        name="buffalo_l",
        embedding_dim=512,
        detect=SCRFDDetector(folder / DETECTOR_FILE),
        embed=ArcFaceEmbedder(folder / RECOGNISER_FILE),
        landmarks=BoxLandmarker(folder / LANDMARK_2D_FILE, dims=2, count=106),
        pose=lambda image, box, kps, lmk: pose.pose_from_landmarks_3d(landmarks_3d.points_3d(image, box), mean_shape),
    )
