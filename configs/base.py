"""Full-size DynamicID model on Stable Diffusion 1.5, with the paper's sampling defaults.

The model section matches the published weights (SD1.5 UNet/VAE/text encoder, CLIP ViT-H/14,
buffalo_l ArcFace 512-d, SAA.bin / IMR.bin / key_point_encoder.bin). Stage configs
(`anchor.py`, `reconfig.py`) and `tiny.py` start from this one. The values are the library's
(`dynamicid_jax.base_models`: the family's architecture, `SampleRequest`'s defaults), so a
library caller and a command-line user get the same model and the same picture.

Sampling with it:
  python launch/sample.py --base_model PATH_TO_SD15 --vision_encoder PATH_TO_VIT_H14 \
      --dynamicid PATH_TO_RELEASE --faces PATH_TO_BUFFALO_L --ref a.png --prompt "..."
"""

import ml_collections

from dynamicid_jax import base_models


def model_config() -> ml_collections.ConfigDict:
    """Architecture of every module (fields mirror the module/config dataclasses)."""
    return get_config().model


def get_config() -> ml_collections.ConfigDict:
    return base_models.default_config(tiny=False)
