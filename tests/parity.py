"""What the parity tests share: one error measure and the tiny reference UNet and VAE."""

import numpy as np

# SD1.5's block structure (3 CrossAttnDown + Down, Up + 3 CrossAttnUp, 2 layers per block),
# tiny; diffusers UNet2DConditionModel keyword arguments.
TINY_SD15_UNET = dict(
    sample_size=16,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=(2, 4, 4, 8),
)

# The tiny diffusers AutoencoderKL of the VAE, single-file and convert tests.
TINY_VAE = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=4,
)


# SD1.5's four levels (3 cross-attention + 1 plain) with one layer per block, tiny: every block
# of the original LDM naming (input/middle/output blocks, an upsampler after attention and one
# after a plain level), for the LoRA-file tests.
TINY_LDM_UNET = dict(sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_head_dim=2,
                     cross_attention_dim=32, norm_num_groups=8)

# configs/tiny.py's UNet and VAE (the demo model) as diffusers keyword arguments
# (attention_head_dim is the head count, diffusers' legacy name).
TINY_DEMO_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8)
TINY_DEMO_VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def rel_l2(ours, ref) -> float:
    """||ours - ref|| / ||ref|| in float64 (a zero reference gives a huge error, not a NaN)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-12))


# ----------------------------------------------------------------------------- training runs compared
#
# Two training runs that differ only in how the work is split (1 vs 8 devices, 1 vs 2 hosts,
# one batch vs accumulated micro-batches) differ only by float32 rounding, from the order in
# which sums over rows, devices and hosts are reduced. How far apart may their trained
# parameters be, and what would a real bug look like?
#
# AdamW moves every element by about lr per step whatever the size of its gradient: the update
# is lr * m / (sqrt(v) + eps), i.e. the gradient divided by its own magnitude. A gradient
# element's absolute rounding error d is fixed by the reduction (a few float32 epsilons,
# 6e-8, times the magnitude of the terms summed), so its relative error is d / |g|: large for
# the elements whose gradient is near zero, which AdamW nevertheless moves by a full ~lr.
# With gradient elements spread around zero with a density ~1/s (s: their typical size),
# elements with |g| < d may flip sign and those above contribute (d/g)^2, so a leaf's update
# has a relative L2 error of about sqrt(d / s). For d / s from 1e-8 (a few epsilons) to 1e-6
# (a pessimistic 16 epsilons from another reduction tree over devices and hosts) that is 1e-4
# to 1e-3; measured up to 1.15e-4 (the zero-initialised LoRA-up leaves after 4 steps, two
# machines). Hence UPDATE_RTOL = 1e-2: 10x above the pessimistic estimate and an order below
# the smallest bug these tests target, a learning rate 10% off (relative error 0.1 on every
# leaf's update); a wrong shard, a dropped micro-batch or a skipped step give O(1). The tests
# check both sides: the equal runs pass, a deliberately broken reference fails.
#
# Comparing updates (value - initial), not values, is what makes the check sensitive: a
# value is initial + update with |update| << |initial| for most leaves, so the value's
# relative error is the update's times |update| / |initial| and would hide a wrong update.
# Leaves whose reference update is exactly zero (zero-initialised, zero gradient) must not move.

UPDATE_RTOL = 1e-2


def update_errors(ours: dict, reference: dict, initial: dict) -> dict:
    """{path: relative L2 error of ours' update against the reference's} for flat {path: array}
    trees of trained leaves; a leaf the reference left untouched gives 0 when ours did too."""
    errors = {}
    for path, ref in reference.items():
        delta, ours_delta = ref - initial[path], ours[path] - initial[path]
        if not np.any(delta):
            errors[path] = 0.0 if not np.any(ours_delta) else float("inf")
        else:
            errors[path] = rel_l2(ours_delta, delta)
    return errors


def assert_updates_close(ours: dict, reference: dict, initial: dict, where: str) -> float:
    """Every leaf's update within UPDATE_RTOL (see above); returns the largest error."""
    errors = update_errors(ours, reference, initial)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= UPDATE_RTOL, (where, worst, errors[worst])
    return errors[worst]


def assert_updates_differ(ours: dict, reference: dict, initial: dict, where: str) -> None:
    """The check above must catch a deliberately broken reference: some leaf off by > UPDATE_RTOL."""
    errors = update_errors(ours, reference, initial)
    assert max(errors.values()) > UPDATE_RTOL, (where, "a broken reference passed the update check")
