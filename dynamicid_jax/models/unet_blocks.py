"""The building blocks of the UNet (`models/unet.py`): diffusers' Transformer2DModel,
BasicTransformerBlock (GEGLU feed-forward), down/up/mid blocks and the resamplers, NHWC.

Parameter names mirror diffusers module names with list indices joined by an underscore
(`attentions.0.transformer_blocks.1.attn2.to_q` -> `attentions_0/transformer_blocks_1/attn2/to_q`).
A Transformer2DModel holds `num_layers` BasicTransformerBlocks (diffusers'
`transformer_layers_per_block`: 1 in SD1.5, up to 10 per block in SDXL).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .layers import Attention, Dtype, LoRADense, ResnetBlock2D, conv2d, exact_gelu, group_norm
from .unet_config import CrossAttentionFactory

# diffusers' Transformer2DModel GroupNorm and BasicTransformerBlock LayerNorm epsilons
# (fixed in diffusers, not taken from the UNet config's norm_eps).
TRANSFORMER_GROUPNORM_EPS = 1e-6
TRANSFORMER_LAYERNORM_EPS = 1e-5


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
    """GroupNorm -> proj_in -> `num_layers` BasicTransformerBlocks -> proj_out, plus the input residual.

    proj_in/proj_out are Dense layers: diffusers' 1x1 convs (use_linear_projection=False) and
    Linears compute the same map, and `unet_key_fn` reads either layout.
    x (B, H, W, C), context (B, L, Cc) -> (B, H, W, C).
    """

    num_heads: int
    groups: int
    lora_rank: int = 0
    cross_attention: Optional[CrossAttentionFactory] = None
    attention_block: Optional[int] = None
    num_layers: int = 1
    # Rematerialise each BasicTransformerBlock in the backward pass (training memory: the
    # block's activations are recomputed instead of stored; the values are the same).
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, conditioning: Any) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        y = group_norm(self.groups, TRANSFORMER_GROUPNORM_EPS, name="norm", **kw)(x)
        y = LoRADense(c, name="proj_in", **kw)(y.reshape(b, h * w, c))
        # static_argnums counts self: argument 4 is spatial_shape, a tuple of ints
        block = nn.remat(BasicTransformerBlock, static_argnums=(4,)) if self.remat else BasicTransformerBlock
        for i in range(self.num_layers):
            y = block(
                num_heads=self.num_heads, head_dim=c // self.num_heads, lora_rank=self.lora_rank,
                cross_attention=self.cross_attention,
                attention_block=self.attention_block, name=f"transformer_blocks_{i}", **kw,
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
    transformer_layers: tuple[int, ...] = ()  # BasicTransformerBlocks per attention, one per resnet
    lora_rank: int = 0
    cross_attention: Optional[CrossAttentionFactory] = None
    attention_block: Optional[int] = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, conditioning) -> tuple[jax.Array, list[jax.Array]]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.with_attention and len(self.transformer_layers) != self.num_layers:
            raise ValueError(f"DownBlock: {self.num_layers} resnets, transformer_layers={self.transformer_layers}")
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, name=f"resnets_{i}", **kw)(x, temb)
            if self.with_attention:
                x = Transformer2DModel(
                    self.num_heads, self.groups, self.lora_rank, self.cross_attention, self.attention_block,
                    num_layers=self.transformer_layers[i], remat=self.remat, name=f"attentions_{i}", **kw,
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
    transformer_layers: tuple[int, ...] = ()  # BasicTransformerBlocks per attention, one per resnet
    lora_rank: int = 0
    cross_attention: Optional[CrossAttentionFactory] = None
    attention_block: Optional[int] = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips: Sequence[jax.Array], temb, context, conditioning, upsample_size=None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if len(skips) != self.num_layers:
            raise ValueError(f"UpBlock expects {self.num_layers} skip states, got {len(skips)}")
        if self.with_attention and len(self.transformer_layers) != self.num_layers:
            raise ValueError(f"UpBlock: {self.num_layers} resnets, transformer_layers={self.transformer_layers}")
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, name=f"resnets_{i}", **kw)(x, temb)
            if self.with_attention:
                x = Transformer2DModel(
                    self.num_heads, self.groups, self.lora_rank, self.cross_attention, self.attention_block,
                    num_layers=self.transformer_layers[i], remat=self.remat, name=f"attentions_{i}", **kw,
                )(x, context, conditioning)
        if upsample_size is not None:
            x = Upsample2D(name="upsamplers_0", **kw)(x, upsample_size)
        return x


class MidBlock2DCrossAttn(nn.Module):
    """resnets_0 -> attentions_0 (`transformer_layers` blocks) -> resnets_1, channels unchanged."""

    num_heads: int
    groups: int
    eps: float
    transformer_layers: int = 1
    lora_rank: int = 0
    cross_attention: Optional[CrossAttentionFactory] = None
    attention_block: Optional[int] = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, conditioning) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, self.eps, name="resnets_0", **kw)(x, temb)
        x = Transformer2DModel(
            self.num_heads, self.groups, self.lora_rank, self.cross_attention, self.attention_block,
            num_layers=self.transformer_layers, remat=self.remat, name="attentions_0", **kw,
        )(x, context, conditioning)
        return ResnetBlock2D(c, self.groups, self.eps, name="resnets_1", **kw)(x, temb)
