"""Semantic-Activated Attention (SAA): DynamicID's replacement for every UNet cross-attention.

The interface the UNet relies on (fixed; see the module class below):

    SemanticActivatedAttention(num_heads, head_dim, lora_rank, config: SAAConfig,
                               dtype, param_dtype)(x, context, identity, spatial_shape)

    x        (B, N, C)   queries (N = h * w of this layer's latent grid, row-major)
    context  (B, L, Ct)  text states (77 x 768 for SD1.5)
    identity IdentityConditioning (below)
    spatial_shape (h, w) static ints
    returns  (B, N, C)

Parameters: to_q, to_k, to_v (LoRADense, no bias), to_out (LoRADense, bias), to_k_ip,
to_v_ip (LoRADense, no bias, no LoRA) -- the same names as the plain cross-attention, so SD
weights load into either.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
from flax import struct


@dataclasses.dataclass(frozen=True)
class SAAConfig:
    """Static SAA settings that belong to the model, not to one sampling call."""

    threshold: float = 0.3  # activation weights strictly below this become 0 (release rule)


@struct.dataclass
class IdentityConditioning:
    """Per-call identity inputs threaded through the UNet to every SAA layer.

    tokens:        (B, n_ids, T, D) identity tokens (T = 4 per identity by default, D = 768).
    boxes:         (B, n_ids, 4) normalised [y_min, x_min, y_max, x_max] per identity.
    layout_active: () bool, True while the 0-based step index is below alpha.
    beta:          () float, layout intensity (paper eq. 3).
    id_scale:      () float, identity scale on the identity branch.
    mix:           () float identity-mixing weight m, or None for no mixing.
    use_boxes:     static; False = no layout control and no routing (one softmax over all ids).
    gating:        static; False = plain decoupled cross-attention (activation weight 1).
    """

    tokens: jax.Array
    boxes: jax.Array
    layout_active: jax.Array
    beta: jax.Array
    id_scale: jax.Array
    mix: Optional[jax.Array] = None
    use_boxes: bool = struct.field(pytree_node=False, default=True)
    gating: bool = struct.field(pytree_node=False, default=True)
