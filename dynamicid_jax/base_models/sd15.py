"""Stable Diffusion 1.5, the first base-model family: every SD1.5 constant of the library.

  model_config()            the full-size architecture: SD1.5's UNet, VAE (its latent scale),
                            CLIP ViT-L/14 text tower (77 tokens, 768 wide) and noise schedule,
                            plus DynamicID's modules as the release has them
  tiny_model_config()       every module a few thousand times smaller, on a 2-level UNet
                            (tests, --demo, the tiny run)
  model_from_files(m, path) the unet / vae / text / scheduler sections read from a base
                            model's own files (a single file carries no config: SD1.5's)
  unet_config / vae_config / text_config
                            the full-size sections as the models' config dataclasses (what
                            a single file loads with: `single_file_config`)
  load_tokenizer / tokenize CLIP's one tokenizer; texts -> ids and textual-inversion tables
  text_conditioning(...)    token ids -> TextConditioning (the text states; no extras)
  negative_conditioning     the negative prompt's conditioning, as encoded (even "")
  request_extras(h, w, ...) none (time ids, SDXL's micro-conditioning, are refused)
  denoiser(...)             the UNet call (`conditioning.unet_denoiser`)

configs/ import these defaults; nothing else in the library writes an SD1.5 number.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, Mapping

import ml_collections
import numpy as np

from dynamicid_jax.base_models.conditioning import TextConditioning, unet_denoiser
from dynamicid_jax.request import DEFAULT_NEGATIVE_PROMPT

# diffusers' SD1.5 scheduler_config.json (PNDM's file; these keys define the noise schedule).
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading", clip_sample=False,
    clip_sample_range=1.0, prediction_type="epsilon", stated_spacing=None,
)
# The UNet was trained on VAE samples times this (unit-variance latents); SD1.5's vae/config.json.
# It is also diffusers' AutoencoderKL default (`scaling_factor=0.18215` in its __init__), which
# a vae/config.json without the key means, in any family: `config_fields` applies it.
VAE_SCALING_FACTOR = 0.18215
TEXT_LENGTH = 77  # CLIP's context: <|startoftext|>, 75 tokens, <|endoftext|>
# Sections `model_from_files` replaces with what the files say (the UNet's DynamicID fields,
# lora_rank and the SAA threshold, stay the config's).
FILE_SECTIONS = ("unet", "vae", "text", "scheduler")


def model_config() -> ml_collections.ConfigDict:
    """Architecture of every module at full size (fields mirror the config dataclasses)."""
    m = ml_collections.ConfigDict()
    m.family = "sd15"
    m.unet = dict(  # UNetConfig fields (the block types: UNetConfig's four-level defaults)
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, num_attention_heads=(8, 8, 8, 8),
        cross_attention_dim=768, norm_num_groups=32, sample_size=64,
    )
    m.lora_rank = 128  # LoRA on every attn1/attn2 projection
    m.saa_threshold = 0.3  # activation weights strictly below become 0
    # attn2 layers with SAA's identity branch, as diffusers-name patterns (dynamicid/saa_blocks.py,
    # e.g. ("up_blocks.0.attentions.1", "mid_block")); () = every one, as DynamicID (ablations only)
    m.saa_blocks = ()
    m.vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                 scaling_factor=VAE_SCALING_FACTOR)  # VAEConfig
    m.text = dict(  # CLIPTextConfig (OpenAI ViT-L/14 text tower)
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
        max_positions=TEXT_LENGTH, activation="quick_gelu",
    )
    m.scheduler = dict(SCHEDULER)  # SchedulerConfig: the training noise schedule and the samplers'
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


def tiny_model_config() -> ml_collections.ConfigDict:
    """Every module of SD1.5's DynamicID, sized so that 2 CPU cores compile and run it in
    seconds (tests, --demo, the tiny run); 128-d identities (the offline SFace set). SD1.5's
    VAE (factor 8, latents 8x8 at 64 px), 77 text tokens and 4 identity tokens, but a 2-level
    UNet, one cross-attention level and one plain (each block kind, both samplers): smaller
    programs than SD1.5's 4 levels, hence less trace and XLA compile time, which dominate the
    suite on 2 cores (benchmarks/design_choices_report.md). SD1.5's own level structure is
    checked against diffusers (tests/parity.py TINY_SD15_UNET)."""
    from dynamicid_jax.models.unet_config import CROSS_ATTN_DOWN, CROSS_ATTN_UP, PLAIN_DOWN, PLAIN_UP

    m = model_config()
    m.unet = dict(block_out_channels=(32, 64), layers_per_block=1, num_attention_heads=(2, 2),
                  down_block_types=(CROSS_ATTN_DOWN, PLAIN_DOWN), up_block_types=(PLAIN_UP, CROSS_ATTN_UP),
                  cross_attention_dim=32, norm_num_groups=8, sample_size=8)
    m.lora_rank = 4
    m.vae = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                 scaling_factor=VAE_SCALING_FACTOR)
    m.text = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                  max_positions=TEXT_LENGTH, activation="quick_gelu")
    m.vision = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=32, patch_size=8,
                    activation="gelu")
    m.face_projection = dict(id_dim=128, num_tokens=4, depth=2, num_heads=2, head_dim=16)
    m.imr = dict(width=64, num_heads=2, head_dim=32, num_motion_tokens=4, depth=1)
    m.keypoint_encoder = dict(image_size=96, channels=(8, 8, 16, 16, 32, 32), num_residual=(0, 1, 1, 1, 1, 1))
    return m


def config_fields(config: Any, drop: tuple[str, ...] = ()) -> dict:
    """A config dataclass read from files -> its model section's fields (every family's way in).
    A VAE whose files state no scaling_factor gets diffusers' AutoencoderKL default."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in drop}
    if "scaling_factor" in fields and fields["scaling_factor"] is None:
        fields["scaling_factor"] = VAE_SCALING_FACTOR
    return fields


def _fields(section: ml_collections.ConfigDict) -> dict:
    """A model section's fields with lists as tuples (the configs are hashable)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in section.to_dict().items()}


def unet_config():
    """SD1.5's UNet (no DynamicID parts) as a `UNetConfig`."""
    from dynamicid_jax.models.unet_config import UNetConfig

    return UNetConfig(**_fields(model_config().unet))


def vae_config():
    """SD1.5's VAE (83.7M params) as a `VAEConfig`."""
    from dynamicid_jax.models.vae import VAEConfig

    return VAEConfig(**_fields(model_config().vae))


def text_config():
    """SD1.5's text encoder (OpenAI CLIP ViT-L/14's text tower) as a `CLIPTextConfig`."""
    from dynamicid_jax.models.clip import CLIPTextConfig

    return CLIPTextConfig(**_fields(model_config().text))


@dataclasses.dataclass(frozen=True)
class SD15:
    """The family object (hashable: it is part of the jitted programs' static modules)."""

    name: ClassVar[str] = "sd15"
    # The authors' DynamicID release (SAA.bin, IMR.bin, key_point_encoder.bin) is for SD1.5.
    release_weights: ClassVar[bool] = True
    # The precompute may cache the text states (--cache_text_states): CLIP's, the whole context.
    caches_text_states: ClassVar[bool] = True
    default_negative_prompt: ClassVar[str] = DEFAULT_NEGATIVE_PROMPT  # DynamicID's release setting
    # SampleRequest fields beyond SD1.5's that `request_extras` takes (forms show only these): none.
    request_fields: ClassVar[tuple[str, ...]] = ()
    components: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder")  # the base model's weights
    tokenizer_folders: ClassVar[tuple[str, ...]] = ("tokenizer",)
    # Full-size training (configs/anchor.py, reconfig.py with no argument): float32 compute and no
    # rematerialisation; SD1.5 at 512 px fits as it is.
    training_dtype: ClassVar[str] = "float32"
    training_remat: ClassVar[bool] = False
    # Aspect-ratio buckets at the native 512 px, (height, width): multiples of 64 (what the VAE and
    # the UNet's 3 downsamplings take) of about 512^2 pixels, ratios 1:1 to 2.4:1 both ways
    # (precompute --buckets=family; `data.buckets.scaled_preset` fits them to other sizes).
    bucket_sizes: ClassVar[tuple[tuple[int, int], ...]] = (
        (512, 512), (448, 576), (576, 448), (384, 640), (640, 384), (320, 768), (768, 320))

    def configured(self, model: ml_collections.ConfigDict) -> "SD15":
        """The family object a model section configures: SD1.5 has no such setting."""
        return self

    def matches(self, base_model: str | os.PathLike) -> bool:
        """Whether the base model's files are SD1.5's: a single file by its keys; a folder
        (diffusers or converted) whose UNet has no SDXL micro-conditioning and which has no
        second text encoder."""
        return files_family(base_model) == self.name

    def model_config(self) -> ml_collections.ConfigDict:
        return model_config()

    def tiny_model_config(self) -> ml_collections.ConfigDict:
        return tiny_model_config()

    def single_file_config(self, component: str):
        """The config a single file's `component` loads with (it carries none): SD1.5's."""
        return {"unet": unet_config, "vae": vae_config, "text_encoder": text_config}[component]()

    def model_from_files(self, model: ml_collections.ConfigDict, base_model: str | os.PathLike) -> ml_collections.ConfigDict:
        """`model` with its FILE_SECTIONS read from the base model's files: a diffusers folder's
        config.json files, a converted folder's marker; a single file keeps SD1.5's sections
        (it carries no config). The files, not this module, say a fine-tune's scaling factor."""
        from dynamicid_jax.models import clip, unet, vae
        from dynamicid_jax.models.weight_sources import read_config
        from dynamicid_jax.schedulers import SchedulerConfig

        model = ml_collections.ConfigDict(model.to_dict())
        read = {
            "unet": read_config(base_model, name="unet", subfolder="unet", config_cls=unet.UNetConfig,
                                config_from_json=unet.UNetConfig.from_diffusers),
            "vae": read_config(base_model, name="vae", subfolder="vae", config_cls=vae.VAEConfig,
                               config_from_json=vae.VAEConfig.from_diffusers),
            "text": read_config(base_model, name="text_encoder", subfolder="text_encoder",
                                config_cls=clip.CLIPTextConfig, config_from_json=clip.CLIPTextConfig.from_transformers),
        }
        for section, config in read.items():
            if config is not None:
                drop = ("lora_rank", "saa", "attention_block", "remat") if section == "unet" else ()
                setattr(model, section, config_fields(config, drop))
        scheduler_file = find_scheduler_file(base_model)
        if scheduler_file is not None:
            model.scheduler = config_fields(SchedulerConfig.from_folder(scheduler_file))
        return model

    def load_tokenizer(self, base_model: str | os.PathLike, tokenizer: str | os.PathLike | None = None):
        """CLIP's tokenizer of a pipeline or converted folder (`tokenizer/`), or of `tokenizer`
        (--tokenizer: a pipeline folder or a tokenizer folder; what a single file needs)."""
        from dynamicid_jax.tokenizer import CLIPTokenizer

        return CLIPTokenizer.from_folder(_tokenizer_folder(tokenizer or base_model, "--tokenizer" if tokenizer else
                                                           "--base_model"),
                                         fallback_max_length=TEXT_LENGTH)

    def tiny_tokenizer(self):
        """THE tokenizer of the tiny random model (`tokenizer.tiny_tokenizer`)."""
        from dynamicid_jax.tokenizer import tiny_tokenizer

        return tiny_tokenizer(TEXT_LENGTH)

    def embedding_widths(self, modules) -> tuple[int, ...]:
        """What a textual-inversion file must hold: one vector width, CLIP's (768)."""
        return (modules.text_encoder.config.hidden_size,)

    def tokenize(self, tokenizer, texts, embeddings, modules):
        """Texts -> (ids (B, L) int32, textual-inversion tables (B, L - 2, D)) for `text_conditioning`."""
        from dynamicid_jax.models import textual_inversion

        config = modules.text_encoder.config
        rows = [textual_inversion.tokenize(tokenizer, t, embeddings, config.vocab_size, config.hidden_size)
                for t in texts]
        return tuple(np.stack(a) for a in zip(*rows))  # numpy: jnp.asarray would compile per shape

    def negative_conditioning(self, conditioning: TextConditioning, negative_prompt: str) -> TextConditioning:
        """The negative prompt's conditioning as the sampler uses it: SD1.5 encodes even ""."""
        return conditioning

    def text_conditioning(self, modules, params: Mapping[str, Any], input_ids, clip_skip: int = 0,
                          extra_embeddings=None):
        """Token ids (B, L) -> (TextConditioning(context (B, L, D)), pooled (B, D)): the CLIP
        states `clip_skip` layers before the last, and the pooled EOS state (IMR's face-prompt
        feature)."""
        states, pooled = modules.text_encoder.apply({"params": params["text_encoder"]}, input_ids, clip_skip,
                                                    extra_embeddings)
        return TextConditioning(context=states), pooled

    def request_extras(self, height: int, width: int, original_size=None, crops_coords_top_left=None,
                       target_size=None) -> dict:
        """Per-image extras a picture's size adds to its conditioning: none on SD1.5, whose UNet
        has no micro-conditioning; time ids given for it are an InputError."""
        if (original_size, crops_coords_top_left, target_size) != (None, None, None):
            from dynamicid_jax.request import InputError

            raise InputError("an SD1.5 base model has no micro-conditioning time ids (an SDXL setting): drop them")
        return {}

    # ---- training data: what a precomputed record holds beyond the images' features

    def text_ids_shape(self, text_length: int) -> tuple[int, ...]:
        """Shape of one caption's token ids in the shards (a `tokenize` row): (L,)."""
        return (text_length,)

    def record_specs(self) -> list:
        """The family's per-record fields of a precomputed dataset (`records.FeatureSpec`s): none."""
        return []

    def record_values(self, original_size: tuple[int, int], crop_top_left: tuple[int, int]) -> dict:
        """Values of `record_specs` for one image: its size before resizing and its crop offset."""
        return {}

    def training_extras(self, fields, target_size: tuple[int, int]) -> dict:
        """Conditioning extras of a training batch from its `record_specs` fields: none."""
        return {}

    def first_text_ids(self, ids):
        """CLIP-L's ids (B, L) of `tokenize`'s rows (IMR's face-prompt feature): the ids themselves."""
        return ids

    def denoiser(self, modules, unet_params, x_t, t, conditioning: TextConditioning, identity, capture: bool = False):
        return unet_denoiser(modules, unet_params, x_t, t, conditioning, identity, capture)


def files_family(base_model: str | os.PathLike) -> str:
    """"sd15" or "sdxl" from a base model's files, never its name: a single file by its keys
    (`single_file.detect_family`), a diffusers or converted folder by a second text encoder or
    the UNet's text_time micro-conditioning. MissingFileError when nothing is there."""
    import pathlib

    from dynamicid_jax.errors import MissingFileError
    from dynamicid_jax.models import single_file, unet
    from dynamicid_jax.models.weight_sources import read_config

    from dynamicid_jax.models import converted

    path = pathlib.Path(base_model)
    if path.is_file():
        return single_file.detect_family(path)
    if not path.is_dir():
        raise MissingFileError(f"--base_model {path}: no such file or folder")
    if converted.is_converted(path) and converted.recorded_family(path):
        return converted.recorded_family(path)
    if (path / "text_encoder_2").is_dir():
        return single_file.SDXL
    try:
        config = read_config(path, name="unet", subfolder="unet", config_cls=unet.UNetConfig,
                             config_from_json=unet.UNetConfig.from_diffusers)
    except FileNotFoundError:
        raise MissingFileError(f"--base_model {path}: no unet/config.json (not a diffusers or converted folder)") from None
    return single_file.SDXL if config.addition_embed_type == unet.TEXT_TIME else single_file.SD15


def _tokenizer_folder(source, flag: str) -> Any:
    import pathlib

    from dynamicid_jax.errors import MissingFileError
    from dynamicid_jax.tokenizer import has_vocabulary

    path = pathlib.Path(source)
    for candidate in (path / "tokenizer", path):
        if has_vocabulary(candidate):
            return candidate
    raise MissingFileError(
        f"{flag} {path}: no CLIP tokenizer (tokenizer/ with vocab.json + merges.txt or tokenizer.json): a "
        "single-file checkpoint carries none; pass --tokenizer DIR (a pipeline folder or its tokenizer/)"
    )


def find_scheduler_file(base_model) -> Any:
    import pathlib

    path = pathlib.Path(base_model)
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if candidate.is_file():
            return candidate
    return None
