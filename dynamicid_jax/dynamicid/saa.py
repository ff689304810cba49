"""Semantic-Activated Attention (SAA): DynamicID's replacement for every UNet cross-attention.

The UNet gets it as `UNetConfig(saa=SAAConfig(...))` (the config is the factory of the attn2
modules) and passes its `conditioning` argument, an IdentityConditioning, through to every
attn2. The interface the UNet relies on (fixed; see the module class below):

    SemanticActivatedAttention(num_heads, head_dim, lora_rank, config: SAAConfig,
                               dtype, param_dtype)(x, context, identity, spatial_shape)

    x        (B, N, C)   queries (N = h * w of this layer's latent grid, row-major)
    context  (B, L, Ct)  text states (77 x 768 for SD1.5)
    identity IdentityConditioning (below)
    spatial_shape (h, w) static ints
    returns  (B, N, C)

Parameters: to_q, to_k, to_v (LoRADense, no bias), to_out (LoRADense, bias), to_k_ip,
to_v_ip (LoRADense, no bias, no LoRA) -- the same names as the plain cross-attention, so SD
weights load into either. A layer `SAAConfig.blocks` leaves out (saa_blocks.py) has no
to_k_ip/to_v_ip and computes the text branch only.

Rules this implementation fixes where the release is undefined (see the architecture note):
- Constant activation map (max == min over the queries of one image): the min-max
  normalised weight is 0 everywhere (no query stands out, so none is activated) instead of
  the release's 0/0 = NaN. Layout control still adds beta inside the boxes.
- Overlapping boxes: the union. A query covered by one or more boxes gets `w + beta` once
  (while layout is active) and may attend to the tokens of every identity whose box covers
  it; the other identities' tokens are masked. Outside every box a query attends to all
  identity tokens in one softmax (and gets `w / (beta + 1)` while layout is active).
- Empty boxes (no cell of a coarse grid inside) simply cover nothing.
- A person's region may be a mask instead of a box (`IdentityConditioning.masks`): its cells
  at each grid follow regions.mask_cells (the mask's pixel just before each cell's far
  corner, which gives a box's drawn mask the box's own cells); everything below treats a
  mask's cells as a box's (`region_cells`).
- Identity mixing multiplies the raw logits (identity 0 by m, the others by 1 - m) before
  the routing mask, so m = 0 or 1 never meets a masked -inf. For "one box, several
  identities" give every identity the same box: by the union rule all of them may be
  attended inside it.
- `gating=False` sets the activation weight to 1 everywhere (no threshold, no layout
  transform of the weight); routing still follows `use_boxes`. IP-Adapter-FaceID-Plus is
  `gating=False, use_boxes=False`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dynamicid_jax.dynamicid.regions import mask_cells
from dynamicid_jax.dynamicid.saa_blocks import carries_identity
from dynamicid_jax.models.layers import (
    Dtype,
    LoRADense,
    attend,
    attention_logits,
    merge_heads,
    split_heads,
)

__all__ = [
    "IdentityConditioning",
    "SAAConfig",
    "SemanticActivatedAttention",
    "alpha_steps",
    "default_boxes",
    "identity_conditioning",
    "layout_active",
    "region_cells",
    "validate_boxes",
]


# ----------------------------------------------------------------------------- types


@dataclasses.dataclass(frozen=True)
class SAAConfig:
    """Static SAA settings that belong to the model, not to one sampling call.

    Also what `UNetConfig.saa` holds: calling it (the UNet's `CrossAttentionFactory`
    interface) builds the `SemanticActivatedAttention` that replaces an attn2.
    """

    threshold: float = 0.3  # activation weights strictly below this become 0 (release rule)
    # saa_blocks patterns (`saa_blocks.py`): the attn2 layers that carry the identity branch;
    # () = every one (DynamicID). The others are plain cross-attentions with their LoRA.
    blocks: tuple[str, ...] = ()

    def __call__(self, **attention_kwargs) -> "SemanticActivatedAttention":
        return SemanticActivatedAttention(config=self, **attention_kwargs)


@struct.dataclass
class IdentityConditioning:
    """Per-call identity inputs threaded through the UNet to every SAA layer.

    tokens:        (B, n_ids, T, D) identity tokens (T = 4 per identity by default, D = 768).
    boxes:         (B, n_ids, 4) normalised [y_min, x_min, y_max, x_max] per identity.
    layout_active: () bool, True while the 0-based step index is below alpha; or (B, 1) per row.
    beta:          () float, layout intensity (paper eq. 3); or (B, 1) per row.
    id_scale:      () float, identity scale on the identity branch; or (B, 1) per row.
    mix:           () float identity-mixing weight m, or (B, 1, 1, 1) per row, or None for no mixing.
    masks:         (B, n_ids, H, W) bool: each person's mask on the picture's pixels
                   (regions.py), or None when every region is a box.
    mask_used:     (B, n_ids) bool: this person's region is their mask (else their box); with masks.
    use_boxes:     static; False = no layout control and no routing (one softmax over all ids).
    gating:        static; False = plain decoupled cross-attention (activation weight 1).
    """

    tokens: jax.Array
    boxes: jax.Array
    layout_active: jax.Array
    beta: jax.Array
    id_scale: jax.Array
    mix: Optional[jax.Array] = None
    masks: Optional[jax.Array] = None
    mask_used: Optional[jax.Array] = None
    use_boxes: bool = struct.field(pytree_node=False, default=True)
    gating: bool = struct.field(pytree_node=False, default=True)


# ----------------------------------------------------------------------------- host helpers


def default_boxes(n_ids: int) -> np.ndarray:
    """N equal vertical strips, left to right: (n_ids, 4) [y_min, x_min, y_max, x_max]."""
    if n_ids < 1:
        raise ValueError(f"default_boxes needs at least one identity, got n_ids={n_ids}")
    edges = np.arange(n_ids + 1, dtype=np.float64) / n_ids
    boxes = np.stack([np.zeros(n_ids), edges[:-1], np.ones(n_ids), edges[1:]], axis=-1)
    return boxes.astype(np.float32)


def validate_boxes(boxes) -> np.ndarray:
    """Check normalised boxes (..., 4) [y_min, x_min, y_max, x_max]; returns them as float32.

    Raises ValueError naming the first bad box: a coordinate outside [0, 1] or min >= max.
    """
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim < 1 or arr.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (..., 4) [y_min, x_min, y_max, x_max], got {arr.shape}")
    for index in np.ndindex(arr.shape[:-1]):
        y0, x0, y1, x1 = arr[index]
        box = [float(v) for v in arr[index]]
        if not np.all(np.isfinite(arr[index])) or min(box) < 0.0 or max(box) > 1.0:
            raise ValueError(f"box {index} = {box} has a coordinate outside [0, 1]")
        if y0 >= y1 or x0 >= x1:
            raise ValueError(f"box {index} = {box} needs y_min < y_max and x_min < x_max")
    return arr.astype(np.float32)


def alpha_steps(alpha: float | int, num_steps: int) -> int:
    """How many of the first steps have the layout boost on (the one alpha rule).

    alpha as an int is a step count (the release's form: active while step < alpha);
    as a float in (0, 1] a fraction of the steps: active for the first ceil(alpha * num_steps)
    steps. So 12 and 0.24 mean the same for 50 steps; 1 is one step, 1.0 all of them.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise TypeError(f"alpha must be an int step count or a float fraction, got {alpha!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if isinstance(alpha, (int, np.integer)):
        if alpha < 0:
            raise ValueError(f"alpha as a step count must be >= 0, got {alpha}")
        return int(alpha)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha as a fraction of the steps must be in (0, 1], got {alpha}")
    # The small tolerance keeps e.g. 0.07 * 100 = 7.000000000000001 at 7 steps.
    return math.ceil(alpha * num_steps - 1e-9)


def layout_active(step, num_steps: int, alpha: float | int) -> jax.Array:
    """Whether the layout boost is on at 0-based `step` (python int or traced scalar):
    step < `alpha_steps(alpha, num_steps)`."""
    return jnp.asarray(step) < alpha_steps(alpha, num_steps)


def identity_conditioning(
    tokens,
    boxes=None,
    *,
    layout_active: bool | jax.Array = False,
    beta: float = 0.0,
    id_scale: float = 1.0,
    mix: Optional[float] = None,
    use_boxes: bool = True,
    gating: bool = True,
) -> IdentityConditioning:
    """Build an IdentityConditioning with checked boxes.

    tokens (B, n_ids, T, D); boxes (n_ids, 4) shared by the batch, (B, n_ids, 4), or None for
    `default_boxes(n_ids)` (vertical strips).
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 4:
        raise ValueError(f"identity tokens must be (B, n_ids, T, D), got shape {tokens.shape}")
    b, n_ids = tokens.shape[:2]
    boxes = default_boxes(n_ids) if boxes is None else validate_boxes(boxes)
    if boxes.ndim == 2:
        boxes = np.broadcast_to(boxes, (b,) + boxes.shape)
    if boxes.shape != (b, n_ids, 4):
        raise ValueError(f"boxes shape {boxes.shape} does not match tokens (B={b}, n_ids={n_ids})")
    return IdentityConditioning(
        tokens=tokens,
        boxes=jnp.asarray(boxes),
        layout_active=jnp.asarray(layout_active, dtype=bool),
        beta=jnp.asarray(beta, jnp.float32),
        id_scale=jnp.asarray(id_scale, jnp.float32),
        mix=None if mix is None else jnp.asarray(mix, jnp.float32),
        use_boxes=use_boxes,
        gating=gating,
    )


# ----------------------------------------------------------------------------- traced pieces


def box_masks(boxes: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
    """Which grid cells each box covers: boxes (B, n, 4) -> (B, n, h*w) bool, row-major.

    Rows floor(y_min*h) <= r < floor(y_max*h), columns likewise (the release's int() cut);
    computed from the traced boxes so new boxes reuse the compiled graph.
    """
    h, w = spatial_shape
    boxes = boxes.astype(jnp.float32)
    y0, x0, y1, x1 = (jnp.floor(boxes[..., i] * s) for i, s in zip(range(4), (h, w, h, w)))
    rows = jnp.arange(h, dtype=jnp.float32)
    cols = jnp.arange(w, dtype=jnp.float32)
    in_rows = (rows >= y0[..., None]) & (rows < y1[..., None])  # (B, n, h)
    in_cols = (cols >= x0[..., None]) & (cols < x1[..., None])  # (B, n, w)
    inside = in_rows[..., :, None] & in_cols[..., None, :]
    return inside.reshape(inside.shape[:-2] + (h * w,))


def region_cells(identity: IdentityConditioning, spatial_shape: Sequence[int]) -> jax.Array:
    """Which grid cells each person's region covers: (B, n, h*w) bool, row-major. A box by
    `box_masks`, a mask by `regions.mask_cells` (the one rule of each); traced, so new boxes or
    masks reuse the compiled graph."""
    boxes = box_masks(identity.boxes, spatial_shape)
    if identity.masks is None:
        return boxes
    masks = mask_cells(identity.masks, spatial_shape)
    return jnp.where(identity.mask_used[..., None], masks, boxes)


def min_max_normalise(w: jax.Array) -> jax.Array:
    """(B, N) -> (B, N) in [0, 1] per row; a constant row gives 0 (not 0/0)."""
    lo = w.min(axis=-1, keepdims=True)
    span = w.max(axis=-1, keepdims=True) - lo
    safe = jnp.where(span > 0, span, 1.0)  # keeps the untaken branch (and its gradient) finite
    return jnp.where(span > 0, (w - lo) / safe, 0.0)


def layout_weight(w: jax.Array, covered: jax.Array, beta: jax.Array, active: jax.Array) -> jax.Array:
    """Paper eq. 3: inside any box w + beta, outside all boxes w / (beta + 1), while active."""
    boosted = jnp.where(covered, w + beta, w / (beta + 1.0))
    return jnp.where(active, boosted, w)


def token_routing_mask(inside: jax.Array, tokens_per_id: int) -> jax.Array:
    """Which identity tokens each query may attend to: inside (B, n, N) -> (B, N, n*T) bool.

    Covered by some boxes: the identities of those boxes (union). Covered by none: all.
    """
    covered = inside.any(axis=1)  # (B, N)
    allowed_ids = jnp.where(covered[:, None, :], inside, True)  # (B, n, N)
    allowed_tokens = jnp.repeat(allowed_ids, tokens_per_id, axis=1)  # (B, n*T, N)
    return jnp.swapaxes(allowed_tokens, 1, 2)


def mix_logits(logits: jax.Array, m: jax.Array, n_ids: int, tokens_per_id: int) -> jax.Array:
    """Identity mixing: logits (..., n*T) of identity 0 times m, of the others times 1 - m."""
    owner = jnp.arange(n_ids * tokens_per_id) // tokens_per_id
    factor = jnp.where(owner == 0, m, 1.0 - m).astype(logits.dtype)
    return logits * factor


# ----------------------------------------------------------------------------- the module


class SemanticActivatedAttention(nn.Module):
    """DynamicID's cross-attention: text attention plus a gated, routed identity branch.

    x (B, N, C) with N = h*w, context (B, L, Ct), identity tokens (B, n, T, D) -> (B, N, C).
    Sows into "intermediates": `activation_weight` (B, N) (the final w, after threshold and
    layout) and `identity_probs` (B, heads, N, n*T) (identity softmax after routing).
    """

    num_heads: int
    head_dim: int
    lora_rank: int = 0
    config: SAAConfig = SAAConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def dense(self, features: int, use_bias: bool, lora_rank: int, name: str) -> LoRADense:
        return LoRADense(
            features,
            use_bias=use_bias,
            lora_rank=lora_rank,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        identity: IdentityConditioning,
        spatial_shape: Sequence[int],
    ) -> jax.Array:
        inner = self.num_heads * self.head_dim
        q = split_heads(self.dense(inner, False, self.lora_rank, "to_q")(x), self.num_heads)
        k = split_heads(self.dense(inner, False, self.lora_rank, "to_k")(context), self.num_heads)
        v = split_heads(self.dense(inner, False, self.lora_rank, "to_v")(context), self.num_heads)
        z_text = merge_heads(attend(q, k, v))
        if not carries_identity(self.config.blocks, self.path):  # left out by saa_blocks: text only
            return self.dense(x.shape[-1], True, self.lora_rank, "to_out")(z_text)
        if identity is None:
            raise ValueError(
                "SemanticActivatedAttention needs identity conditioning (IdentityConditioning); "
                "for a text-only pass give identity tokens with id_scale=0"
            )
        b, n_queries, channels = x.shape
        h, w = spatial_shape
        if h * w != n_queries:
            raise ValueError(f"spatial_shape {tuple(spatial_shape)} has {h * w} cells, but x has {n_queries} queries")
        tokens = identity.tokens
        if tokens.ndim != 4 or tokens.shape[0] != b:
            raise ValueError(f"identity tokens must be (B={b}, n_ids, T, D), got shape {tokens.shape}")
        n_ids, tokens_per_id = tokens.shape[1], tokens.shape[2]
        if identity.boxes.shape != (b, n_ids, 4):
            raise ValueError(f"identity boxes must be (B={b}, n_ids={n_ids}, 4), got {identity.boxes.shape}")
        if identity.masks is not None and (identity.masks.ndim != 4 or identity.masks.shape[:2] != (b, n_ids)
                                           or identity.mask_used is None or identity.mask_used.shape != (b, n_ids)):
            raise ValueError(f"identity masks must be (B={b}, n_ids={n_ids}, h, w) with mask_used (B, n_ids), got "
                             f"{identity.masks.shape}")

        id_flat = tokens.reshape(b, n_ids * tokens_per_id, tokens.shape[-1])
        k_id = split_heads(self.dense(inner, False, 0, "to_k_ip")(id_flat), self.num_heads)
        v_id = split_heads(self.dense(inner, False, 0, "to_v_ip")(id_flat), self.num_heads)
        logits = attention_logits(q, k_id)  # (B, H, N, n*T) float32

        if identity.use_boxes:
            inside = region_cells(identity, (h, w))  # (B, n, N)
            covered = inside.any(axis=1)
        if identity.gating:
            weight = min_max_normalise(logits.sum(axis=(1, 3)))
            weight = jnp.where(weight < self.config.threshold, 0.0, weight)
            if identity.use_boxes:
                weight = layout_weight(
                    weight, covered, jnp.asarray(identity.beta, jnp.float32), identity.layout_active
                )
        else:
            weight = jnp.ones((b, n_queries), jnp.float32)

        if identity.mix is not None:
            logits = mix_logits(logits, jnp.asarray(identity.mix, jnp.float32), n_ids, tokens_per_id)
        if identity.use_boxes:
            allowed = token_routing_mask(inside, tokens_per_id)[:, None]  # (B, 1, N, n*T)
            logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        self.sow("intermediates", "activation_weight", weight)
        self.sow("intermediates", "identity_probs", probs)
        z_id = merge_heads(jnp.einsum("bhnm,bmhd->bnhd", probs.astype(v_id.dtype), v_id))

        gate = (jnp.asarray(identity.id_scale, jnp.float32) * weight)[..., None]
        mixed = z_text + (gate * z_id).astype(z_text.dtype)
        return self.dense(channels, True, self.lora_rank, "to_out")(mixed)
