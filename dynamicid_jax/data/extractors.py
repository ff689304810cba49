"""The real feature extractors of the precompute jobs: face analysis, CLIP towers, VAE.

    extractors = build_extractors(faces="default", base_model=None, vision_encoder=None,
                                  batch_size=8, tiny_model_config=configs.tiny.model_config())

Models are loaded once; each forward is jitted once and always called with `batch_size`
rows (the job pads), so a job compiles each model once.

With no `base_model`/`vision_encoder`, a TINY RANDOM VAE, text tower, tokenizer vocabulary
and vision tower are built from `tiny_model_config` (e.g. `configs/tiny.py`) with a fixed
seed: features that exercise the pipeline but mean nothing. `models["tiny_random"]` says so
and the manifest carries it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Optional

import numpy as np

from dynamicid_jax.data.precompute import ExtractorDims, Extractors
from dynamicid_jax.errors import ConfigError

TINY_RANDOM = "tiny-random"
TINY_RANDOM_WARNING = "TINY RANDOM base model: features are meaningless; for tests and demos only"


@dataclasses.dataclass(frozen=True)
class BaseModels:
    """Loaded modules and params of the frozen models the precompute runs."""

    vae: Any
    vae_params: Any
    text_encoder: Any
    text_params: Any
    tokenizer: Any
    vision_encoder: Any
    vision_params: Any
    description: dict


def tiny_random_base_models(model_config, seed: int = 0) -> BaseModels:
    """Tiny random VAE / text tower / vision tower from a config's model section + a tiny vocab."""
    from dynamicid_jax import modeling
    from dynamicid_jax.tokenizer import tiny_tokenizer

    modules = modeling.build_modules(model_config)
    vae, text, vision = modules.vae, modules.text_encoder, modules.vision_encoder
    vae_config, text_config, vision_config = vae.config, text.config, vision.config
    tokenizer = tiny_tokenizer(text_config.max_positions)
    if len(tokenizer.vocab) > text_config.vocab_size:
        raise ValueError(f"tiny vocabulary ({len(tokenizer.vocab)}) exceeds text vocab_size {text_config.vocab_size}")
    # The same weights the demo and a sampler of a tiny training run use.
    params = modeling.tiny_random_params(modules, seed, ("vae", "text_encoder", "vision_encoder"))
    vae_params, text_params, vision_params = params["vae"], params["text_encoder"], params["vision_encoder"]
    description = {
        "base_model": TINY_RANDOM,
        "vision_encoder": TINY_RANDOM,
        "tiny_random": True,
        "warning": TINY_RANDOM_WARNING,
        "tiny_seed": seed,
        "tiny_prng_impl": modeling.TINY_PRNG_IMPL,
        "configs": {"vae": dataclasses.asdict(vae_config), "text": dataclasses.asdict(text_config),
                    "vision": dataclasses.asdict(vision_config)},
    }
    return BaseModels(vae, vae_params, text, text_params, tokenizer, vision, vision_params, description)


def load_base_models(base_model: str | pathlib.Path, vision_encoder: str | pathlib.Path) -> BaseModels:
    """SD1.5 VAE + text encoder + tokenizer from `base_model`, CLIP-H from `vision_encoder`."""
    from dynamicid_jax.base_models import single_file_config
    from dynamicid_jax.models.clip_weights import load_text_encoder, load_vision_encoder
    from dynamicid_jax.models.vae import load_vae
    from dynamicid_jax.tokenizer import CLIPTokenizer

    base_model, vision_encoder = pathlib.Path(base_model).resolve(), pathlib.Path(vision_encoder).resolve()
    vae, vae_params = load_vae(base_model, config=single_file_config(base_model, "vae"))
    text, text_params = load_text_encoder(base_model, config=single_file_config(base_model, "text_encoder"))
    tokenizer = CLIPTokenizer.from_folder(base_model, fallback_max_length=text.config.max_positions)
    vision, vision_params = load_vision_encoder(vision_encoder)
    description = {
        "base_model": str(base_model),
        "vision_encoder": str(vision_encoder),
        "tiny_random": False,
        "configs": {"vae": dataclasses.asdict(vae.config), "text": dataclasses.asdict(text.config),
                    "vision": dataclasses.asdict(vision.config)},
    }
    return BaseModels(vae, vae_params, text, text_params, tokenizer, vision, vision_params, description)


def build_extractors(
    *,
    faces: str = "default",
    base_model: Optional[str | pathlib.Path] = None,
    vision_encoder: Optional[str | pathlib.Path] = None,
    expression_model: Optional[str | pathlib.Path] = None,
    tiny_model_config=None,
    need_expression: bool = True,
) -> Extractors:
    """Load every model once and wrap it as the `Extractors` the jobs call.

    faces: "default" (offline YuNet + SFace) or a buffalo_l folder (`faces.load_face_analyzer`).
    base_model, vision_encoder: both or neither; neither -> tiny random from `tiny_model_config`.
    expression_model: the fer hdf5 for automatic face prompts (default: its cache path);
      loaded only when `need_expression` (the reconfig stage).
    """
    from dynamicid_jax.faces import load_face_analyzer

    if (base_model is None) != (vision_encoder is None):
        raise ConfigError("give both base_model and vision_encoder, or neither (tiny random models)")
    if base_model is None:
        if tiny_model_config is None:
            raise ConfigError("no base_model given: pass tiny_model_config (e.g. configs/tiny.py) for tiny random models")
        base = tiny_random_base_models(tiny_model_config)
    else:
        base = load_base_models(base_model, vision_encoder)
    analyzer = load_face_analyzer(faces)
    expression = None
    if need_expression:
        from dynamicid_jax.faces.expression import default_model_path, load_expression_classifier

        expression_model = pathlib.Path(expression_model or default_model_path()).resolve()
        expression = load_expression_classifier(expression_model)
    return make_extractors(analyzer, base, expression,
                           faces_description={"faces": faces if faces == "default" else str(pathlib.Path(faces).resolve()),
                                              "face_model_set": analyzer.name,
                                              "expression_model": str(expression_model) if expression else None})


def make_extractors(analyzer, base: BaseModels, expression=None, faces_description: Optional[dict] = None) -> Extractors:
    """Wrap loaded models as `Extractors` (jitted forwards, numpy in and out)."""
    import jax
    import jax.numpy as jnp

    from dynamicid_jax.faces.conditioning import landmark_image, source_face_prompt
    from dynamicid_jax.faces.face import NoFaceError
    from dynamicid_jax.models.clip import clip_preprocess

    vae_encode = jax.jit(lambda p, x: base.vae.apply({"params": p}, x, method=base.vae.encode))
    text_forward = jax.jit(lambda p, ids: base.text_encoder.apply({"params": p}, ids))
    # Penultimate hidden states, as IP-Adapter-FaceID-Plus feeds the resampler.
    vision_forward = jax.jit(lambda p, px: base.vision_encoder.apply({"params": p}, px)[2][-2])
    clip_size = base.vision_encoder.config.image_size

    def auto_face_prompt(face, image):
        if expression is None:
            raise ValueError("an automatic face prompt needs the expression classifier (need_expression=True)")
        probs = expression.predict(image, face)
        return source_face_prompt(max(probs, key=probs.get), face.pose)

    vision_cfg, text_cfg = base.vision_encoder.config, base.text_encoder.config
    dims = ExtractorDims(
        id_dim=analyzer.embedding_dim,
        clip_tokens=vision_cfg.num_positions,
        clip_width=vision_cfg.hidden_size,
        text_length=base.tokenizer.max_length,
        text_width=text_cfg.hidden_size,
        prompt_dim=text_cfg.hidden_size,
        latent_channels=base.vae.config.latent_channels,
        vae_downsample=base.vae.config.downsample_factor,
        clip_image_size=clip_size,
    )
    return Extractors(
        # Faces below faces.MIN_FACE_SIZE are rejected with that reason (SmallFaceError).
        largest_face=lambda image, name: analyzer.largest_face(image, name, small="reject"),
        no_face_errors=(NoFaceError,),
        landmark_image=lambda face, hw: landmark_image(face, hw)[..., None],
        auto_face_prompt=auto_face_prompt,
        tokenize=lambda texts: base.tokenizer(list(texts)),
        encode_text=lambda ids: text_forward(base.text_params, jnp.asarray(ids, jnp.int32)),
        clip_pixels=lambda image: np.asarray(clip_preprocess(image[None], clip_size)[0]),
        encode_clip_pixels=lambda px: vision_forward(base.vision_params, jnp.asarray(px, jnp.float32)),
        encode_vae=lambda px: vae_encode(base.vae_params, jnp.asarray(px, jnp.float32)),
        dims=dims,
        models={**base.description, **(faces_description or {"face_model_set": analyzer.name}),
                "dims": dataclasses.asdict(dims)},
    )
