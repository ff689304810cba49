"""The DynamicID system as one bundle: every module, built from a config, and its parameters.

Data flows one way:
  reference photo -> face analysis (faces/) -> ArcFace/SFace vector + CLIP vision tokens
  -> FaceProjection -> identity tokens -> [IMR with landmark + face-prompt features]
  -> the SAA+LoRA UNet (with text states) -> DDIM loop -> VAE decode.

`build_modules(config.model)` gives the linen modules; parameters are a plain dict keyed like
`DynamicIDModules` fields, so training can freeze or shard by component:
  {"unet", "vae", "text_encoder", "vision_encoder", "face_projection", "imr",
   "keypoint_encoder"}   (keypoint_encoder holds {"params", "batch_stats"})
They come from `load_pretrained(...)` (real weights, strict) or `tiny_random_params(...)`
(tiny configs for tests and the demo only; the caller must say so to the user).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dynamicid_jax import base_models, random_init
from dynamicid_jax.dynamicid import saa_blocks
from dynamicid_jax.dynamicid.face_projection import FaceProjection
from dynamicid_jax.dynamicid.imr import IMR
from dynamicid_jax.dynamicid.keypoint_encoder import KeyPointEncoder
from dynamicid_jax.dynamicid.saa import SAAConfig, identity_conditioning
from dynamicid_jax.errors import MissingFileError
from dynamicid_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from dynamicid_jax.models.unet import UNet2DConditionModel, UNetConfig
from dynamicid_jax.models.vae import AutoencoderKL, VAEConfig
from dynamicid_jax.schedulers import SchedulerConfig

Params = dict[str, Any]
COMPONENTS = ("unet", "vae", "text_encoder", "vision_encoder", "face_projection", "imr", "keypoint_encoder")
# Components only some base models have (SDXL's second text encoder); appended after
# COMPONENTS so every other component keeps its fold_in index (and its tiny random weights).
OPTIONAL_COMPONENTS = ("text_encoder_2",)


@dataclasses.dataclass(frozen=True)
class DynamicIDModules:
    """Linen modules of the whole system (stateless; parameters live beside them), with the
    base model's family (`base_models`: its conditioning and denoiser call) and noise schedule."""

    family: Any  # a base_models family object (hashable)
    scheduler: SchedulerConfig  # the base model's noise schedule (training and sampling)
    unet: UNet2DConditionModel  # the base UNet with SAA in every attn2 and LoRA everywhere
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    vision_encoder: CLIPVisionModel
    face_projection: FaceProjection
    imr: IMR
    keypoint_encoder: KeyPointEncoder
    text_encoder_2: Optional[CLIPTextModel] = None  # SDXL's OpenCLIP bigG (None: one text encoder)

    @property
    def components(self) -> tuple[str, ...]:
        """The components these modules have: COMPONENTS, plus text_encoder_2 when built."""
        return COMPONENTS + tuple(n for n in OPTIONAL_COMPONENTS if getattr(self, n) is not None)

    @property
    def identity_branch(self) -> bool:
        """The UNet has DynamicID's SAA + LoRA (False: a plain base model, text-to-image only)."""
        return self.unet.config.saa is not None

    @property
    def id_dim(self) -> int:
        """Face-recognition embedding size the projection expects (512 ArcFace, 128 SFace)."""
        return self.face_projection.id_dim

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _tuple_fields(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def build_modules(model: ml_collections.ConfigDict, dtype=jnp.float32, vae_dtype=None,
                  identity_branch: bool = True) -> DynamicIDModules:
    """Modules from a config's `model` section (`base_models`' model_config). dtype = compute
    dtype; vae_dtype: the VAE's (None: dtype). identity_branch False: the base UNet alone
    (no SAA, no LoRA), for plain text-to-image without DynamicID weights. A `text_2` section
    (SDXL) adds `text_encoder_2`; the family object is the one `model` configures
    (`family.configured(model)`: e.g. SDXL's force_zeros_for_empty_prompt).

    A training run's config.json written before `family` and `scheduler` were model fields
    was an SD1.5 run on SD1.5's schedule: those two take the sd15 family's values."""
    family = base_models.of(model).configured(model)
    scheduler = model.get("scheduler") or family.model_config().scheduler
    blocks = tuple(model.get("saa_blocks") or ())  # a run's config.json from before the field: every attn2
    saa = SAAConfig(threshold=model.saa_threshold, blocks=blocks)
    branch = dict(lora_rank=model.lora_rank, saa=saa) if identity_branch else {}
    unet_config = UNetConfig(**_tuple_fields(model.unet.to_dict()), **branch)
    if identity_branch:
        saa_blocks.selected_names(blocks, unet_config)  # ConfigError naming a pattern that selects nothing
    text_config = CLIPTextConfig(**_tuple_fields(model.text.to_dict()))
    text_2 = model.get("text_2")
    vision_config = CLIPVisionConfig(**_tuple_fields(model.vision.to_dict()))
    # Identity tokens are as wide as the UNet's context (768 SD1.5, 2048 SDXL); IMR's motion
    # inputs, the landmark feature and the face-prompt feature, are CLIP-L's width on both
    # (the release: 768 + 768), so the keypoint encoder is the same on every family.
    width, motion = unet_config.cross_attention_dim, text_config.hidden_size
    return DynamicIDModules(
        family=family,
        scheduler=SchedulerConfig(**scheduler.to_dict()),
        unet=UNet2DConditionModel(unet_config, dtype=dtype),
        vae=AutoencoderKL(VAEConfig(**_tuple_fields(model.vae.to_dict())), dtype=vae_dtype or dtype),
        text_encoder=CLIPTextModel(text_config, dtype=dtype),
        vision_encoder=CLIPVisionModel(vision_config, dtype=dtype),
        face_projection=FaceProjection(
            clip_dim=vision_config.hidden_size, width=width, dtype=dtype, **model.face_projection.to_dict()
        ),
        imr=IMR(id_dim=width, landmark_dim=motion, text_dim=motion, dtype=dtype, **model.imr.to_dict()),
        keypoint_encoder=KeyPointEncoder(
            embedding_dim=motion, dtype=dtype, **_tuple_fields(model.keypoint_encoder.to_dict())
        ),
        text_encoder_2=None if text_2 is None else CLIPTextModel(CLIPTextConfig(**_tuple_fields(text_2.to_dict())),
                                                                  dtype=dtype),
    )


def _dummy_inputs(modules: DynamicIDModules) -> dict[str, tuple]:
    """Smallest inputs that fix every parameter shape of each module."""
    unet_cfg = modules.unet.config
    f = modules.vae_scale_factor
    width = unet_cfg.cross_attention_dim
    tokens = modules.face_projection.num_tokens
    vis = modules.vision_encoder.config
    kpe = modules.keypoint_encoder
    unet_inputs = (
        jnp.zeros((1,) + (2 ** (len(unet_cfg.block_out_channels) - 1),) * 2 + (unet_cfg.in_channels,)),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, modules.text_encoder.config.max_positions, width)),
        identity_conditioning(jnp.zeros((1, 1, tokens, width))) if modules.identity_branch else None,
    )
    if unet_cfg.addition_embed_type is not None:  # SDXL's text_time: the pooled vector and six time ids
        pooled = unet_cfg.projection_class_embeddings_input_dim - 6 * unet_cfg.addition_time_embed_dim
        unet_inputs += ({"text_embeds": jnp.zeros((1, pooled)), "time_ids": jnp.zeros((1, 6))},)
    inputs = {
        "vae": (jnp.zeros((1, f, f, 3)),),
        "text_encoder": (jnp.zeros((1, modules.text_encoder.config.max_positions), jnp.int32),),
        "vision_encoder": (jnp.zeros((1, vis.image_size, vis.image_size, vis.num_channels)),),
        "face_projection": (jnp.zeros((1, modules.id_dim)), jnp.zeros((1, vis.num_positions, vis.hidden_size))),
        "imr": (jnp.zeros((1, tokens, width)),)
        + (jnp.zeros((1, modules.imr.landmark_dim)), jnp.zeros((1, modules.imr.text_dim))) * 2,
        "keypoint_encoder": (jnp.zeros((1, kpe.image_size, kpe.image_size, kpe.in_channels)),),
        "unet": unet_inputs,
    }
    if modules.text_encoder_2 is not None:
        inputs["text_encoder_2"] = (jnp.zeros((1, modules.text_encoder_2.config.max_positions), jnp.int32),)
    return inputs


# Explicit PRNG implementation for tiny random weights: they must not depend on
# JAX_DEFAULT_PRNG_IMPL, or the demo, the precompute job and a sampler reading a tiny training
# run would each see different "same" weights.
TINY_PRNG_IMPL = "rbg"


def init_component(modules: DynamicIDModules, name: str, rng: jax.Array):
    """Random init of one component: its params tree ({"params", "batch_stats"} for the
    keypoint encoder, which carries batch-norm statistics). rng: a concrete key. From the
    initializers alone, memoised and possibly read from disk (dynamicid_jax/random_init.py)."""
    return _component_tree(name, random_init.evaluate(getattr(modules, name), rng, *_dummy_inputs(modules)[name]))


def _component_tree(name: str, variables):
    return variables if name == "keypoint_encoder" else variables["params"]


def init_random_params(modules: DynamicIDModules, rng: jax.Array, components=None) -> Params:
    """Random parameters of `components` (None: all of `modules.components`; component i from
    fold_in(rng, its index in COMPONENTS + OPTIONAL_COMPONENTS)).

    The SAA UNet's LoRA `lora_up` is zero at init (an exact no-op); the identity projections
    are random like everything else, so the identity path is live even in a random model.
    """
    order = COMPONENTS + OPTIONAL_COMPONENTS
    return {name: init_component(modules, name, jax.random.fold_in(rng, order.index(name)))
            for name in (modules.components if components is None else components)}


def tiny_random_params(modules: DynamicIDModules, seed: int = 0, components=None) -> Params:
    """THE tiny random weights (tests, demo, precompute without a base model): one seed and
    one PRNG implementation everywhere, so every consumer computes with the same model."""
    return init_random_params(modules, jax.random.key(seed, impl=TINY_PRNG_IMPL), components)


def abstract_params(modules: DynamicIDModules) -> Params:
    """Shapes of `init_random_params` without running any init (the trace the tiny init uses)."""
    rng, inputs = jax.random.key(0, impl=TINY_PRNG_IMPL), _dummy_inputs(modules)
    return {name: _component_tree(name, random_init.abstract(getattr(modules, name), rng, *inputs[name]))
            for name in modules.components}


def load_pretrained(
    modules: DynamicIDModules,
    *,
    base_model: str | os.PathLike,
    vision_encoder: str | os.PathLike,
    dynamicid: Optional[str | os.PathLike] = None,
    require_imr: bool = True,
) -> Params:
    """Real weights for every module, strictly (an error names any missing/extra key).

    base_model: SD1.5 pipeline folder, single-file checkpoint, or a converted folder.
    vision_encoder: transformers CLIP ViT-H/14 image-encoder folder.
    dynamicid: folder with the authors' SAA.bin, IMR.bin, key_point_encoder.bin (or a
      trained checkpoint exported to that layout). None: the UNet gets fresh SAA/LoRA
      parameters initialised for training (to_k_ip/to_v_ip copied from to_k/to_v).
    The modules must be built from the files (`loading` builds them from `model_from_files`).
    """
    import pathlib

    from dynamicid_jax.dynamicid import published_weights as pw
    from dynamicid_jax.models import load_vision_encoder

    params = load_base_model(modules, base_model)
    unet_base = params.pop("unet")
    _, params["vision_encoder"] = load_vision_encoder(vision_encoder)
    shapes = abstract_params(modules)
    if dynamicid is None:
        params["unet"] = pw.init_dynamicid_unet_params(
            unet_base, jax.random.PRNGKey(0), modules.unet.config.lora_rank, abstract_params=shapes["unet"]
        )
        return params
    folder = pathlib.Path(dynamicid)
    saa_file = _require_file(folder, "SAA")
    params["unet"] = pw.merge_dynamicid_unet_params(unet_base, saa_file, abstract_params=shapes["unet"])
    params["face_projection"] = pw.load_face_projection_params(saa_file, modules.face_projection)
    if pw.find_release_file(folder, "IMR") is not None or require_imr:
        params["imr"] = pw.load_imr_params(_require_file(folder, "IMR"), modules.imr)
        params["keypoint_encoder"] = pw.load_keypoint_encoder_variables(
            _require_file(folder, "key_point_encoder"), modules.keypoint_encoder
        )
    return params


def load_base_model(modules: DynamicIDModules, base_model: str | os.PathLike) -> Params:
    """The base model's own weights, strictly: {"unet" (without any DynamicID parameter),
    "vae", "text_encoder"} and "text_encoder_2" when the modules have one (SDXL)."""
    from dynamicid_jax.models import load_text_encoder, load_unet, load_vae

    params: Params = {}
    config = functools.partial(base_models.single_file_config, base_model)  # a single file carries none
    _, params["unet"] = load_unet(base_model, config=config("unet"))
    _, params["vae"] = load_vae(base_model, config=config("vae"))
    for name in ("text_encoder",) + tuple(n for n in OPTIONAL_COMPONENTS if getattr(modules, n) is not None):
        _, params[name] = load_text_encoder(base_model, component=name,
                                            config=config(name) if name == "text_encoder" else None)
    return params


def _require_file(folder, stem: str):
    from dynamicid_jax.dynamicid.published_weights import find_release_file

    path = find_release_file(folder, stem)
    if path is None:
        raise MissingFileError(f"DynamicID weights: {stem}.bin (or .safetensors) not found in {folder}")
    return path


def param_count(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
