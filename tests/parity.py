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


# configs/tiny.py's UNet and VAE (the demo model) as diffusers keyword arguments
# (attention_head_dim is the head count, diffusers' legacy name).
TINY_DEMO_UNET = dict(sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                      attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8)
TINY_DEMO_VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def rel_l2(ours, ref) -> float:
    """||ours - ref|| / ||ref|| in float64 (a zero reference gives a huge error, not a NaN)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-12))
