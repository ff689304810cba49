"""Diffusers' own tiny SDXL, slimmed, written as a diffusers pipeline folder, for the SDXL tests.

The components are those of diffusers' StableDiffusionXLPipeline fast tests
(`tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py`, `get_dummy_components`):
the same constructors and arguments under the same `torch.manual_seed(0)` calls, with two
changes that keep every SDXL feature but cost less compile time (trace and XLA compile
dominate the suite on 2 cores; benchmarks/design_choices_report.md): one resnet per UNet
block instead of two (layers_per_block; the levels' 1 and 2 transformer layers kept) and 3
text-encoder layers instead of 5. The tokenizers differ too: diffusers loads both
tokenizers from the hub (`hf-internal-testing/tiny-random-clip`), which this machine cannot
reach; here both are `dynamicid_jax.tokenizer.write_tiny_vocab`'s vocabulary (544 ids < the
encoders' vocab_size 1000), loaded by transformers' CLIPTokenizer, tokenizer_2 padding with
"!" as SDXL's tokenizer_2 does (tokenizer 1 pads with <|endoftext|>).

    folder = write_tiny_sdxl(tmp_path / "tiny_sdxl")   # unet, vae, text_encoder(_2), tokenizer(_2), scheduler
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)   # the reference

Cost: about 3 s on 2 cores (torch and diffusers imports dominate); the folder is 1 MB.
"""

from __future__ import annotations

import pathlib
import tempfile

import numpy as np

# diffusers' get_dummy_components, argument for argument, but for layers_per_block (2 there)
# and num_hidden_layers (5 there).
UNET = dict(
    block_out_channels=(2, 4),
    layers_per_block=1,
    time_cond_proj_dim=None,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),  # head COUNTS (diffusers' legacy name): head size 1 at both levels
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 pooled
    cross_attention_dim=64,  # 32 + 32: both encoders' hidden states concatenated
    norm_num_groups=1,
)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                 timestep_spacing="leading")
VAE = dict(
    block_out_channels=[32, 64],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    latent_channels=4,
    sample_size=128,
)
TEXT_ENCODER = dict(
    bos_token_id=0,
    eos_token_id=2,  # legacy value: transformers pools at argmax(input_ids), the EOS (largest id)
    hidden_size=32,
    intermediate_size=37,
    layer_norm_eps=1e-05,
    num_attention_heads=4,
    num_hidden_layers=3,
    pad_token_id=1,
    vocab_size=1000,
    hidden_act="gelu",
    projection_dim=32,
)
TOKENIZER_2_PAD = "!"
# The same model widened to SDXL's conventions (head size 64, 32 GroupNorm groups), so that a
# single file's architecture can be read off its shapes without a config (launch/convert.py).
CONVENTIONAL = dict(unet=dict(block_out_channels=(64, 64), attention_head_dim=(1, 1), norm_num_groups=32,
                              cross_attention_dim=128, addition_time_embed_dim=256,
                              projection_class_embeddings_input_dim=6 * 256 + 64),
                    text=dict(hidden_size=64, num_attention_heads=1, projection_dim=64))


def tiny_sdxl_components(unet: dict | None = None, text: dict | None = None) -> dict:
    """The torch components of diffusers' tiny SDXL (see the module docstring); unet / text:
    arguments changed from diffusers' (`CONVENTIONAL`)."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    from dynamicid_jax.base_models.sd15 import TEXT_LENGTH
    from dynamicid_jax.tokenizer import write_tiny_vocab

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(UNET, **(unet or {})))
    scheduler = EulerDiscreteScheduler(**SCHEDULER)
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE)
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**dict(TEXT_ENCODER, **(text or {})))
    text_encoder = transformers.CLIPTextModel(config)
    text_encoder_2 = transformers.CLIPTextModelWithProjection(config)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_tiny_vocab(pathlib.Path(tmp) / "vocab", TEXT_LENGTH)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(vocab))
        tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(str(vocab), pad_token=TOKENIZER_2_PAD)
    return dict(unet=unet.eval(), scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(),
                tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2,
                image_encoder=None, feature_extractor=None)


def write_tiny_sdxl(folder: str | pathlib.Path, **changes) -> pathlib.Path:
    """Write diffusers' tiny SDXL pipeline folder (safetensors) with diffusers' own save_pretrained
    (changes: `tiny_sdxl_components`' arguments)."""
    from diffusers import StableDiffusionXLPipeline

    folder = pathlib.Path(folder)
    StableDiffusionXLPipeline(**tiny_sdxl_components(**changes)).save_pretrained(folder, safe_serialization=True)
    return folder


def write_tiny_sdxl_single_file(folder: str | pathlib.Path, path: str | pathlib.Path) -> pathlib.Path:
    """The tiny SDXL pipeline `folder` as one SGM-layout `.safetensors` file (what SDXL
    fine-tunes ship): UNet under `model.diffusion_model.` (label_emb = add_embedding), VAE
    under `first_stage_model.`, CLIP-L under `conditioner.embedders.0.transformer.` and bigG
    under `conditioner.embedders.1.model.` in OpenCLIP names. Written test-side by hand from the
    documented layout (`ldm_layout.py`), not by our converter. Cost: well under a second."""
    import json

    from safetensors.numpy import save_file

    from dynamicid_jax.models.torch_import import read_safetensors
    from ldm_layout import open_clip_from_transformers, unet_to_ldm, vae_to_ldm

    folder, path = pathlib.Path(folder), pathlib.Path(path)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    sgm = {}
    sgm.update(unet_to_ldm(read_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors"),
                           unet_config["layers_per_block"], ["CrossAttn" in t for t in unet_config["up_block_types"]]))
    sgm.update(vae_to_ldm(read_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors"),
                          len(vae_config["block_out_channels"])))
    clip_l = read_safetensors(folder / "text_encoder" / "model.safetensors")
    sgm.update({"conditioner.embedders.0.transformer." + k: v for k, v in clip_l.items()})
    big_g = open_clip_from_transformers(read_safetensors(folder / "text_encoder_2" / "model.safetensors"))
    sgm.update({"conditioner.embedders.1.model." + k: v for k, v in big_g.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in sgm.items()}, str(path))
    return path
