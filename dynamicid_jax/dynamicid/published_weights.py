"""Import of the DynamicID authors' published PyTorch weights into our Flax trees.

Files (PyTorch pickles, or .safetensors with the same flat keys):
- `SAA.bin`: {"proj_module": FaceProjection state dict, "SAA_module": state dict of a
  ModuleList of the UNet's 32 attention processors}. Read through
  `torch_import.read_state_dict`, nested keys arrive as "proj_module.proj.0.weight",
  "SAA_module.1.to_k_ip.weight".
- `IMR.bin`: IMR state dict. `key_point_encoder.bin`: KeyPointEncoder state dict.

Processor mapping (diffusers' `attn_processors` order): every attention module of our UNet
tree at `{down,up}_blocks_I/attentions_J/transformer_blocks_K/attn{1,2}` or
`mid_block/attentions_J/transformer_blocks_K/attn{1,2}` is sorted by (down < up < mid,
I, J, K, attn1 < attn2); processor N is the N-th. For SD1.5 that is down 0-11, up 12-29,
mid 30-31, even N = attn1. Processor keys -> our leaves:
    N.to_{q,k,v,out}_lora.down.weight (r, in)  -> <attn>/to_{q,k,v,out}/lora_down (in, r)
    N.to_{q,k,v,out}_lora.up.weight   (out, r) -> <attn>/to_{q,k,v,out}/lora_up   (r, out)
    N.to_{k,v}_ip.weight (odd N)               -> <attn2>/to_{k,v}_ip/kernel
Every import is strict (torch_import.import_params): a missing, unused or mis-shaped key is
an error naming it.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dynamicid_jax.dynamicid.face_projection import FaceProjection
from dynamicid_jax.dynamicid.imr import IMR
from dynamicid_jax.dynamicid.keypoint_encoder import KeyPointEncoder
from dynamicid_jax.models.torch_import import (
    WeightImportError,
    conv_kernel,
    export_state_dict,
    identity,
    import_params,
    linear_kernel,
    read_state_dict,
    row_slice,
)

Source = Union[str, os.PathLike, Mapping[str, np.ndarray]]
Path = tuple[str, ...]

PROJ_PREFIX = "proj_module."
SAA_PREFIX = "SAA_module."
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")
_BASE_PREFIX = "unet:"  # marks base-UNet leaves inside the merged source dict


# ----------------------------------------------------------------------------- reading

# The release's file stems, and the forms each may take (the release's .bin pickle, or the
# torch-free .safetensors `python -m dynamicid_jax.convert --dynamicid` writes), in that order.
RELEASE_STEMS = ("SAA", "IMR", "key_point_encoder")
RELEASE_SUFFIXES = (".bin", ".safetensors")


def find_release_file(folder: str | os.PathLike, stem: str) -> Optional[pathlib.Path]:
    """`folder/<stem>.bin`, else `folder/<stem>.safetensors`, else None (stem: RELEASE_STEMS)."""
    folder = pathlib.Path(folder)
    return next((folder / f"{stem}{ext}" for ext in RELEASE_SUFFIXES if (folder / f"{stem}{ext}").is_file()), None)



def _as_state_dict(source: Source) -> dict[str, np.ndarray]:
    if isinstance(source, Mapping):
        return {k: np.asarray(v) for k, v in source.items()}
    return read_state_dict(source)


def _sub_state_dict(source: Source, prefix: str) -> dict[str, np.ndarray]:
    """The entries under `prefix` (prefix stripped); a dict without that prefix is taken whole."""
    sd = _as_state_dict(source)
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def read_saa_checkpoint(source: Source) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """SAA.bin -> (proj_module state dict, SAA_module state dict), prefixes stripped."""
    sd = _as_state_dict(source)
    proj = {k[len(PROJ_PREFIX):]: v for k, v in sd.items() if k.startswith(PROJ_PREFIX)}
    saa = {k[len(SAA_PREFIX):]: v for k, v in sd.items() if k.startswith(SAA_PREFIX)}
    other = sorted(k for k in sd if not k.startswith((PROJ_PREFIX, SAA_PREFIX)))
    if not proj or not saa or other:
        raise WeightImportError(
            f"SAA checkpoint must hold exactly 'proj_module' and 'SAA_module'; found {len(proj)} proj_module "
            f"keys, {len(saa)} SAA_module keys, other keys: {other[:10]}"
        )
    return proj, saa


# ----------------------------------------------------------------------------- key mapping pieces


def _leaf_key(leaf: str, torch_prefix: str, kernel: str = "linear"):
    """Our leaf name -> (torch key, transform) for Dense / LayerNorm / Conv / BatchNorm leaves."""
    if leaf == "kernel":
        return f"{torch_prefix}.weight", conv_kernel if kernel == "conv" else linear_kernel
    if leaf == "scale":
        return f"{torch_prefix}.weight", identity
    if leaf == "bias":
        return f"{torch_prefix}.bias", identity
    return None


def _attention_key(rest: Path, torch_prefix: str, inner: int, with_norm2: bool):
    """Our PerceiverAttention / SelfAttention subtree -> the release's module with a fused to_kv.

    rest: path below the attention module, e.g. ("norm1", "scale") or ("attn", "to_k", "kernel").
    """
    if rest[0] in ("norm1", "norm2") and (with_norm2 or rest[0] == "norm1"):
        return _leaf_key(rest[1], f"{torch_prefix}.{rest[0]}")
    if rest[0] == "norm" and not with_norm2:  # IMR self-attention: our `norm` is the release's norm1
        return _leaf_key(rest[1], f"{torch_prefix}.norm1")
    if rest[0] == "attn" and rest[-1] == "kernel":
        proj = rest[1]
        if proj in ("to_q", "to_out"):
            return f"{torch_prefix}.{proj}.weight", linear_kernel
        if proj == "to_k":
            return f"{torch_prefix}.to_kv.weight", row_slice(0, inner)
        if proj == "to_v":
            return f"{torch_prefix}.to_kv.weight", row_slice(inner, 2 * inner)
    return None


def _feed_forward_key(rest: Path, torch_prefix: str):
    """Our FeedForward {norm, mlp/fc1, mlp/fc2} -> the release's Sequential indices 0, 1, 3."""
    index = {("norm",): 0, ("mlp", "fc1"): 1, ("mlp", "fc2"): 3}.get(tuple(rest[:-1]))
    return None if index is None else _leaf_key(rest[-1], f"{torch_prefix}.{index}")


# ----------------------------------------------------------------------------- face projection


def abstract_face_projection_params(model: FaceProjection):
    """Parameter shapes of `model` (no init runs)."""
    ids = jnp.zeros((1, model.id_dim), jnp.float32)
    clip = jnp.zeros((1, 1, model.clip_dim), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, clip)["params"]


def face_projection_key_fn(inner: int):
    """Key function for FaceProjection; `inner` = num_heads * head_dim (splits to_kv)."""

    def key_fn(path: Path):
        top = path[0]
        if top == "proj":
            return _leaf_key(path[-1], "proj." + {"fc1": "0", "fc2": "2"}[path[1]])
        if top == "norm":
            return _leaf_key(path[-1], "norm")
        if top == "perceiver_resampler":
            sub = path[1]
            if sub in ("proj_in", "proj_out", "norm_out"):
                return _leaf_key(path[-1], f"perceiver_resampler.{sub}")
            match = re.fullmatch(r"layers_(\d+)_(attn|ff)", sub)
            if match:
                layer, part = match.groups()
                if part == "attn":
                    return _attention_key(path[2:], f"perceiver_resampler.layers.{layer}.0", inner, True)
                return _feed_forward_key(path[2:], f"perceiver_resampler.layers.{layer}.1")
        return None

    return key_fn


def load_face_projection_params(source: Source, model: FaceProjection):
    """SAA.bin (its proj_module) or a bare projection state dict -> FaceProjection params."""
    # Only the proj_module part is read here; SAA_module belongs to merge_dynamicid_unet_params.
    sd = _sub_state_dict(source, PROJ_PREFIX)
    return import_params(
        abstract_face_projection_params(model),
        sd,
        face_projection_key_fn(model.num_heads * model.head_dim),
        model_name="DynamicID face projection (proj_module)",
    )


# ----------------------------------------------------------------------------- IMR


def abstract_imr_params(model: IMR):
    """Parameter shapes of `model` (no init runs)."""
    tokens = jnp.zeros((1, 1, model.id_dim), jnp.float32)
    landmark = jnp.zeros((1, model.landmark_dim), jnp.float32)
    text = jnp.zeros((1, model.text_dim), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, landmark, text, landmark, text)["params"]


def imr_key_fn(inner: int):
    """Key function for IMR; `inner` = num_heads * head_dim (splits to_kv)."""
    fusion_index = {"norm1": 0, "linear1": 1, "norm2": 3, "linear2": 4}

    def key_fn(path: Path):
        top = path[0]
        if top in ("norm_in", "proj_in", "norm_out", "proj_out"):
            return _leaf_key(path[-1], top)
        if top == "feature_fusion" and path[1] in fusion_index:
            return _leaf_key(path[-1], f"feature_fusion.{fusion_index[path[1]]}")
        match = re.fullmatch(r"(disentangle|entangle)_(\d+)", top)
        if match:
            net, block = match.groups()
            prefix = f"{net}Net.{block}"
            part, rest = path[1], path[2:]
            if part == "cross_attn":
                return _attention_key(rest, f"{prefix}.0", inner, True)
            if part == "self_attn":
                return _attention_key(rest, f"{prefix}.1", inner, False)
            if part == "ff":
                return _feed_forward_key(rest, f"{prefix}.2")
        return None

    return key_fn


def load_imr_params(source: Source, model: IMR):
    """IMR.bin -> IMR params (strict)."""
    return import_params(
        abstract_imr_params(model),
        _as_state_dict(source),
        imr_key_fn(model.num_heads * model.head_dim),
        model_name="DynamicID IMR",
    )


# ----------------------------------------------------------------------------- KeyPointEncoder


def abstract_keypoint_encoder_variables(model: KeyPointEncoder):
    """{"params", "batch_stats"} shapes of `model` (no init runs)."""
    image = jnp.zeros((1, model.image_size, model.image_size, model.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), image)


def keypoint_encoder_key_fn(path: Path):
    """("params"|"batch_stats", "blocks_B_J", "conv"|"norm", leaf) -> blocks.B.J.conv_block.{0,1}.*"""
    collection, block, layer, leaf = path
    match = re.fullmatch(r"blocks_(\d+)_(\d+)", block)
    if match is None:
        return None
    prefix = f"blocks.{match.group(1)}.{match.group(2)}.conv_block"
    if collection == "params" and layer == "conv":
        return _leaf_key(leaf, f"{prefix}.0", kernel="conv")
    if collection == "params" and layer == "norm":
        return _leaf_key(leaf, f"{prefix}.1")
    if collection == "batch_stats" and layer == "norm":
        return {"mean": (f"{prefix}.1.running_mean", identity), "var": (f"{prefix}.1.running_var", identity)}.get(leaf)
    return None


def load_keypoint_encoder_variables(source: Source, model: KeyPointEncoder):
    """key_point_encoder.bin -> {"params", "batch_stats"} (strict; num_batches_tracked unused)."""
    return import_params(
        abstract_keypoint_encoder_variables(model),
        _as_state_dict(source),
        keypoint_encoder_key_fn,
        model_name="DynamicID KeyPointEncoder",
        ignore_unexpected=(r"\.num_batches_tracked$",),
    )


# ----------------------------------------------------------------------------- UNet attention processors

_PROCESSOR_PATH = re.compile(
    r"(?:(down_blocks|up_blocks)_(\d+)|mid_block)/attentions_(\d+)/transformer_blocks_(\d+)/attn([12])"
)
_GROUP_ORDER = {"down_blocks": 0, "up_blocks": 1, None: 2}  # diffusers registers mid_block last


def attention_processor_paths(unet_params) -> list[Path]:
    """Our UNet's attention modules in diffusers' `attn_processors` order (see module doc).

    unet_params: a UNet param tree (arrays or ShapeDtypeStructs). An attention module is a
    dict holding `to_q`; one at a path outside the SD layout is an error.
    """
    found = []
    for path in traverse_util.flatten_dict(unet_params):
        if path[-2:] == ("to_q", "kernel"):
            found.append(path[:-2])
    keyed = []
    for attn in found:
        match = _PROCESSOR_PATH.fullmatch("/".join(attn))
        if match is None:
            raise WeightImportError(f"attention module at {'/'.join(attn)} is not in the SD UNet layout")
        group, block, attention, transformer, which = match.groups()
        keyed.append(((_GROUP_ORDER[group], int(block or 0), int(attention), int(transformer), int(which)), attn))
    return [attn for _, attn in sorted(keyed)]


def _processor_key_fn(processors: list[Path]):
    """Maps LoRA and identity-projection leaves to SAA_module keys, base leaves to the base tree."""
    index = {attn: n for n, attn in enumerate(processors)}

    def key_fn(path: Path):
        attn, proj, leaf = path[:-2], path[-2], path[-1]
        n = index.get(attn)
        if n is not None and proj in _LORA_TARGETS and leaf in ("lora_down", "lora_up"):
            return f"{n}.{proj}_lora.{leaf.split('_')[1]}.weight", linear_kernel
        if n is not None and proj in ("to_k_ip", "to_v_ip") and leaf == "kernel":
            return f"{n}.{proj}.weight", linear_kernel
        return _BASE_PREFIX + "/".join(path), identity

    return key_fn


def _derived_saa_unet_shapes(base_unet_params, lora_rank: int):
    """The SAA+LoRA UNet tree shapes implied by a plain SD UNet tree and a LoRA rank."""
    flat = {p: jax.ShapeDtypeStruct(np.shape(v), jnp.float32) for p, v in traverse_util.flatten_dict(base_unet_params).items()}
    for attn in attention_processor_paths(base_unet_params):
        for proj in _LORA_TARGETS:
            kernel = flat.get(attn + (proj, "kernel"))
            if kernel is None:
                raise WeightImportError(f"base UNet lacks {'/'.join(attn + (proj, 'kernel'))}")
            d_in, d_out = kernel.shape
            flat[attn + (proj, "lora_down")] = jax.ShapeDtypeStruct((d_in, lora_rank), jnp.float32)
            flat[attn + (proj, "lora_up")] = jax.ShapeDtypeStruct((lora_rank, d_out), jnp.float32)
        if attn[-1] == "attn2":
            for proj in ("to_k", "to_v"):
                flat[attn + (proj + "_ip", "kernel")] = flat[attn + (proj, "kernel")]
    return traverse_util.unflatten_dict(flat)


def is_processor_leaf(path: Path) -> bool:
    """A DynamicID leaf of the SAA UNet (LoRA, to_k_ip/to_v_ip), not one of the base UNet."""
    return path[-1] in ("lora_down", "lora_up") or (len(path) > 1 and path[-2] in ("to_k_ip", "to_v_ip"))


def base_unet_params(unet_params):
    """The base UNet's own leaves of an SAA UNet tree (what `merge_dynamicid_unet_params` takes)."""
    flat = traverse_util.flatten_dict(unet_params)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if not is_processor_leaf(p)})


def export_saa_module(unet_params) -> dict[str, np.ndarray]:
    """The inverse of the SAA_module import: an SAA UNet tree -> {"N.to_q_lora.down.weight",
    ..., "N.to_k_ip.weight", ...} (processor N in diffusers' `attn_processors` order)."""
    key_fn = _processor_key_fn(attention_processor_paths(unet_params))
    return export_state_dict(unet_params, key_fn, keep=lambda key: not key.startswith(_BASE_PREFIX))


def merge_dynamicid_unet_params(base_unet_params, saa_params: Source, *, abstract_params=None):
    """SD UNet params + the SAA_module weights -> the SAA+LoRA UNet param tree.

    base_unet_params: the plain SD1.5 UNet tree (our naming contract), which fills every
      base leaf; saa_params: SAA.bin path, its flattened dict, or the bare SAA_module dict
      ("N.to_q_lora.down.weight", ...), which fills every lora_down/lora_up/to_k_ip/to_v_ip.
    abstract_params: the SAA UNet's own shapes (`jax.eval_shape` of its init); when given,
      every leaf, base ones included, must match it exactly. Without it the expected tree is
      the base tree plus LoRA of the checkpoint's rank and to_{k,v}_ip shaped like to_{k,v}.
    Returns numpy arrays (float32). Raises WeightImportError naming every bad key.
    """
    saa_sd = _sub_state_dict(saa_params, SAA_PREFIX)
    if any(k.startswith(PROJ_PREFIX) for k in saa_sd):
        saa_sd = {k: v for k, v in saa_sd.items() if not k.startswith(PROJ_PREFIX)}
    if abstract_params is None:
        probe = saa_sd.get("0.to_q_lora.down.weight")
        if probe is None:
            raise WeightImportError("SAA_module: missing 0.to_q_lora.down.weight (needed to read the LoRA rank)")
        abstract_params = _derived_saa_unet_shapes(base_unet_params, int(probe.shape[0]))
    processors = attention_processor_paths(abstract_params)
    merged = dict(saa_sd)
    for path, value in traverse_util.flatten_dict(base_unet_params).items():
        merged[_BASE_PREFIX + "/".join(path)] = np.asarray(value)
    return import_params(
        abstract_params, merged, _processor_key_fn(processors), model_name="DynamicID SAA UNet (base UNet + SAA_module)"
    )


def init_dynamicid_unet_params(base_unet_params, rng: jax.Array, lora_rank: int, *, abstract_params=None):
    """The SAA+LoRA UNet tree for training: base leaves from the SD UNet, LoRA fresh
    (down N(0, 1/r), up zeros: an exact no-op), to_k_ip/to_v_ip copied from to_k/to_v.

    Built as a synthetic SAA_module checkpoint fed through `merge_dynamicid_unet_params`, so
    the same strict checks apply. abstract_params as there.
    """
    if lora_rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
    shapes = _derived_saa_unet_shapes(base_unet_params, lora_rank) if abstract_params is None else abstract_params
    flat_shapes = traverse_util.flatten_dict(shapes)
    flat_base = traverse_util.flatten_dict(base_unet_params)
    synthetic: dict[str, np.ndarray] = {}
    for n, attn in enumerate(attention_processor_paths(shapes)):
        for proj in _LORA_TARGETS:
            down_shape = flat_shapes[attn + (proj, "lora_down")].shape
            up_shape = flat_shapes[attn + (proj, "lora_up")].shape
            rng, key = jax.random.split(rng)
            down = np.asarray(jax.random.normal(key, down_shape, jnp.float32)) / down_shape[1]
            synthetic[f"{n}.{proj}_lora.down.weight"] = down.T  # torch layout (r, in)
            synthetic[f"{n}.{proj}_lora.up.weight"] = np.zeros(up_shape[::-1], np.float32)
        if attn + ("to_k_ip", "kernel") in flat_shapes:  # an attn2 with SAA (saa_blocks may leave some out)
            for proj in ("to_k", "to_v"):
                base = flat_base.get(attn + (proj, "kernel"))
                if base is None:
                    raise WeightImportError(f"base UNet lacks {'/'.join(attn + (proj, 'kernel'))}")
                synthetic[f"{n}.{proj}_ip.weight"] = np.asarray(base).T
    return merge_dynamicid_unet_params(base_unet_params, synthetic, abstract_params=shapes)
