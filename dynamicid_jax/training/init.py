"""Starting parameters of a run: pretrained where the stage builds on something, fresh where new.

anchor    UNet and text encoder from the SD1.5 base model; LoRA fresh (an exact no-op),
          to_k_ip/to_v_ip copies of each layer's to_k/to_v; face projection freshly
          initialised. `init.random` (tiny configs only): a random base model instead.
reconfig  stage-1 UNet and face projection from `init.stage1` (a stage-1 workdir, or a folder
          with the release's SAA.bin plus `init.base_model`); IMR and KeyPointEncoder fresh.
          `init.random`: everything random (tests).
Every loaded tree is checked against the configured model's shapes (an error names each
difference); nothing missing is ever replaced by a random init.
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from dynamicid_jax import modeling
from dynamicid_jax.errors import ConfigError
from dynamicid_jax.training import checkpoints


def fresh_component(modules, name: str, rng: jax.Array):
    """Random init of one component (the trainable new modules)."""
    return jax.tree.map(np.asarray, modeling.init_component(modules, name, rng))


def _base_unet_tree(saa_unet_params) -> dict:
    """An SAA UNet tree without its LoRA and identity-projection leaves (the plain SD tree)."""
    flat = traverse_util.flatten_dict(saa_unet_params)
    return traverse_util.unflatten_dict({
        p: v for p, v in flat.items() if p[-1] not in ("lora_down", "lora_up") and p[-2] not in ("to_k_ip", "to_v_ip")
    })


def anchor_unet(base_unet_params, modules, rng: jax.Array):
    """SAA UNet for stage 1 from a plain SD UNet tree: LoRA fresh, to_{k,v}_ip = to_{k,v}."""
    from dynamicid_jax.dynamicid.published_weights import init_dynamicid_unet_params

    shapes = modeling.abstract_params(modules)["unet"]
    return init_dynamicid_unet_params(base_unet_params, rng, modules.unet.config.lora_rank, abstract_params=shapes)


def _check(tree, modules, name: str, source: str):
    checkpoints.check_compatible(tree, modeling.abstract_params(modules)[name], f"{source} ({name})")
    return tree


def load_base(config, modules, names):
    """The named components' pretrained trees from `config.init.base_model` (checked)."""
    from dynamicid_jax.base_models import single_file_config
    from dynamicid_jax.models import load_text_encoder, load_unet

    if not config.init.base_model:
        raise ConfigError("config.init.base_model is empty: give the SD1.5 model to start from "
                         "(or init.random=True with a tiny config)")
    out = {}
    if "unet" in names:
        out["unet"] = load_unet(config.init.base_model, config=single_file_config(config.init.base_model, "unet"))[1]
    if "text_encoder" in names:
        text = load_text_encoder(config.init.base_model,
                                 config=single_file_config(config.init.base_model, "text_encoder"))[1]
        out["text_encoder"] = _check(text, modules, "text_encoder", config.init.base_model)
    return out


def initial_params(stage, config: ml_collections.ConfigDict, modules) -> dict:
    """The starting params dict (numpy) of `stage` (a `training.stages` object): every component
    random with `init.random` (tiny configs and tests), else the stage's own sources."""
    rng = jax.random.key(config.seed)
    if config.init.random:
        params = jax.tree.map(np.asarray, modeling.init_random_params(modules, jax.random.fold_in(rng, 0)))
        params["unet"] = anchor_unet(_base_unet_tree(params["unet"]), modules, jax.random.fold_in(rng, 1))
        return params
    return stage.initial_params(config, modules, rng)


def stage1_params(config, modules) -> dict:
    """UNet and face projection (and the text encoder, for the prompt) of a finished stage 1."""
    from dynamicid_jax.dynamicid import published_weights as pw

    if not config.init.stage1:
        raise ConfigError("config.init.stage1 is empty: give a stage-1 workdir or a folder with SAA.bin")
    source = pathlib.Path(config.init.stage1)
    saa = pw.find_release_file(source, "SAA")
    if saa is None:
        trained = checkpoints.load_trained_params(source, modules)
        missing = [c for c in ("unet", "face_projection", "text_encoder") if c not in trained]
        if missing:
            raise ConfigError(f"{source}: not a stage-1 result, it lacks {missing}")
        return {c: trained[c] for c in ("unet", "face_projection", "text_encoder")}
    params = load_base(config, modules, ("unet", "text_encoder"))
    shapes = modeling.abstract_params(modules)["unet"]
    params["unet"] = pw.merge_dynamicid_unet_params(params["unet"], saa, abstract_params=shapes)
    params["face_projection"] = pw.load_face_projection_params(saa, modules.face_projection)
    return params


def prompt_ids(config, modules) -> np.ndarray:
    """Token ids (1, L) of the stage-2 fixed prompt, checked against the text encoder's vocabulary.

    Tokenizer: `init.tokenizer`, else `init.base_model`'s; a run on the tiny random base model
    (directly or through its stage-1 run) has THE tiny vocabulary, the one its shards and its
    sampler use.
    """
    from dynamicid_jax.loading import run_base  # which base a run (or its stage-1 run) started from
    from dynamicid_jax.tokenizer import CLIPTokenizer, tiny_tokenizer

    folder = config.init.tokenizer or config.init.base_model
    text = modules.text_encoder.config
    if folder:
        tokenizer = CLIPTokenizer.from_folder(folder, max_length=text.max_positions)
    elif run_base(config)[0]:
        folder = "tiny random base model's vocabulary"
        tokenizer = tiny_tokenizer(max_length=text.max_positions)
    else:
        raise ConfigError("stage reconfig needs a tokenizer for its prompt: set config.init.tokenizer "
                         "(or config.init.base_model, whose tokenizer/ is used)")
    ids = tokenizer([config.loss.prompt])
    if ids.max() >= text.vocab_size:
        raise ConfigError(f"tokenizer {folder} gives id {ids.max()} >= the text encoder's vocab_size {text.vocab_size}")
    return ids
