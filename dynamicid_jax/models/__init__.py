"""Flax (linen) models of the SD1.5 and SDXL stacks and their loaders.

Loaders (each takes a path and a dtype, returns `(module, params)`):
`load_unet`, `load_vae`, `load_text_encoder` (also SDXL's `component="text_encoder_2"`),
`load_vision_encoder`.
"""

from .unet import load_unet, UNet2DConditionModel, UNetConfig  # noqa: F401
from .vae import load_vae, AutoencoderKL, VAEConfig  # noqa: F401
from .clip import (  # noqa: F401
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    clip_preprocess,
)
from .clip_weights import load_text_encoder, load_vision_encoder  # noqa: F401
