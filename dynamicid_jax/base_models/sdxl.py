"""Stable Diffusion XL, the second base-model family: every SDXL constant of the library.

  model_config()            SDXL base 1.0: the UNet (cross_attention_dim 2048, text_time
                            micro-conditioning), the VAE (scale 0.13025), CLIP ViT-L/14
                            (`text`) and OpenCLIP bigG (`text_2`), EulerDiscrete's schedule;
                            DynamicID's modules sized by the seam (identity tokens 2048 wide,
                            IMR's text side CLIP-L's 768)
  tiny_model_config()       diffusers' own tiny SDXL (its pipeline tests' get_dummy_components), slimmed
  model_from_files(m, path) the unet / vae / text / text_2 / scheduler sections and
                            force_zeros_for_empty_prompt from the files (a single file: shapes)
  load_tokenizer/tokenize   both tokenizers, each padding with its own pad token; textual
                            inversion from SDXL pairs (clip_l, clip_g), a table per encoder
  text_conditioning(...)    both encoders' penultimate states concatenated (B, 77, 768 + 1280),
                            extras {"text_embeds": encoder 2's projected EOS (B, 1280)}
  request_extras(h, w, ...) time_ids = original size, crop, target size: the request's, by
                            default (h, w), (0, 0), (h, w)
  negative_conditioning     zeros for an empty negative prompt (force_zeros_for_empty_prompt)
  denoiser(...)             the UNet call (`conditioning.unet_denoiser`)

The formulas are diffusers' StableDiffusionXLPipeline's (`encode_prompt`, `_get_add_time_ids`);
tests/test_sdxl_pipeline.py holds the whole loop to it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dynamicid_jax.base_models import sd15
from dynamicid_jax.base_models.conditioning import TextConditioning, unet_denoiser
from dynamicid_jax.request import TIME_ID_FIELDS

# diffusers' SDXL scheduler/scheduler_config.json (EulerDiscreteScheduler's file).
SCHEDULER = dict(sd15.SCHEDULER, stated_spacing="leading")
VAE_SCALING_FACTOR = 0.13025  # SDXL's vae/config.json (not SD1.5's 0.18215)
FORCE_ZEROS_FOR_EMPTY_PROMPT = True  # model_index.json's default in diffusers' SDXL pipeline


def unet_config():
    """Stable Diffusion XL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0 `unet/config.json`)."""
    from dynamicid_jax.models.unet_config import CROSS_ATTN_DOWN, CROSS_ATTN_UP, PLAIN_DOWN, PLAIN_UP, TEXT_TIME, UNetConfig

    return UNetConfig(
        block_out_channels=(320, 640, 1280),
        down_block_types=(PLAIN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN),
        up_block_types=(CROSS_ATTN_UP, CROSS_ATTN_UP, PLAIN_UP),
        num_attention_heads=(5, 10, 20),  # diffusers' `attention_head_dim`: head counts (head size 64)
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        use_linear_projection=True,
        sample_size=128,
        addition_embed_type=TEXT_TIME,
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 1280 pooled text + 6 time ids x 256
    )


def text_2_config():
    """OpenCLIP ViT-bigG/14's text tower as SDXL's text_encoder_2 (CLIPTextModelWithProjection)."""
    from dynamicid_jax.models.clip import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20,
                          max_positions=sd15.TEXT_LENGTH, activation="gelu", projection_dim=1280)


def model_config() -> ml_collections.ConfigDict:
    """Architecture of every module at full size (fields mirror the config dataclasses)."""
    m = sd15.model_config()  # CLIP-L, the vision tower and DynamicID's modules are SD1.5's
    m.family = "sdxl"
    m.unet = sd15.config_fields(unet_config(), ("lora_rank", "saa", "attention_block", "remat"))
    m.vae = dict(m.vae.to_dict(), scaling_factor=VAE_SCALING_FACTOR)
    m.text_2 = sd15.config_fields(text_2_config())
    m.scheduler = dict(SCHEDULER)
    m.force_zeros_for_empty_prompt = FORCE_ZEROS_FOR_EMPTY_PROMPT
    # FaceProjection, IMR and the keypoint encoder take their token width from the UNet's
    # cross_attention_dim (2048, `modeling.build_modules`); IMR's text side is CLIP-L's 768.
    return m


def tiny_model_config() -> ml_collections.ConfigDict:
    """Diffusers' tiny SDXL, slimmed (tests/sdxl_tiny.py writes its files): a 2-level UNet of
    widths (2, 4), one resnet per block (diffusers' has 2), 1 and 2 transformer layers per
    level; one 3-layer 32-wide text config for both encoders (diffusers' has 5; encoder 2 with
    a 32-wide projection), the VAE at diffusers' default scale; tiny DynamicID modules 64 wide."""
    m = sd15.tiny_model_config()
    m.family = "sdxl"
    m.unet = dict(
        block_out_channels=(2, 4), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), num_attention_heads=(2, 4), cross_attention_dim=64,
        norm_num_groups=1, sample_size=32, use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
    )
    # diffusers' AutoencoderKL defaults (its tiny SDXL VAE states no scaling_factor: 0.18215)
    m.vae = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, scaling_factor=0.18215)
    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_layers=3, num_heads=4,
                max_positions=sd15.TEXT_LENGTH, activation="gelu", eos_token_id=2)
    m.text = dict(text)
    m.text_2 = dict(text, projection_dim=32)
    m.scheduler = dict(SCHEDULER)
    m.force_zeros_for_empty_prompt = FORCE_ZEROS_FOR_EMPTY_PROMPT
    return m


@dataclasses.dataclass(frozen=True)
class SDXL:
    """The family object (hashable: part of the jitted programs' static modules).

    force_zeros_for_empty_prompt: the pipeline folder's model_index.json flag (diffusers:
    an empty negative prompt conditions on zeros, context and pooled vector alike)."""

    name: ClassVar[str] = "sdxl"
    release_weights: ClassVar[bool] = False  # no DynamicID release for SDXL (yet)
    # Cached text states would need both encoders' states and the pooled vector: not offered.
    caches_text_states: ClassVar[bool] = False
    # diffusers' SDXL pipeline: no negative prompt, which force_zeros_for_empty_prompt turns
    # into zeros (`negative_conditioning`); SD1.5's DynamicID default would defeat that rule.
    default_negative_prompt: ClassVar[str] = ""
    # The micro-conditioning time ids a request may set (`request_extras`; the app shows them).
    request_fields: ClassVar[tuple[str, ...]] = TIME_ID_FIELDS
    components: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder", "text_encoder_2")
    tokenizer_folders: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    # Full-size training (configs/*.py:sdxl): bfloat16 compute and each transformer block
    # rematerialised, for the 1024 px step's memory (benchmarks/sdxl_train_memory.md).
    training_dtype: ClassVar[str] = "bfloat16"
    training_remat: ClassVar[bool] = True
    # Aspect-ratio buckets at the native 1024 px, (height, width): the set commonly used to
    # fine-tune SDXL (multiples of 64, about 1024^2 pixels; from the SDXL report's bucket table),
    # for precompute --buckets=family (`data.buckets.scaled_preset` fits them to other sizes).
    bucket_sizes: ClassVar[tuple[tuple[int, int], ...]] = (
        (1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344), (1344, 768),
        (640, 1536), (1536, 640))
    force_zeros_for_empty_prompt: bool = FORCE_ZEROS_FOR_EMPTY_PROMPT

    def configured(self, model: ml_collections.ConfigDict) -> "SDXL":
        return dataclasses.replace(self, force_zeros_for_empty_prompt=bool(
            model.get("force_zeros_for_empty_prompt", FORCE_ZEROS_FOR_EMPTY_PROMPT)))

    def matches(self, base_model: str | os.PathLike) -> bool:
        """SDXL files: an SGM single file (by key), a folder with text_encoder_2/ or a text_time UNet."""
        return sd15.files_family(base_model) == self.name

    def model_config(self) -> ml_collections.ConfigDict:
        return model_config()

    def tiny_model_config(self) -> ml_collections.ConfigDict:
        return tiny_model_config()

    def single_file_config(self, component: str):
        """None: an SDXL single file's architecture is read off its tensors' shapes (the loaders')."""
        return None

    def model_from_files(self, model: ml_collections.ConfigDict, base_model: str | os.PathLike) -> ml_collections.ConfigDict:
        """`model` with unet / vae / text / text_2 / scheduler read from the base model's files:
        a diffusers or converted folder's configs (and model_index.json's
        force_zeros_for_empty_prompt), a single file's tensor shapes (`single_file_configs`)."""
        from dynamicid_jax.schedulers import SchedulerConfig

        model = ml_collections.ConfigDict(model.to_dict())
        path = pathlib.Path(base_model)
        sections = _single_file_sections(path) if path.is_file() else _folder_sections(path)
        for section, config in sections.items():
            if config is not None:
                drop = ("lora_rank", "saa", "attention_block", "remat") if section == "unet" else ()
                setattr(model, section, sd15.config_fields(config, drop) if dataclasses.is_dataclass(config) else config)
        scheduler_file = sd15.find_scheduler_file(path)
        if scheduler_file is not None:
            model.scheduler = sd15.config_fields(SchedulerConfig.from_folder(scheduler_file))
        index = path / "model_index.json"
        if index.is_file():
            model.force_zeros_for_empty_prompt = bool(json.loads(index.read_text()).get(
                "force_zeros_for_empty_prompt", FORCE_ZEROS_FOR_EMPTY_PROMPT))
        return model

    def load_tokenizer(self, base_model: str | os.PathLike, tokenizer: str | os.PathLike | None = None):
        """(tokenizer, tokenizer_2) of a pipeline or converted folder, or of `tokenizer`
        (--tokenizer: a folder holding tokenizer/ and tokenizer_2/, e.g. a diffusers SDXL
        pipeline folder; what a single file needs); each reads its pad token from its files."""
        from dynamicid_jax.errors import MissingFileError
        from dynamicid_jax.tokenizer import CLIPTokenizer

        path, flag = (pathlib.Path(tokenizer), "--tokenizer") if tokenizer else (pathlib.Path(base_model), "--base_model")
        for sub in self.tokenizer_folders:
            if not (path / sub).is_dir():
                raise MissingFileError(f"{flag} {path}: no {sub}/ folder (an SDXL single file carries no tokenizers: "
                                       "pass --tokenizer DIR, a folder with tokenizer/ and tokenizer_2/ such as a "
                                       "diffusers SDXL pipeline folder)")
        return tuple(CLIPTokenizer.from_folder(path, subfolder=sub, fallback_max_length=sd15.TEXT_LENGTH) for sub in self.tokenizer_folders)

    def tiny_tokenizer(self):
        """The tiny random model's pair: THE tiny vocabulary twice, tokenizer 2 padding with "!"
        as SDXL's tokenizer_2 does (tests/sdxl_tiny.py's tokenizers)."""
        from dynamicid_jax.tokenizer import tiny_tokenizer

        return tiny_tokenizer(sd15.TEXT_LENGTH), tiny_tokenizer(sd15.TEXT_LENGTH, pad_token="!")

    def embedding_widths(self, modules) -> tuple[int, ...]:
        """What a textual-inversion file must hold: an SDXL pair, clip_l as wide as
        text_encoder (768), clip_g as text_encoder_2 (1280)."""
        return (modules.text_encoder.config.hidden_size, modules.text_encoder_2.config.hidden_size)

    def tokenize(self, tokenizer, texts, embeddings, modules):
        """Texts -> (ids (B, 2, L) int32: tokenizer 1's and tokenizer 2's, tables): tables None
        without embeddings (the precompute has no text_encoder_2 to read widths from), else
        (B, L - 2, D1) for text_encoder and (B, L - 2, D2) for text_encoder_2: each tokenizer
        lays its ids out as on SD1.5 (`textual_inversion.tokenize`), the pair's clip_l vectors
        in encoder 1's table, clip_g's in encoder 2's."""
        if not embeddings:
            first, second = tokenizer
            return np.stack([first(list(texts)), second(list(texts))], axis=1).astype(np.int32), None
        from dynamicid_jax.models import textual_inversion

        ids, tables = [], []
        for encoder, (each, name) in enumerate(zip(tokenizer, ("text_encoder", "text_encoder_2"))):
            config = getattr(modules, name).config
            rows = [textual_inversion.tokenize(each, t, embeddings, config.vocab_size, config.hidden_size, encoder)
                    for t in texts]
            ids.append(np.stack([r[0] for r in rows]))
            tables.append(np.stack([r[1] for r in rows]))
        return np.stack(ids, axis=1), tuple(tables)  # numpy: jnp.asarray would compile per shape

    def text_conditioning(self, modules, params: Mapping[str, Any], input_ids, clip_skip: int = 0,
                          extra_embeddings=None):
        """ids (B, 2, L) -> (TextConditioning(context (B, L, D1 + D2), {"text_embeds": (B, P)}),
        pooled (B, D1)): each encoder's hidden state `clip_skip + 2` from the end (the
        penultimate by default; the raw state, no final LayerNorm), concatenated; the pooled
        vector encoder 2's projected EOS state; the second value CLIP-L's pooled EOS state
        (IMR's face-prompt feature, as on SD1.5). extra_embeddings: None, or `tokenize`'s
        textual-inversion tables, one per encoder."""
        extra_1, extra_2 = extra_embeddings if extra_embeddings is not None else (None, None)
        _, pooled_1, states_1 = modules.text_encoder.apply(
            {"params": params["text_encoder"]}, input_ids[:, 0], extra_embeddings=extra_1, output_hidden_states=True)
        _, pooled_2, states_2 = modules.text_encoder_2.apply(
            {"params": params["text_encoder_2"]}, input_ids[:, 1], extra_embeddings=extra_2, output_hidden_states=True)
        layer = -(clip_skip + 2)
        context = jnp.concatenate([states_1[layer], states_2[layer]], axis=-1)
        return TextConditioning(context=context, extras={"text_embeds": pooled_2}), pooled_1

    def negative_conditioning(self, conditioning: TextConditioning, negative_prompt: str) -> TextConditioning:
        """diffusers' rule: with force_zeros_for_empty_prompt, no negative prompt conditions on
        zeros (context and pooled vector), not on the encoding of ""."""
        if self.force_zeros_for_empty_prompt and negative_prompt == "":
            return jax.tree.map(np.zeros_like, conditioning)
        return conditioning

    def request_extras(self, height: int, width: int, original_size=None, crops_coords_top_left=None,
                       target_size=None) -> dict:
        """{"time_ids": (6,) float32}: original_size (default (h, w)), crops_coords_top_left
        (default (0, 0)), target_size (default (h, w)), each (y, x), in diffusers' order
        (`_get_add_time_ids`; its negative time ids are the same unless asked otherwise)."""
        ids = [*(original_size or (height, width)), *(crops_coords_top_left or (0, 0)), *(target_size or (height, width))]
        return {"time_ids": np.asarray(ids, np.float32)}

    def denoiser(self, modules, unet_params, x_t, t, conditioning: TextConditioning, identity, capture: bool = False):
        return unet_denoiser(modules, unet_params, x_t, t, conditioning, identity, capture)

    # ---- training data: the micro-conditioning each precomputed record carries

    def text_ids_shape(self, text_length: int) -> tuple[int, ...]:
        """Shape of one caption's token ids in the shards: (2, L), tokenizer 1's and tokenizer 2's."""
        return (2, text_length)

    def record_specs(self) -> list:
        """original_size and crop_top_left per record: SDXL was trained with both as time ids."""
        from dynamicid_jax.data.records import FeatureSpec

        return [FeatureSpec("original_size", (2,), "int32", "(height, width) of the image before resizing"),
                FeatureSpec("crop_top_left", (2,), "int32", "(top, left) of the crop in the resized image")]

    def record_values(self, original_size: tuple[int, int], crop_top_left: tuple[int, int]) -> dict:
        return {"original_size": np.asarray(original_size, np.int32),
                "crop_top_left": np.asarray(crop_top_left, np.int32)}

    def training_extras(self, fields, target_size: tuple[int, int]) -> dict:
        """{"time_ids": (..., 6) float32}: original size, crop (top, left) and the trained size
        (h, w) in diffusers' order (its SDXL training scripts' `compute_time_ids`); fields:
        original_size and crop_top_left (..., 2) of a batch."""
        original = fields["original_size"].astype(jnp.float32)
        target = jnp.broadcast_to(jnp.asarray(target_size, jnp.float32), original.shape)
        return {"time_ids": jnp.concatenate([original, fields["crop_top_left"].astype(jnp.float32), target], -1)}

    def first_text_ids(self, ids):
        """CLIP-L's ids (B, L) of `tokenize`'s (B, 2, L) rows (IMR's face-prompt feature is CLIP-L's)."""
        return ids[:, 0]


def _folder_sections(path: pathlib.Path) -> dict:
    """Configs of a diffusers or converted SDXL folder; MissingFileError naming a missing part."""
    from dynamicid_jax.errors import MissingFileError
    from dynamicid_jax.models import clip, unet, vae
    from dynamicid_jax.models.weight_sources import read_config

    parts = {"unet": ("unet", unet.UNetConfig, unet.UNetConfig.from_diffusers),
             "vae": ("vae", vae.VAEConfig, vae.VAEConfig.from_diffusers),
             "text": ("text_encoder", clip.CLIPTextConfig, clip.CLIPTextConfig.from_transformers),
             "text_2": ("text_encoder_2", clip.CLIPTextConfig, clip.CLIPTextConfig.from_transformers)}
    sections = {}
    for section, (name, cls, from_json) in parts.items():
        try:
            sections[section] = read_config(path, name=name, subfolder=name, config_cls=cls, config_from_json=from_json)
        except FileNotFoundError:
            raise MissingFileError(f"--base_model {path}: no {name}/config.json (an SDXL pipeline folder has "
                                   "unet, vae, text_encoder and text_encoder_2)") from None
    return sections


def _single_file_sections(path: pathlib.Path) -> dict:
    """Configs of an SGM single file, read off its tensors' shapes (it carries no config)."""
    from dynamicid_jax.models import single_file, single_file_configs as shapes

    where = str(path)
    component = lambda name: single_file.extract_component(path, name, single_file.SDXL)  # noqa: E731
    return {
        "unet": shapes.infer_unet_config(component("unet"), where),
        "vae": shapes.infer_vae_fields(component("vae"), where),
        "text": shapes.infer_text_config(component("text_encoder"), "text_encoder", where),
        "text_2": shapes.infer_text_config(component("text_encoder_2"), "text_encoder_2", where),
    }
