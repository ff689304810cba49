"""CLIP-T: cosine similarity of a prompt and an image in CLIP's joint embedding space.

The scorer is transformers' `CLIPModel` (the paper uses OpenAI ViT-L/14): our text and
vision towers from `models/clip.py` plus the two bias-free projection heads
(`text_projection`, `visual_projection`) that map the pooled states into the joint space.

    scorer = load_clip_scorer("clip-vit-large-patch14/")   # a local transformers folder
    scorer.score(images_uint8, prompts)                     # (B,) cosines

`text_features` / `image_features` equal transformers' `get_text_features` /
`get_image_features` (unnormalised). The import is strict: every key of the checkpoint
must be used except `logit_scale` (a softmax temperature, irrelevant to a cosine).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax.errors import MissingFileError
from dynamicid_jax.input_files import read_json
from dynamicid_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    clip_preprocess,
)
from dynamicid_jax.models.clip_weights import import_text_params, import_vision_params
from dynamicid_jax.models.layers import LoRADense
from dynamicid_jax.models.torch_import import (
    StateDict,
    WeightImportError,
    find_weight_file,
    import_params,
    linear_kernel,
    read_state_dict,
)

Dtype = Any

_TEXT_PREFIX = "text_model."
_VISION_PREFIX = "vision_model."
_PROJECTIONS = ("text_projection", "visual_projection")
_IGNORED = ("logit_scale",)


class CLIPJointModel(nn.Module):
    """CLIPModel's two towers and projections.

    text_features: input_ids (B, L) int -> (B, P); image_features: pixels (B, S, S, 3)
    CLIP-normalised -> (B, P). `__call__` runs both (used only to trace parameter shapes).
    """

    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.text_model = CLIPTextModel(self.text, dtype=self.dtype)
        self.vision_model = CLIPVisionModel(self.vision, dtype=self.dtype)
        self.text_projection = LoRADense(self.projection_dim, use_bias=False, dtype=self.dtype)
        self.visual_projection = LoRADense(self.projection_dim, use_bias=False, dtype=self.dtype)

    def text_features(self, input_ids: jax.Array) -> jax.Array:
        _, pooled = self.text_model(input_ids)
        return self.text_projection(pooled).astype(jnp.float32)

    def image_features(self, pixels: jax.Array) -> jax.Array:
        _, pooled, _ = self.vision_model(pixels)
        return self.visual_projection(pooled).astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.text_features(input_ids), self.image_features(pixels)


def _abstract_params(module: CLIPJointModel):
    ids = jax.ShapeDtypeStruct((1, module.text.max_positions), jnp.int32)
    size, channels = module.vision.image_size, module.vision.num_channels
    pixels = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), ids, pixels)["params"]


def import_clip_params(module: CLIPJointModel, state_dict: StateDict, model_name: str = "CLIP scorer") -> dict:
    """transformers CLIPModel state dict -> our params {text_model, vision_model, text_projection,
    visual_projection} (float32 numpy). Raises WeightImportError naming every bad key."""
    foreign = sorted(
        k for k in state_dict
        if not k.startswith((_TEXT_PREFIX, _VISION_PREFIX)) and k not in _IGNORED
        and k.rsplit(".", 1)[0] not in _PROJECTIONS
    )
    if foreign:
        raise WeightImportError(f"{model_name}: checkpoint does not match CLIPModel\n  {len(foreign)} unexpected: "
                                + ", ".join(foreign[:40]))
    for prefix in (_TEXT_PREFIX, _VISION_PREFIX):
        if not any(k.startswith(prefix) for k in state_dict):
            raise WeightImportError(f"{model_name}: no {prefix}* keys: not a transformers CLIPModel checkpoint")
    text = {k: v for k, v in state_dict.items() if k.startswith(_TEXT_PREFIX)}
    vision = {k: v for k, v in state_dict.items() if k.startswith(_VISION_PREFIX)}
    heads = {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[0] in _PROJECTIONS}
    abstract = _abstract_params(module)
    projections = import_params(
        {name: abstract[name] for name in _PROJECTIONS}, heads,
        lambda path: (f"{path[0]}.weight", linear_kernel) if path[1:] == ("kernel",) else None,
        model_name=f"{model_name} projections",
    )
    return {
        "text_model": import_text_params(module.text, text),
        "vision_model": import_vision_params(module.vision, vision),
        **projections,
    }


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; a zero row is an error (it has no direction)."""
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("CLIP feature with zero or non-finite norm: cannot take a cosine")
    return x / norms


class CLIPScorer:
    """CLIP-T with a loaded CLIPJointModel and its tokenizer.

    name: what the weights are (the folder path), written beside every score.
    """

    def __init__(self, module: CLIPJointModel, params: dict, tokenizer, name: str):
        self.module, self.params, self.tokenizer, self.name = module, params, tokenizer, name
        self._text = jax.jit(lambda p, ids: module.apply({"params": p}, ids, method="text_features"))
        size = module.vision.image_size
        self._image = jax.jit(
            lambda p, images: module.apply({"params": p}, clip_preprocess(images, size=size), method="image_features")
        )

    def text_features(self, input_ids) -> np.ndarray:
        """(B, L) int token ids -> (B, P) float32, unnormalised (= get_text_features)."""
        return np.asarray(self._text(self.params, jnp.asarray(input_ids, jnp.int32)))

    def image_features(self, images_uint8) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB -> (B, P) float32, CLIPImageProcessor preprocessing then
        get_image_features (unnormalised)."""
        return np.asarray(self._image(self.params, jnp.asarray(images_uint8)))

    def score(self, images_uint8, prompts: Sequence[str]) -> np.ndarray:
        """CLIP-T of each (image, prompt) pair: (B, H, W, 3) uint8 and B prompts -> (B,) cosines."""
        images_uint8 = np.asarray(images_uint8)
        if len(prompts) != len(images_uint8):
            raise ValueError(f"CLIP-T needs one prompt per image: {len(images_uint8)} images, {len(prompts)} prompts")
        text = unit(self.text_features(self.tokenizer(list(prompts))))
        image = unit(self.image_features(images_uint8))
        return np.sum(text * image, axis=-1).astype(np.float32)


def load_clip_scorer(path: str | os.PathLike, dtype: Dtype = jnp.float32) -> CLIPScorer:
    """A transformers `CLIPModel` folder (config.json, model.safetensors|pytorch_model.bin,
    vocab.json + merges.txt) -> CLIPScorer. The paper's CLIP-T uses OpenAI ViT-L/14."""
    from dynamicid_jax.tokenizer import CLIPTokenizer

    folder = pathlib.Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"--clip_model {folder}: no config.json (expected a transformers CLIPModel folder)")
    config = read_json(config_file, "CLIPModel config")
    if "text_config" not in config or "vision_config" not in config or "projection_dim" not in config:
        raise ValueError(f"{config_file}: not a CLIPModel config (needs text_config, vision_config, projection_dim)")
    module = CLIPJointModel(
        CLIPTextConfig.from_transformers(config), CLIPVisionConfig.from_transformers(config),
        int(config["projection_dim"]), dtype=dtype,
    )
    weights = find_weight_file(folder, ["model", "pytorch_model"])
    params = import_clip_params(module, read_state_dict(weights), model_name=f"CLIP scorer ({weights})")
    return CLIPScorer(module, jax.device_put(params), CLIPTokenizer.from_folder(folder), name=str(folder))
