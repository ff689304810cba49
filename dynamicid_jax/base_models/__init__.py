"""Base-model families behind one seam (SD1.5 and SDXL; FLUX plugs in beside them).

A family is a hashable object (it is part of the jitted programs' static modules) that says
everything depending on the base model, so that batching, the sampler loop, the trainer and
the entry points never branch on which one it is:

    model_config() / tiny_model_config()   the architecture (configs/ import these defaults)
    model_from_files(model, base_model)    the sections read from the base model's own files
    configured(model)                      the family object a model section configures
    matches(base_model)                    whether the files are this family's (`detect`)
    single_file_config(component)          the config a single file's component loads with (None: its shapes)
    load_tokenizer(base_model, folder)     the family's tokenizer(s) (folder: --tokenizer, for a single file)
    tiny_tokenizer()                       the tokenizer(s) of its tiny random model (demo, tiny runs)
    components, tokenizer_folders          the base model's weight components and tokenizer folders
    embedding_widths(modules)              the vector widths a textual-inversion file must hold,
                                           one per text encoder (SD1.5 (768,), SDXL (768, 1280))
    tokenize(tokenizer, texts, embeddings, modules) -> (ids, textual-inversion tables)
    text_conditioning(modules, params, ids, clip_skip, extra) -> (TextConditioning, pooled)
    negative_conditioning(conditioning, negative_prompt)  what the sampler conditions on
    request_extras(height, width, **time_ids)  per-picture extras of the conditioning (SDXL's
                                           time ids; a family without them refuses them)
    request_fields                         the SampleRequest fields request_extras takes (SDXL:
                                           request.TIME_ID_FIELDS; SD1.5 none): what forms show
    release_weights                        whether the authors' DynamicID release fits it
    default_negative_prompt                the negative prompt when none is given
    training_dtype, training_remat         full-size training's compute dtype and rematerialisation
    denoiser(modules, unet_params, x_t, t, conditioning, identity[, capture]) -> prediction

A config's `model.family` names its family (`get`).
"""

from __future__ import annotations

import ml_collections

from dynamicid_jax.base_models.conditioning import TextConditioning  # noqa: F401  (the seam's pytree)
from dynamicid_jax.base_models.sd15 import SD15
from dynamicid_jax.base_models.sdxl import SDXL

FAMILIES = {SD15.name: SD15(), SDXL.name: SDXL()}


def get(name: str):
    """The family called `name` (a config's `model.family`); ValueError naming the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown base-model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def detect(base_model) -> str:
    """The family name of a base model's files (diffusers folder, converted folder or single
    file), from what the files hold, never their name; MissingFileError when absent."""
    found = [name for name, family in FAMILIES.items() if family.matches(base_model)]
    if len(found) != 1:
        raise ValueError(f"{base_model}: matched {found or 'no'} base-model families; expected exactly one")
    return found[0]


def single_file_config(base_model, component: str):
    """The config `component` ("unet", "vae", "text_encoder") of a base model loads with: for a
    single file, which carries none, its family's (`detect`); None for a folder (its own
    config.json) and where the loader reads the shapes (SDXL). Pass it as the loaders' `config=`."""
    import pathlib

    if not pathlib.Path(base_model).is_file():
        return None
    return get(detect(base_model)).single_file_config(component)


def of(model: ml_collections.ConfigDict):
    """The family of a config's `model` section. A training run's config.json written before
    `family` was a model field was an SD1.5 run: such a section is sd15's (the one place that
    rule is stated)."""
    return get(model.get("family", SD15.name))


def native_size(sample_size: int | tuple[int, int], vae_factor: int) -> tuple[int, int]:
    """Pixel (height, width) a UNet of `sample_size` latents (a side, or diffusers' (h, w))
    is built for: the latents times the VAE factor (SD1.5 64 x 8, the tiny configs 8 x 8)."""
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    return height * vae_factor, width * vae_factor


def native_resolution(model: ml_collections.ConfigDict) -> int:
    """Pixel side a config's model section is built for (`native_size`). The default of the
    precompute job, the training configs and the sampling size, so shards, trainer and
    pictures agree without a flag."""
    size = model.unet.sample_size
    if not isinstance(size, int):
        raise ValueError(f"model.unet.sample_size {size!r}: a native resolution needs one square size")
    return native_size(size, 2 ** (len(model.vae.block_out_channels) - 1))[0]


def default_config(tiny: bool = False, family: str = "sd15"):
    """The library's defaults for one family: `model` (full size, or the tiny random model of
    tests and --demo), `sampling` (SampleRequest's defaults at the model's native size; the
    tiny model samples 8 steps; the family's default negative prompt) and `faces`. configs/base.py and configs/tiny.py are these."""
    from dynamicid_jax.request import sampling_defaults

    members = get(family)
    config = ml_collections.ConfigDict()
    config.model = members.tiny_model_config() if tiny else members.model_config()
    config.sampling = ml_collections.ConfigDict(sampling_defaults())
    config.sampling.height = config.sampling.width = native_resolution(config.model)
    config.sampling.negative_prompt = members.default_negative_prompt
    if tiny:  # seconds on 2 CPU cores; a layout phase of 2 of the 8 steps
        config.sampling.steps = 8
        config.sampling.alpha = 2
    config.faces = "default"  # "default" (offline YuNet/SFace) or a buffalo_l folder
    return config
