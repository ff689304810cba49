"""Identity-Motion Reconfigurator (IMR): edit identity tokens to a target expression/pose.

    id_tokens     (B, T, id_dim)        source identity tokens (face-projection output, 4 x 768)
    src_landmark  (B, landmark_dim)     KeyPointEncoder feature of the source face (768)
    src_text      (B, text_dim)         pooled CLIP text feature of the source face prompt (768)
    tgt_landmark, tgt_text              the same for the target
    returns       (B, T, id_dim)        edited identity tokens

Motion tokens psi = fusion(concat(landmark, text)) -> (num_motion_tokens, width).
x = proj_in(norm_in(id)); DisentangleNet blocks with psi_src, then EntangleNet blocks with
psi_tgt; a block is x += PerceiverAttn(x, psi); x += SelfAttn(x); x += FFN(x).
Output proj_out(norm_out(x)). One source per target: repeat the source rows to pair one
source with several targets (the release's 1 -> many call).

Param tree: feature_fusion/{norm1,linear1,norm2,linear2}, norm_in, proj_in,
disentangle_I/{cross_attn,self_attn,ff}, entangle_I/{...}, norm_out, proj_out.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynamicid_jax.dynamicid.perceiver import FeedForward, PerceiverAttention, layer_norm
from dynamicid_jax.models.layers import Attention, Dtype, exact_gelu


class MotionFusion(nn.Module):
    """concat(landmark, text) (B, Ck + Ct) -> motion tokens (B, num_tokens, width).

    LayerNorm -> Linear -> GELU -> LayerNorm -> Linear(width -> num_tokens*width) -> GELU.
    """

    num_tokens: int
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, landmark: jax.Array, text: jax.Array) -> jax.Array:
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        x = jnp.concatenate([landmark, text], axis=-1)
        x = exact_gelu(dense(self.width, "linear1")(layer_norm("norm1")(x)))
        x = exact_gelu(dense(self.num_tokens * self.width, "linear2")(layer_norm("norm2")(x)))
        return x.reshape(x.shape[0], self.num_tokens, self.width)


class SelfAttention(nn.Module):
    """LayerNorm then bias-free multi-head self-attention: (B, T, C) -> (B, T, C) update."""

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Attention(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            out_features=x.shape[-1],
            qkv_bias=False,
            out_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attn",
        )(layer_norm("norm")(x))


class IMRBlock(nn.Module):
    """x (B, T, C), motion (B, c, C) -> (B, T, C): perceiver, self-attention, FFN, each residual."""

    num_heads: int
    head_dim: int
    ff_mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, motion: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + PerceiverAttention(self.num_heads, self.head_dim, name="cross_attn", **kw)(x, motion)
        x = x + SelfAttention(self.num_heads, self.head_dim, name="self_attn", **kw)(x)
        return x + FeedForward(self.ff_mult, name="ff", **kw)(x)


class IMR(nn.Module):
    """Identity-Motion Reconfigurator; see the module docstring for shapes. Sizes come from
    the model config (`modeling.build_modules`; the release's: `base_models.sd15.model_config`)."""

    id_dim: int  # identity-token width (in and out)
    landmark_dim: int  # KeyPointEncoder feature
    text_dim: int  # pooled CLIP text feature
    width: int
    num_heads: int
    head_dim: int
    num_motion_tokens: int
    depth: int  # blocks in each of DisentangleNet and EntangleNet
    ff_mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        id_tokens: jax.Array,
        src_landmark: jax.Array,
        src_text: jax.Array,
        tgt_landmark: jax.Array,
        tgt_text: jax.Array,
    ) -> jax.Array:
        b = id_tokens.shape[0]
        if id_tokens.ndim != 3 or id_tokens.shape[-1] != self.id_dim:
            raise ValueError(f"IMR: id_tokens must be (B, T, {self.id_dim}), got shape {id_tokens.shape}")
        for name, value, dim in (("src_landmark", src_landmark, self.landmark_dim), ("src_text", src_text, self.text_dim),
                                 ("tgt_landmark", tgt_landmark, self.landmark_dim), ("tgt_text", tgt_text, self.text_dim)):
            if value.shape != (b, dim):
                raise ValueError(f"IMR: {name} must be (B={b}, {dim}), got shape {value.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        fusion = MotionFusion(self.num_motion_tokens, self.width, name="feature_fusion", **kw)
        psi_src = fusion(src_landmark, src_text)
        psi_tgt = fusion(tgt_landmark, tgt_text)
        x = nn.Dense(self.width, name="proj_in", **kw)(layer_norm("norm_in")(id_tokens))
        for i in range(self.depth):
            x = IMRBlock(self.num_heads, self.head_dim, self.ff_mult, name=f"disentangle_{i}", **kw)(x, psi_src)
        for i in range(self.depth):
            x = IMRBlock(self.num_heads, self.head_dim, self.ff_mult, name=f"entangle_{i}", **kw)(x, psi_tgt)
        return nn.Dense(self.id_dim, name="proj_out", **kw)(layer_norm("norm_out")(x))
