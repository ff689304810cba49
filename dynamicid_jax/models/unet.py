"""The Stable Diffusion UNet (diffusers' `UNet2DConditionModel`: SD1.5, and SDXL with its
`text_time` micro-conditioning) in Flax linen, NHWC.

The config (`UNetConfig`, re-exported here) lives in `unet_config.py`, the blocks in
`unet_blocks.py`; this module holds the embeddings, the network and its weight import. Structure and
parameter names mirror diffusers module names with list indices joined by an
underscore (`down_blocks.0.resnets.1.conv1.weight` -> `down_blocks_0/resnets_1/conv1/kernel`;
`to_out.0` -> `to_out`), so weight import is a rename plus a layout transform
(`unet_key_fn`). Parameters are float32; `dtype` is the compute dtype.

Latent sizes that are not multiples of 2**num_upsamplers work as in diffusers: each
downsampler gives ceil(h/2), and each upsampler resizes (nearest, torch's index rule) to the
spatial size of the skip connection it is concatenated with.

Every cross-attention (`attn2`) is the plain shared `Attention`, unless the caller gives
`UNetConfig.saa`: a factory for another attn2 module that also receives the UNet's
`conditioning` argument (DynamicID's `dynamicid.saa.SAAConfig`, set by `modeling.py`). This
module knows nothing of what that conditioning holds.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import single_file_configs, torch_import, weight_sources
from .layers import Dtype, LoRADense, conv2d, group_norm
from .unet_blocks import DownBlock, MidBlock2DCrossAttn, UpBlock
from .unet_config import CROSS_ATTN_DOWN, CROSS_ATTN_UP, TEXT_TIME, UNetConfig

# ----------------------------------------------------------------------------- embeddings


def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
    """Sinusoidal embedding as diffusers' `get_timestep_embedding`. (B,) -> (B, dim) float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2. (B, Cin) -> (B, features)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = LoRADense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
        return LoRADense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(
            jax.nn.silu(x)
        )


def text_time_input(config: UNetConfig, added_cond: Any) -> jax.Array:
    """SDXL's micro-conditioning input to `add_embedding`, as diffusers' `text_time`.

    added_cond {"text_embeds": (B, P) pooled text, "time_ids": (B, N)} -> (B, P + N * T) float32:
    every time id through the sinusoidal embedding of width T = addition_time_embed_dim
    (the UNet's flip_sin_to_cos and freq_shift), flattened per row after the pooled text.
    SDXL base's six ids are original (h, w), crop top-left (y, x), target (h, w).
    """
    if not isinstance(added_cond, dict) or set(added_cond) != {"text_embeds", "time_ids"}:
        keys = sorted(added_cond) if isinstance(added_cond, dict) else type(added_cond).__name__
        raise ValueError(f"added_cond must be a dict with exactly text_embeds and time_ids, got {keys}")
    text, time_ids = jnp.asarray(added_cond["text_embeds"]), jnp.asarray(added_cond["time_ids"])
    if text.ndim != 2 or time_ids.ndim != 2 or text.shape[0] != time_ids.shape[0]:
        raise ValueError(f"added_cond: text_embeds (B, P) and time_ids (B, N), got {text.shape} and {time_ids.shape}")
    width = config.addition_time_embed_dim
    if text.shape[1] + time_ids.shape[1] * width != config.projection_class_embeddings_input_dim:
        raise ValueError(
            f"added_cond: {text.shape[1]} pooled + {time_ids.shape[1]} time ids x {width} != "
            f"projection_class_embeddings_input_dim {config.projection_class_embeddings_input_dim}"
        )
    times = timestep_embedding(time_ids.reshape(-1), width, config.flip_sin_to_cos, config.freq_shift)
    return jnp.concatenate([text.astype(jnp.float32), times.reshape(text.shape[0], -1)], axis=-1)


# ----------------------------------------------------------------------------- network


class UNet2DConditionModel(nn.Module):
    """Conditional UNet (SD1.5, SDXL), channels-last.

    __call__(sample (B,H,W,Cin), timesteps (B,) or (), context (B,L,Ccross),
             conditioning=None, added_cond=None) -> (B,H,W,Cout) float32.
    Any H, W >= 1 work; sizes that are not multiples of 2**(levels-1) follow diffusers.
    `conditioning` goes to the `config.saa` modules (DynamicID: an
    IdentityConditioning); giving it to a UNet with plain attention is an error.
    `added_cond`: {"text_embeds": (B, P), "time_ids": (B, N)} exactly when
    `config.addition_embed_type == "text_time"` (SDXL; see `text_time_input`), else None.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        context: jax.Array,
        conditioning: Any = None,
        added_cond: Optional[dict] = None,
    ) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blocks = dict(
            groups=cfg.norm_num_groups, eps=cfg.norm_eps, lora_rank=cfg.lora_rank, cross_attention=cfg.saa,
            attention_block=cfg.attention_block, **kw,
        )
        if conditioning is not None and cfg.saa is None:
            raise ValueError("conditioning was given but UNetConfig.saa is None (plain attention ignores it)")
        if (added_cond is None) != (cfg.addition_embed_type is None):
            raise ValueError(
                f"added_cond is {'missing' if added_cond is None else 'given'} but UNetConfig.addition_embed_type is "
                f"{cfg.addition_embed_type!r}: {TEXT_TIME!r} needs added_cond={{'text_embeds', 'time_ids'}}, "
                "None takes none"
            )
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, H, W, {cfg.in_channels}) NHWC, got {sample.shape}")
        if context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"context must be (B, L, {cfg.cross_attention_dim}), got {context.shape}")
        batch = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))

        t = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(t)
        if added_cond is not None:
            added = text_time_input(cfg, added_cond)
            if added.shape[0] != batch:
                raise ValueError(f"added_cond has batch {added.shape[0]}, sample has {batch}")
            temb = temb + TimestepEmbedding(cfg.time_embed_dim, name="add_embedding", **kw)(added)

        x = conv2d(cfg.block_out_channels[0], 3, name="conv_in", **kw)(sample)
        skips = [x]
        levels = len(cfg.block_out_channels)
        for i, block_type in enumerate(cfg.down_block_types):
            x, states = DownBlock(
                out_channels=cfg.block_out_channels[i],
                num_layers=cfg.layers_per_block,
                num_heads=cfg.num_attention_heads[i],
                with_attention=block_type == CROSS_ATTN_DOWN,
                add_downsample=i < levels - 1,
                transformer_layers=cfg.down_transformer_layers(i),
                name=f"down_blocks_{i}",
                **blocks,
            )(x, temb, context, conditioning)
            skips.extend(states)

        x = MidBlock2DCrossAttn(
            cfg.num_attention_heads[-1], transformer_layers=cfg.mid_transformer_layers, name="mid_block", **blocks
        )(x, temb, context, conditioning)

        up_channels = cfg.block_out_channels[::-1]
        up_heads = cfg.num_attention_heads[::-1]
        n = cfg.layers_per_block + 1
        for i, block_type in enumerate(cfg.up_block_types):
            block_skips, skips = skips[-n:], skips[:-n]
            # Resize to the next skip connection's grid: 2x when sizes divide, else diffusers' rule.
            upsample_size = tuple(skips[-1].shape[1:3]) if i < levels - 1 else None
            x = UpBlock(
                out_channels=up_channels[i],
                num_layers=n,
                num_heads=up_heads[i],
                with_attention=block_type == CROSS_ATTN_UP,
                transformer_layers=cfg.up_transformer_layers(i),
                name=f"up_blocks_{i}",
                **blocks,
            )(x, block_skips, temb, context, conditioning, upsample_size)

        x = jax.nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        x = conv2d(cfg.out_channels, 3, name="conv_out", **kw)(x)
        return x.astype(jnp.float32)


# ----------------------------------------------------------------------------- weight import

_LIST_MODULE = re.compile(
    r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|transformer_blocks|net)_(\d+)$"
)
_CONV_MODULES = {"conv_in", "conv_out", "conv1", "conv2", "conv_shortcut", "conv"}
_CONV1X1_OR_LINEAR = {"proj_in", "proj_out"}


def unet_key_fn(path: tuple[str, ...]) -> Optional[tuple[str, torch_import.Transform]]:
    """Our UNet param path -> (diffusers state-dict key, layout transform).

    `('down_blocks_1', 'attentions_0', 'proj_in', 'kernel')` ->
    `('down_blocks.1.attentions.0.proj_in.weight', linear_from_conv1x1)`.
    LoRA leaves (`lora_down`/`lora_up`) and DynamicID's `to_k_ip`/`to_v_ip` have no
    diffusers counterpart: None.
    """
    *modules, leaf = path
    if leaf in ("lora_down", "lora_up") or any(m in ("to_k_ip", "to_v_ip") for m in modules):
        return None
    names = []
    for m in modules:
        match = _LIST_MODULE.match(m)
        names.extend(match.groups() if match else [m])
        if m == "to_out":
            names.append("0")
    owner = modules[-1] if modules else ""
    if leaf == "kernel":
        if owner in _CONV_MODULES:
            transform = torch_import.conv_kernel
        elif owner in _CONV1X1_OR_LINEAR:
            transform = torch_import.linear_from_conv1x1
        else:
            transform = torch_import.linear_kernel
        return ".".join(names + ["weight"]), transform
    if leaf == "scale":
        return ".".join(names + ["weight"]), torch_import.identity
    if leaf == "bias":
        return ".".join(names + ["bias"]), torch_import.identity
    return None


def unet_abstract_params(module: UNet2DConditionModel, conditioning: Any = None):
    """Parameter shapes (ShapeDtypeStructs) of `module`, without running an init.

    conditioning: example inputs (arrays or ShapeDtypeStructs, batch 1) for the
      `config.saa` modules, when the config has them.
    """
    cfg = module.config
    size = 2 ** (len(cfg.block_out_channels) - 1)
    sample = jax.ShapeDtypeStruct((1, size, size, cfg.in_channels), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((1,), jnp.float32)
    context = jax.ShapeDtypeStruct((1, 1, cfg.cross_attention_dim), jnp.float32)
    added_cond = None
    if cfg.addition_embed_type == TEXT_TIME:  # any split of the projection input traces the same params
        pooled = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim
        added_cond = {"text_embeds": jax.ShapeDtypeStruct((1, pooled), jnp.float32),
                      "time_ids": jax.ShapeDtypeStruct((1, 1), jnp.float32)}
    variables = jax.eval_shape(
        lambda s, t, c, i, a: module.init(jax.random.key(0), s, t, c, i, a),
        sample, timesteps, context, conditioning, added_cond,
    )
    return variables["params"]


def load_unet(
    path: str | os.PathLike, dtype: Dtype = jnp.float32, config: Optional[UNetConfig] = None
) -> tuple[UNet2DConditionModel, dict]:
    """Load a UNet from diffusers-format or single-file SD1.5 weights.

    path: a diffusers pipeline folder (its `unet/` is used), a `unet` component folder
      (`config.json` + `diffusion_pytorch_model.safetensors|.bin`), or a single-file SD1.5 or
      SDXL checkpoint (`.safetensors`/`.ckpt`), or a folder written by `python -m dynamicid_jax.convert`.
    dtype: compute dtype of the returned module; parameters are float32 either way.
    config: only for single-file checkpoints, which carry no config: required for an SD1.5
      file (the family's, `base_models.single_file_config`); for an SDXL one it defaults to
      the shapes' reading (`single_file_configs`).
    Returns (module, params): params is the nested dict of float32 numpy arrays for
    `module.apply({"params": params}, sample, timesteps, context)`.
    Raises WeightImportError listing every missing, unexpected and mis-shaped key.
    """
    config, params = weight_sources.read_component(
        path, name="unet", subfolder="unet", weight_stems=["diffusion_pytorch_model", "diffusion_pytorch_model.fp16"],
        config_cls=UNetConfig, config_from_json=UNetConfig.from_diffusers, import_fn=import_unet_params,
        single_file=True, config=config, single_file_config=single_file_configs.infer_unet_config)
    return UNet2DConditionModel(config, dtype=dtype), params


def import_unet_params(config: UNetConfig, state_dict: dict[str, np.ndarray]) -> dict:
    """diffusers UNet2DConditionModel state dict -> our params (strict; WeightImportError)."""
    abstract = unet_abstract_params(UNet2DConditionModel(config))
    return torch_import.import_params(abstract, state_dict, unet_key_fn, model_name="unet")
