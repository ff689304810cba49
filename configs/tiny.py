"""Tiny random DynamicID for tests and `make demo`: every module, a few thousand times smaller.

Same structure as SD1.5 (4 UNet levels, VAE factor 8, 77 text tokens, 4 identity tokens),
sized so that 2 CPU cores compile and run it in seconds. Identity embeddings are 128-d: the
offline SFace model set. Nothing here is trained: pictures are noise-like by design.

  python launch/sample.py --demo            # uses this config with random weights
"""

import ml_collections

from configs import base


def model_config() -> ml_collections.ConfigDict:
    m = base.model_config()
    m.unet = dict(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        num_attention_heads=(2, 2, 2, 2),
        cross_attention_dim=32,
        norm_num_groups=8,
        sample_size=8,
    )
    m.lora_rank = 4
    m.vae = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)
    m.text = dict(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
        max_positions=77, activation="quick_gelu",
    )
    m.vision = dict(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=32,
        patch_size=8, activation="gelu",
    )
    m.face_projection = dict(id_dim=128, num_tokens=4, depth=2, num_heads=2, head_dim=16)
    m.imr = dict(width=64, num_heads=2, head_dim=32, num_motion_tokens=4, depth=1)
    m.keypoint_encoder = dict(
        image_size=96, channels=(8, 8, 16, 16, 32, 32), num_residual=(0, 1, 1, 1, 1, 1)
    )
    return m


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model = model_config()
    config.sampling.steps = 8
    config.sampling.height = 64
    config.sampling.width = 64
    config.sampling.alpha = 2
    return config
