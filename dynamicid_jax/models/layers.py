"""Building blocks shared by every model: one attention, one MLP, one LoRA dense, one resnet.

Everything here is channels-last. Parameters are float32 (`param_dtype`); `dtype` is the
compute dtype (float32 or bfloat16). Softmax runs in float32 whatever the compute dtype;
use flax's own `nn.LayerNorm` / `nn.GroupNorm` (their statistics are float32 already).

PyTorch-name conventions kept on purpose so that weight import is a rename, not a puzzle:
`to_q`, `to_k`, `to_v`, `to_out` for attention projections, `kernel`/`bias` inside.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def exact_gelu(x: jax.Array) -> jax.Array:
    """torch.nn.GELU() default (erf form); jax.nn.gelu defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": exact_gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


class LoRADense(nn.Module):
    """Dense layer with an optional low-rank update: y = x W + b + scale * (x A) B.

    Params: `kernel` (in, out), `bias` (out,) when `use_bias`, and when `lora_rank > 0`
    `lora_down` (in, r) initialised N(0, 1/r) and `lora_up` (r, out) initialised to zero, so a
    fresh LoRA is an exact no-op. Keeping them beside `kernel` (not in a sub-module) lets the
    trainable/frozen split and the sharding rules match on the leaf name alone.
    """

    features: int
    use_bias: bool = True
    lora_rank: int = 0
    lora_scale: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.lora_rank > 0:
            down = self.param(
                "lora_down",
                nn.initializers.normal(stddev=1.0 / self.lora_rank),
                (in_features, self.lora_rank),
                self.param_dtype,
            )
            up = self.param("lora_up", nn.initializers.zeros, (self.lora_rank, self.features), self.param_dtype)
            y = y + self.lora_scale * jnp.dot(jnp.dot(x, down.astype(self.dtype)), up.astype(self.dtype))
        return y


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(B, N, H*D) -> (B, N, H, D)."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """(B, N, H, D) -> (B, N, H*D)."""
    b, n, h, d = x.shape
    return x.reshape(b, n, h * d)


def attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """Scaled dot products. q (B, N, H, D), k (B, M, H, D) -> (B, H, N, M) in float32."""
    scale = q.shape[-1] ** -0.5
    return jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32) * scale


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Multi-head softmax attention.

    q (B, N, H, D), k and v (B, M, H, D), mask broadcastable to (B, H, N, M) with True = keep.
    Returns (B, N, H, D) in v's dtype. Softmax in float32.
    """
    logits = attention_logits(q, k)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhnm,bmhd->bnhd", probs, v)


def attend_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, query_block: int, key_block: int) -> jax.Array:
    """`attend` without a mask, computed block by block with an online softmax.

    Same result as `attend(q, k, v)` up to float32 rounding, but never holds more than a
    (B, H, query_block, key_block) block of logits: for long sequences (the UNet's 4096-token
    self-attention at 512 px) that block stays in cache, which made it faster on CPU than
    materialising all logits (figures: benchmarks/design_choices_report.md). Sequences are zero-padded to whole blocks; padded keys are
    masked out, padded queries dropped.
    q (B, N, H, D), k and v (B, M, H, D) -> (B, N, H, D) in v's dtype.
    """
    b, n, h, d = q.shape
    m = k.shape[1]
    query_block, key_block = min(query_block, n), min(key_block, m)
    n_pad, m_pad = -n % query_block, -m % key_block
    q = jnp.pad(q * jnp.asarray(d**-0.5, q.dtype), ((0, 0), (0, n_pad), (0, 0), (0, 0)))  # scale once
    k = jnp.pad(k, ((0, 0), (0, m_pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, m_pad), (0, 0), (0, 0)))
    valid = (jnp.arange(m + m_pad) < m).reshape(-1, key_block)  # (key blocks, key_block)

    def blocks(x, size):  # (B, L, H, D) -> (L/size, B, H, size, D)
        return jnp.moveaxis(jnp.swapaxes(x, 1, 2).reshape(b, h, -1, size, d), 2, 0)

    q_blocks, k_blocks, v_blocks = blocks(q, query_block), blocks(k, key_block), blocks(v, key_block)

    def one_query_block(qi):
        def step(carry, kv):
            acc, running_max, denom = carry
            ki, vi, keep = kv
            logits = jnp.einsum("bhnd,bhmd->bhnm", qi, ki, preferred_element_type=jnp.float32)
            if m_pad:  # static: only padded sequences pay for the mask
                logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
            new_max = jnp.maximum(running_max, logits.max(-1))
            correction = jnp.exp(running_max - new_max)
            p = jnp.exp(logits - new_max[..., None])
            pv = jnp.einsum("bhnm,bhmd->bhnd", p.astype(vi.dtype), vi, preferred_element_type=jnp.float32)
            return (acc * correction[..., None] + pv, new_max, denom * correction + p.sum(-1)), None

        init = (
            jnp.zeros(qi.shape, jnp.float32),
            jnp.full(qi.shape[:-1], -jnp.inf, jnp.float32),
            jnp.zeros(qi.shape[:-1], jnp.float32),
        )
        (acc, _, denom), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, valid))
        return (acc / denom[..., None]).astype(v.dtype)

    out = jax.lax.map(one_query_block, q_blocks)  # (N/qb, B, H, qb, D)
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, n + n_pad, d)
    return jnp.swapaxes(out, 1, 2)[:, :n]


def attend_long(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
    """Unmasked attention over a long context, in the fastest exact form for the backend.

    CPU: `attend_blockwise` (blocks of `block`; faster than materialised logits there,
    benchmarks/design_choices_report.md). GPU with bfloat16/float16 operands and a head size cuDNN takes (a multiple of 8,
    at most 128): cuDNN's fused flash attention through `jax.nn.dot_product_attention`, which
    never writes the (N, M) logits to memory. Otherwise `attend`. Same math in every case
    (softmax in float32); only rounding differs.
    q (B, N, H, D), k and v (B, M, H, D) -> (B, N, H, D) in v's dtype.
    """
    backend = jax.default_backend()
    if backend == "cpu":
        return attend_blockwise(q, k, v, query_block=block, key_block=block)
    head_dim = q.shape[-1]
    if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return attend(q, k, v)


class Attention(nn.Module):
    """Multi-head attention with optional LoRA on every projection.

    Used by the UNet (self and cross), the VAE mid block (1 head), both CLIP towers, the
    perceiver resampler and IMR. `context=None` means self-attention.
    Shapes: x (B, N, C), context (B, M, Cc) -> (B, N, out_features or C).
    `key_block`: when set and no mask is given, contexts longer than it go through
    `attend_long` (blockwise on CPU, fused cuDNN attention on GPU in half precision; same
    math); None = always `attend`.
    """

    num_heads: int
    head_dim: int
    out_features: Optional[int] = None
    qkv_bias: bool = False
    out_bias: bool = True
    lora_rank: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    key_block: Optional[int] = None

    def dense(self, features: int, use_bias: bool, name: str) -> LoRADense:
        return LoRADense(
            features,
            use_bias=use_bias,
            lora_rank=self.lora_rank,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(
        self, x: jax.Array, context: Optional[jax.Array] = None, mask: Optional[jax.Array] = None
    ) -> jax.Array:
        context = x if context is None else context
        inner = self.num_heads * self.head_dim
        q = split_heads(self.dense(inner, self.qkv_bias, "to_q")(x), self.num_heads)
        k = split_heads(self.dense(inner, self.qkv_bias, "to_k")(context), self.num_heads)
        v = split_heads(self.dense(inner, self.qkv_bias, "to_v")(context), self.num_heads)
        if self.key_block is not None and mask is None and k.shape[1] > self.key_block:
            out = merge_heads(attend_long(q, k, v, self.key_block))
        else:
            out = merge_heads(attend(q, k, v, mask))
        return self.dense(self.out_features or x.shape[-1], self.out_bias, "to_out")(out)


class MLP(nn.Module):
    """Two dense layers with an activation between: (..., C) -> (..., out_features or C).

    Param names `fc1`, `fc2`. Used by CLIP, the perceiver resampler and IMR.
    """

    hidden_features: int
    out_features: Optional[int] = None
    activation: str = "gelu"
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_features = self.out_features or x.shape[-1]
        x = ACTIVATIONS[self.activation](self.dense(self.hidden_features, "fc1")(x))
        return self.dense(out_features, "fc2")(x)

    def dense(self, features: int, name: str) -> LoRADense:
        return LoRADense(
            features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )


# ----------------------------------------------------------------------------- convolutional


def group_norm(groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str,
               two_pass: bool = True) -> nn.GroupNorm:
    """nn.GroupNorm. two_pass: torch's variance E[(x - mean)^2]; the fast E[x^2] - E[x]^2
    form loses digits on offset inputs (the UNet uses two-pass, as diffusers; the VAE keeps
    the fast form its parity tests were measured with)."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=not two_pass, name=name)


def conv2d(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, stride: int = 1,
           padding: Any = None) -> nn.Conv:
    """Square nn.Conv; padding None = (kernel - 1) // 2 on every side, as torch's padding=k//2
    (for stride 2 that is not flax's "SAME", which pads the far side only)."""
    if padding is None:
        pad = (kernel - 1) // 2
        padding = ((pad, pad), (pad, pad))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=dtype, param_dtype=param_dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D ("default" time-embedding mode, or none for the VAE).

    x (B, H, W, Cin), temb (B, T) or None -> (B, H, W, out_channels). norm1 -> SiLU -> conv1
    [+ time_emb_proj(SiLU(temb))] -> norm2 -> SiLU -> conv2, plus x (through a 1x1
    conv_shortcut when Cin != out_channels). time_emb_proj exists only when temb is given.
    """

    out_channels: int
    groups: int
    eps: float
    two_pass_norm: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        def norm(name):
            return group_norm(self.groups, self.eps, name=name, two_pass=self.two_pass_norm, **kw)

        h = jax.nn.silu(norm("norm1")(x))
        h = conv2d(self.out_channels, 3, name="conv1", **kw)(h)
        if temb is not None:
            t = LoRADense(self.out_channels, name="time_emb_proj", **kw)(jax.nn.silu(temb))
            h = h + t[:, None, None, :]
        h = jax.nn.silu(norm("norm2")(h))
        h = conv2d(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv2d(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        return x + h
