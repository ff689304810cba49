"""The Stable Diffusion 1.5 UNet (diffusers' `UNet2DConditionModel`) in Flax linen, NHWC.

The config (`UNetConfig`, re-exported here) lives in `unet_config.py`. Structure and
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

from . import torch_import, weight_sources
from .layers import Attention, Dtype, LoRADense, ResnetBlock2D, conv2d, exact_gelu, group_norm
from .unet_config import CROSS_ATTN_DOWN, CROSS_ATTN_UP, CrossAttentionFactory, UNetConfig

# diffusers' Transformer2DModel GroupNorm and BasicTransformerBlock LayerNorm epsilons
# (fixed in diffusers, not taken from the UNet config's norm_eps).
TRANSFORMER_GROUPNORM_EPS = 1e-6
TRANSFORMER_LAYERNORM_EPS = 1e-5


# ----------------------------------------------------------------------------- pure helpers


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


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of torch's legacy `F.interpolate(mode="nearest", size=out_size)` on one axis."""
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) // 2
    scale = np.float32(in_size) / np.float32(out_size)  # torch computes the scale in float32
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, h, w, C) -> (B, H, W, C) nearest, matching torch's index rule (exact 2x = repeat)."""
    h, w = x.shape[1:3]
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    x = jnp.take(x, nearest_indices(h, size[0]), axis=1)
    return jnp.take(x, nearest_indices(w, size[1]), axis=2)


# ----------------------------------------------------------------------------- modules


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


class GEGLU(nn.Module):
    """proj to 2*features, then value * gelu(gate) (exact erf GELU, as torch's F.gelu)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = LoRADense(2 * self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * exact_gelu(gate)


class FeedForward(nn.Module):
    """diffusers FeedForward with GEGLU: net_0 (GEGLU to 4C) -> net_2 (Dense back to C)."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x)
        return LoRADense(x.shape[-1], name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention (or the configured replacement), GEGLU feed-forward; pre-LayerNorm residuals.

    x (B, N, C) with N = h*w row-major, context (B, L, Cc) -> (B, N, C).
    """

    num_heads: int
    head_dim: int
    lora_rank: int = 0
    cross_attention: Optional[CrossAttentionFactory] = None
    attention_block: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        conditioning: Any,
        spatial_shape: tuple[int, int],
    ) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(num_heads=self.num_heads, head_dim=self.head_dim, lora_rank=self.lora_rank, **kw)
        norm = lambda name: nn.LayerNorm(  # noqa: E731
            epsilon=TRANSFORMER_LAYERNORM_EPS, use_fast_variance=False, name=name, **kw
        )
        x = x + Attention(name="attn1", key_block=self.attention_block, **attn)(norm("norm1")(x))
        h = norm("norm2")(x)
        if self.cross_attention is not None:
            h = self.cross_attention(name="attn2", **attn)(h, context, conditioning, spatial_shape=spatial_shape)
        else:
            h = Attention(name="attn2", key_block=self.attention_block, **attn)(h, context)
        x = x + h
        return x + FeedForward(name="ff", **kw)(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> one BasicTransformerBlock -> proj_out, plus the input residual.

    proj_in/proj_out are Dense layers: diffusers' 1x1 convs (use_linear_projection=False) and
    Linears compute the same map, and `unet_key_fn` reads either layout.
    x (B, H, W, C), context (B, L, Cc) -> (B, H, W, C).
    """

    num_heads: int
    groups: int
    lora_rank: int = 0
    cross_attention: Optional[CrossAttentionFactory] = None
    attention_block: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, conditioning: Any) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        y = group_norm(self.groups, TRANSFORMER_GROUPNORM_EPS, name="norm", **kw)(x)
        y = LoRADense(c, name="proj_in", **kw)(y.reshape(b, h * w, c))
        y = BasicTransformerBlock(
            num_heads=self.num_heads, head_dim=c // self.num_heads, lora_rank=self.lora_rank,
            cross_attention=self.cross_attention,
            attention_block=self.attention_block, name="transformer_blocks_0", **kw,
        )(y, context, conditioning, (h, w))
        y = LoRADense(c, name="proj_out", **kw)(y)
        return x + y.reshape(b, h, w, c)


class Downsample2D(nn.Module):
    """3x3 stride-2 conv with padding 1: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv2d(x.shape[-1], 3, self.dtype, self.param_dtype, name="conv", stride=2)(x)


class Upsample2D(nn.Module):
    """Nearest resize to `size` (the skip connection's), then a 3x3 conv."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int]) -> jax.Array:
        return conv2d(x.shape[-1], 3, self.dtype, self.param_dtype, name="conv")(resize_nearest(x, size))


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with_attention) or DownBlock2D.

    Returns the block output and the skip states it contributes (one per resnet, plus the
    downsampled output when `add_downsample`).
    """

    out_channels: int
    num_layers: int
    num_heads: int
    groups: int
    eps: float
    with_attention: bool
    add_downsample: bool
    lora_rank: int = 0
    cross_attention: Optional[CrossAttentionFactory] = None
    attention_block: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, conditioning) -> tuple[jax.Array, list[jax.Array]]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, name=f"resnets_{i}", **kw)(x, temb)
            if self.with_attention:
                x = Transformer2DModel(
                    self.num_heads, self.groups, self.lora_rank, self.cross_attention, self.attention_block,
                    name=f"attentions_{i}", **kw,
                )(x, context, conditioning)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(name="downsamplers_0", **kw)(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (with_attention) or UpBlock2D.

    skips: this block's skip states, consumed last-first, each concatenated after x on the
    channel axis (diffusers' cat order). upsample_size: (H, W) to resize to, or None.
    """

    out_channels: int
    num_layers: int
    num_heads: int
    groups: int
    eps: float
    with_attention: bool
    lora_rank: int = 0
    cross_attention: Optional[CrossAttentionFactory] = None
    attention_block: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips: Sequence[jax.Array], temb, context, conditioning, upsample_size=None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if len(skips) != self.num_layers:
            raise ValueError(f"UpBlock expects {self.num_layers} skip states, got {len(skips)}")
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, name=f"resnets_{i}", **kw)(x, temb)
            if self.with_attention:
                x = Transformer2DModel(
                    self.num_heads, self.groups, self.lora_rank, self.cross_attention, self.attention_block,
                    name=f"attentions_{i}", **kw,
                )(x, context, conditioning)
        if upsample_size is not None:
            x = Upsample2D(name="upsamplers_0", **kw)(x, upsample_size)
        return x


class MidBlock2DCrossAttn(nn.Module):
    """resnets_0 -> attentions_0 -> resnets_1, channels unchanged."""

    num_heads: int
    groups: int
    eps: float
    lora_rank: int = 0
    cross_attention: Optional[CrossAttentionFactory] = None
    attention_block: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, conditioning) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, self.eps, name="resnets_0", **kw)(x, temb)
        x = Transformer2DModel(
            self.num_heads, self.groups, self.lora_rank, self.cross_attention, self.attention_block,
            name="attentions_0", **kw,
        )(x, context, conditioning)
        return ResnetBlock2D(c, self.groups, self.eps, name="resnets_1", **kw)(x, temb)


class UNet2DConditionModel(nn.Module):
    """SD1.5-style conditional UNet, channels-last.

    __call__(sample (B,H,W,Cin), timesteps (B,) or (), context (B,L,Ccross),
             conditioning=None) -> (B,H,W,Cout) float32.
    Any H, W >= 1 work; sizes that are not multiples of 2**(levels-1) follow diffusers.
    `conditioning` goes to the `config.saa` modules (DynamicID: an
    IdentityConditioning); giving it to a UNet with plain attention is an error.
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
    ) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blocks = dict(
            groups=cfg.norm_num_groups, eps=cfg.norm_eps, lora_rank=cfg.lora_rank, cross_attention=cfg.saa,
            attention_block=cfg.attention_block, **kw,
        )
        if conditioning is not None and cfg.saa is None:
            raise ValueError("conditioning was given but UNetConfig.saa is None (plain attention ignores it)")
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, H, W, {cfg.in_channels}) NHWC, got {sample.shape}")
        if context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"context must be (B, L, {cfg.cross_attention_dim}), got {context.shape}")
        batch = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))

        t = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(t)

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
                name=f"down_blocks_{i}",
                **blocks,
            )(x, temb, context, conditioning)
            skips.extend(states)

        x = MidBlock2DCrossAttn(cfg.num_attention_heads[-1], name="mid_block", **blocks)(x, temb, context, conditioning)

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
    variables = jax.eval_shape(
        lambda s, t, c, i: module.init(jax.random.key(0), s, t, c, i), sample, timesteps, context, conditioning
    )
    return variables["params"]


def load_unet(
    path: str | os.PathLike, dtype: Dtype = jnp.float32, config: Optional[UNetConfig] = None
) -> tuple[UNet2DConditionModel, dict]:
    """Load a UNet from diffusers-format or single-file SD1.5 weights.

    path: a diffusers pipeline folder (its `unet/` is used), a `unet` component folder
      (`config.json` + `diffusion_pytorch_model.safetensors|.bin`), or a single-file SD1.5
      checkpoint (`.safetensors`/`.ckpt`), or a folder written by `python -m dynamicid_jax.convert`.
    dtype: compute dtype of the returned module; parameters are float32 either way.
    config: only for single-file checkpoints, which carry no config; defaults to SD1.5's.
    Returns (module, params): params is the nested dict of float32 numpy arrays for
    `module.apply({"params": params}, sample, timesteps, context)`.
    Raises WeightImportError listing every missing, unexpected and mis-shaped key.
    """
    config, params = weight_sources.read_component(
        path, name="unet", subfolder="unet", weight_stems=["diffusion_pytorch_model", "diffusion_pytorch_model.fp16"],
        config_cls=UNetConfig, config_from_json=UNetConfig.from_diffusers, import_fn=import_unet_params,
        single_file=True, config=config)
    return UNet2DConditionModel(config, dtype=dtype), params


def import_unet_params(config: UNetConfig, state_dict: dict[str, np.ndarray]) -> dict:
    """diffusers UNet2DConditionModel state dict -> our params (strict; WeightImportError)."""
    abstract = unet_abstract_params(UNet2DConditionModel(config))
    return torch_import.import_params(abstract, state_dict, unet_key_fn, model_name="unet")
