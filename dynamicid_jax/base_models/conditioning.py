"""What a base model conditions its denoiser on, as one pytree, and the UNet families' call.

    TextConditioning(context (..., L, D), extras {name: (..., E)})

`context` is what every cross-attention reads (SD1.5: the CLIP text states); `extras` holds a
family's further inputs (SDXL: the pooled text embedding and the six micro-conditioning time
ids; SD1.5: none). Batching stacks it, the sampler loop reshapes it and the losses pass it
through with `jax.tree.map`, so no code outside a family names an extra.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import struct


@struct.dataclass
class TextConditioning:
    """context (..., L, D) and the family's extras {name: (..., E)}, leading axes equal."""

    context: Any
    extras: dict = struct.field(default_factory=dict)


def stack(items) -> TextConditioning:
    """TextConditionings of equal shapes -> one with a new leading axis (numpy, on the host)."""
    return jax.tree.map(lambda *a: np.stack(a), *items)


def unet_denoiser(modules, unet_params, x_t, t, conditioning: TextConditioning, identity, capture: bool = False):
    """The UNet families' model call: (B, h, w, C) latents at timesteps t (B,) -> the scheduler's
    prediction (B, h, w, C) float32. Extras go to the UNet's `added_cond` (none for SD1.5).
    capture: also return the UNet's sown intermediates (the SAA activation maps)."""
    kwargs = {"added_cond": conditioning.extras} if conditioning.extras else {}
    if capture:
        return modules.unet.apply({"params": unet_params}, x_t, t, conditioning.context, identity, **kwargs,
                                  mutable=["intermediates"])
    return modules.unet.apply({"params": unet_params}, x_t, t, conditioning.context, identity, **kwargs)
