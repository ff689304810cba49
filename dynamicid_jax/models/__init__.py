"""Flax (linen) models of the SD1.5 stack and their loaders.

Loaders (each takes a path and a dtype, returns `(module, params)`):
`load_unet`, `load_vae`, `load_text_encoder`, `load_vision_encoder`.
"""

from .unet import load_unet, UNet2DConditionModel, UNetConfig  # noqa: F401
from .vae import load_vae, AutoencoderKL, VAEConfig  # noqa: F401
from .clip import (  # noqa: F401
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    clip_preprocess,
    load_text_encoder,
    load_vision_encoder,
)
