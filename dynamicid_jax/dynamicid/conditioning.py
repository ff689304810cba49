"""The SAA interface types, kept free of model imports.

`models/unet.py` imports these at module level, and `models/__init__.py` imports the UNet;
keeping them here (re-exported by `saa.py` before it imports any model code) avoids an
import cycle saa -> models.layers -> models/__init__ -> unet -> saa.
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
    layout_active: () bool, True while the 0-based step index is below alpha; or (B, 1) per row.
    beta:          () float, layout intensity (paper eq. 3); or (B, 1) per row.
    id_scale:      () float, identity scale on the identity branch; or (B, 1) per row.
    mix:           () float identity-mixing weight m, or (B, 1, 1, 1) per row, or None for no mixing.
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
