"""Face-encoder projection (IP-Adapter-FaceID-Plus v1): ArcFace + CLIP tokens -> identity tokens.

    id_embedding (B, id_dim)                 L2-normalised ArcFace vector (512)
    clip_tokens  (B, L, clip_dim)            CLIP ViT-H/14 penultimate hidden states (257 x 1280)
    returns      (B, num_tokens, width)      identity tokens for SAA (4 x 768)

x = LayerNorm(MLP(id)).reshape(T, width) are the latents of a perceiver resampler over the
projected CLIP tokens; the output is the resampler's (no shortcut, as DynamicID uses it).
Param tree: proj/{fc1,fc2}, norm, perceiver_resampler/{proj_in, layers_L_attn,
layers_L_ff, proj_out, norm_out}.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynamicid_jax.dynamicid.perceiver import FeedForward, PerceiverAttention, layer_norm
from dynamicid_jax.models.layers import MLP, Dtype


class PerceiverResampler(nn.Module):
    """latents (B, T, width), clip_tokens (B, L, clip_dim) -> (B, T, out_features or width)."""

    depth: int = 4
    num_heads: int = 12
    head_dim: int = 64
    ff_mult: int = 4
    out_features: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array, clip_tokens: jax.Array) -> jax.Array:
        width = latents.shape[-1]
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        features = dense(width, "proj_in")(clip_tokens)
        for i in range(self.depth):
            latents = latents + PerceiverAttention(
                self.num_heads, self.head_dim, self.dtype, self.param_dtype, name=f"layers_{i}_attn"
            )(latents, features)
            latents = latents + FeedForward(self.ff_mult, self.dtype, self.param_dtype, name=f"layers_{i}_ff")(latents)
        latents = dense(self.out_features or width, "proj_out")(latents)
        return layer_norm("norm_out")(latents)


class FaceProjection(nn.Module):
    """ArcFace vector + CLIP tokens -> identity tokens (B, num_tokens, width). See module doc.

    Sizes come from the model config (`modeling.build_modules`: the release's are SD1.5's,
    `base_models.sd15.model_config`); none is assumed here."""

    id_dim: int  # face embedding (ArcFace, or SFace)
    clip_dim: int  # the vision tower's hidden size
    num_tokens: int
    width: int  # the UNet's cross-attention dim
    depth: int
    num_heads: int
    head_dim: int
    ff_mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, id_embedding: jax.Array, clip_tokens: jax.Array) -> jax.Array:
        if (
            id_embedding.ndim != 2
            or clip_tokens.ndim != 3
            or id_embedding.shape[0] != clip_tokens.shape[0]
            or id_embedding.shape[1] != self.id_dim
            or clip_tokens.shape[2] != self.clip_dim
        ):
            raise ValueError(
                f"FaceProjection wants id_embedding (B, {self.id_dim}) and clip_tokens (B, L, {self.clip_dim}), "
                f"got {id_embedding.shape} and {clip_tokens.shape}"
            )
        b = id_embedding.shape[0]
        x = MLP(
            hidden_features=2 * self.id_dim,
            out_features=self.num_tokens * self.width,
            activation="gelu",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(id_embedding)
        x = layer_norm("norm")(x.reshape(b, self.num_tokens, self.width))
        return PerceiverResampler(
            depth=self.depth,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            ff_mult=self.ff_mult,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="perceiver_resampler",
        )(x, clip_tokens)
