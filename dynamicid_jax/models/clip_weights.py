"""Weight import for the CLIP towers of `models/clip.py`, and their loaders.

transformers' state dicts map onto our trees by a rename (`clip_key_fn`): `layers_3` ->
`layers.3`, `to_q` -> `q_proj`, `kernel` -> `weight` (transposed). The tower prefix
(`text_model.`/`vision_model.`) is used when the checkpoint has it. A
`CLIPTextModelWithProjection` (SDXL's text_encoder_2) adds `text_projection.weight`, beside
`text_model`, not inside it.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp

from .clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from .torch_import import (
    StateDict,
    WeightImportError,
    conv_kernel,
    identity,
    import_params,
    linear_kernel,
)
from . import single_file_configs
from .weight_sources import read_component

Dtype = Any

# Buffers that transformers saves (older versions) but that are not parameters.
_BUFFERS = (r"\.position_ids$",)
_RENAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def clip_key_fn(prefix: str):
    """Map our flax path to transformers' key: layers_3 -> layers.3, to_q -> q_proj, kernel -> weight."""

    def key_fn(path: tuple[str, ...]):
        *parents, leaf = path
        if parents == ["text_projection"]:  # CLIPTextModelWithProjection: beside text_model, not in it
            return "text_projection.weight", linear_kernel
        names = [re.sub(r"^layers_(\d+)$", r"layers.\1", _RENAMES.get(p, p)) for p in parents]
        if leaf == "kernel":
            transform = conv_kernel if parents[-1] == "patch_embedding" else linear_kernel
            names.append("weight")
        elif leaf in ("scale", "embedding"):
            transform = identity
            names.append("weight")
        else:  # bias, class_embedding
            transform = identity
            names.append(leaf)
        return prefix + ".".join(names), transform

    return key_fn


def _tower_prefix(state_dict: StateDict, prefix: str, model_name: str) -> str:
    """`text_model.`/`vision_model.` when the checkpoint uses it (older transformers, SD1.5, IP-Adapter);
    "" when it does not (transformers 5 saves CLIPTextModel/CLIPVisionModel without it)."""
    with_prefix = any(k.startswith(prefix) for k in state_dict)
    without = any(k.startswith(("embeddings.", "encoder.")) for k in state_dict)
    if with_prefix and without:
        raise WeightImportError(f"{model_name}: checkpoint mixes keys with and without the {prefix!r} prefix")
    return prefix if with_prefix else ""


def import_text_params(config: CLIPTextConfig, state_dict: StateDict):
    """transformers CLIPTextModel state dict -> our params (nested dict of float32 numpy arrays)."""
    module = CLIPTextModel(config)
    abstract = jax.eval_shape(
        module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, config.max_positions), jnp.int32)
    )["params"]
    name = "CLIP text encoder"
    prefix = _tower_prefix(state_dict, "text_model.", name)
    return import_params(abstract, state_dict, clip_key_fn(prefix), model_name=name, ignore_unexpected=_BUFFERS)


def import_vision_params(config: CLIPVisionConfig, state_dict: StateDict):
    """transformers CLIPVisionModel(WithProjection) state dict -> our params.

    The projection head (`visual_projection.weight`) is deliberately not imported: DynamicID
    reads hidden states, never image_embeds.
    """
    module = CLIPVisionModel(config)
    pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), pixels)["params"]
    name = "CLIP vision encoder"
    prefix = _tower_prefix(state_dict, "vision_model.", name)
    return import_params(
        abstract, state_dict, clip_key_fn(prefix), model_name=name,
        ignore_unexpected=_BUFFERS + (r"^visual_projection\.weight$",),
    )


def load_text_encoder(
    path: str | os.PathLike, dtype: Dtype = jnp.float32, config: Optional[CLIPTextConfig] = None,
    component: str = "text_encoder",
) -> tuple[CLIPTextModel, dict]:
    """Load a CLIP text encoder. Returns (module, params); call `module.apply({"params": params}, ids)`.

    path: a diffusers pipeline folder (uses `<component>/`), a transformers CLIPTextModel(WithProjection)
      folder (config.json + model.safetensors|pytorch_model.bin), a single-file SD1.5
      checkpoint (.safetensors/.ckpt with `cond_stage_model.transformer.*`) or SDXL one
      (`conditioner.embedders.0/1`), or a folder written by `python -m dynamicid_jax.convert`.
    component: "text_encoder", or "text_encoder_2" (SDXL's bigG, which must be a
      CLIPTextModelWithProjection: a config without projection_dim is an error).
    config: only for single-file checkpoints, which carry no config: required for an SD1.5
      file (the family's, `base_models.single_file_config`); for an SDXL one it defaults to
      the shapes' reading (`single_file_configs`).
    dtype: compute dtype of the module; params stay float32 numpy arrays (ready for device_put).
    """
    if component not in _TEXT_COMPONENTS:
        raise ValueError(f"component must be one of {_TEXT_COMPONENTS}, got {component!r}")
    config, params = read_component(
        path, name=component, subfolder=component, weight_stems=["model", "pytorch_model"],
        config_cls=CLIPTextConfig, config_from_json=CLIPTextConfig.from_transformers, import_fn=import_text_params,
        single_file=True, config=config,
        single_file_config=lambda sd, where: single_file_configs.infer_text_config(sd, component, where))
    if component == "text_encoder_2" and config.projection_dim is None:
        raise WeightImportError(f"{path}: text_encoder_2 is not a CLIPTextModelWithProjection (no projection_dim)")
    return CLIPTextModel(config, dtype=dtype), params


_TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def load_vision_encoder(path: str | os.PathLike, dtype: Dtype = jnp.float32) -> tuple[CLIPVisionModel, dict]:
    """Load a CLIP vision tower. Returns (module, params); `module.apply({"params": params}, pixels)`.

    path: a transformers CLIPVisionModel(WithProjection) folder such as IP-Adapter's
      `models/image_encoder` (config.json + model.safetensors|pytorch_model.bin), a folder
      holding `image_encoder/`, or a folder written by `python -m dynamicid_jax.convert`.
    dtype: compute dtype of the module; params stay float32 numpy arrays.
    """
    config, params = read_component(
        path, name="vision_encoder", subfolder="image_encoder", weight_stems=["model", "pytorch_model"],
        config_cls=CLIPVisionConfig, config_from_json=CLIPVisionConfig.from_transformers,
        import_fn=import_vision_params)
    return CLIPVisionModel(config, dtype=dtype), params
