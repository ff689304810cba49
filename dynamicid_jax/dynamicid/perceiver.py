"""Perceiver pieces shared by the face-encoder projection and IMR.

PerceiverAttention: latents (B, T, C) query concat(features, latents) (B, M+T, C), with a
LayerNorm on each input (`norm1` on the features, `norm2` on the latents, the release's
names) and no biases. The release scales q and k each by d**-0.25, which is the usual
overall 1/sqrt(d) of `layers.attention_logits`.

FeedForward: LayerNorm, Linear(C -> mult*C, no bias), exact GELU, Linear(mult*C -> C, no bias).
Both return the update only; callers add their residual.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynamicid_jax.models.layers import MLP, Attention, Dtype

# torch.nn.LayerNorm's default epsilon (flax's is 1e-6); the published weights expect it.
TORCH_LAYERNORM_EPS = 1e-5


def layer_norm(name: str) -> nn.LayerNorm:
    """LayerNorm with torch's epsilon; params `scale`/`bias` in float32."""
    return nn.LayerNorm(epsilon=TORCH_LAYERNORM_EPS, name=name)


class PerceiverAttention(nn.Module):
    """latents (B, T, C), features (B, M, C) -> (B, T, C) (the update, no residual).

    Params: norm1 (features), norm2 (latents), attn/{to_q,to_k,to_v,to_out}/kernel.
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array, features: jax.Array) -> jax.Array:
        features = layer_norm("norm1")(features)
        latents = layer_norm("norm2")(latents)
        context = jnp.concatenate([features, latents], axis=1)
        return Attention(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            out_features=latents.shape[-1],
            qkv_bias=False,
            out_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attn",
        )(latents, context)


class FeedForward(nn.Module):
    """x (B, T, C) -> (B, T, C): LayerNorm then a bias-free GELU MLP (the update only).

    Params: norm, mlp/fc1/kernel (C, mult*C), mlp/fc2/kernel (mult*C, C).
    """

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layer_norm("norm")(x)
        return MLP(
            hidden_features=self.mult * x.shape[-1],
            activation="gelu",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mlp",
        )(x)
