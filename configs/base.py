"""Full-size DynamicID model on Stable Diffusion 1.5, with the paper's sampling defaults.

The model section matches the published weights (SD1.5 UNet/VAE/text encoder, CLIP ViT-H/14,
buffalo_l ArcFace 512-d, SAA.bin / IMR.bin / key_point_encoder.bin). Stage configs
(`anchor.py`, `reconfig.py`) and `tiny.py` start from this one.

Sampling with it:
  python launch/sample.py --base_model PATH_TO_SD15 --vision_encoder PATH_TO_VIT_H14 \
      --dynamicid PATH_TO_RELEASE --faces PATH_TO_BUFFALO_L --ref a.png --prompt "..."
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
    """Architecture of every module (fields mirror the module/config dataclasses)."""
    m = ml_collections.ConfigDict()
    m.unet = dict(  # UNetConfig fields (SD1.5)
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        num_attention_heads=(8, 8, 8, 8),
        cross_attention_dim=768,
        norm_num_groups=32,
        sample_size=64,
    )
    m.lora_rank = 128  # LoRA on every attn1/attn2 projection
    m.saa_threshold = 0.3  # activation weights strictly below become 0
    m.vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)  # VAEConfig
    m.text = dict(  # CLIPTextConfig (SD1.5 = OpenAI ViT-L/14 text tower)
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
        max_positions=77, activation="quick_gelu",
    )
    m.vision = dict(  # CLIPVisionConfig (OpenCLIP ViT-H/14)
        hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=16, image_size=224,
        patch_size=14, activation="gelu",
    )
    m.face_projection = dict(id_dim=512, num_tokens=4, depth=4, num_heads=12, head_dim=64)  # FaceProjection
    m.imr = dict(width=1024, num_heads=16, head_dim=64, num_motion_tokens=4, depth=1)  # IMR
    m.keypoint_encoder = dict(  # KeyPointEncoder
        image_size=96, channels=(16, 32, 64, 128, 256, 512), num_residual=(0, 2, 3, 2, 2, 1)
    )
    return m


def sampling_config() -> ml_collections.ConfigDict:
    """Paper/release defaults for one sampling call: steps, guidance, height, width, alpha
    (layout steps as an int, or a fraction of the steps as a float), beta (layout intensity),
    id_scale, negative_prompt. Defined once, as `dynamicid_jax.request.SampleRequest`'s
    defaults, so the library and the CLI agree."""
    from dynamicid_jax.request import sampling_defaults

    return ml_collections.ConfigDict(sampling_defaults())


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = model_config()
    config.sampling = sampling_config()
    config.faces = "default"  # "default" (offline YuNet/SFace) or a buffalo_l folder
    return config
