"""Stage 2 (reconfiguration): IMR and the KeyPointEncoder train on identities (a source and
T target images each), everything of stage 1 frozen; feature matching plus the latent
consistency of the base model's predictions (`losses.reconfig_loss`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax import modeling
from dynamicid_jax.data import inputs, pipeline, records
from dynamicid_jax.training import init, losses


@dataclasses.dataclass(frozen=True)
class Reconfig:
    name: ClassVar[str] = "reconfig"
    components: ClassVar[tuple[str, ...]] = ("unet", "face_projection", "imr", "keypoint_encoder")

    def role(self, path: tuple[str, ...]) -> str:
        """trainable: IMR and the keypoint encoder's params; model_state: its BatchNorm
        statistics; frozen: the whole UNet and the face projection (all of stage 1)."""
        if path[0] == "imr" or path[:2] == ("keypoint_encoder", "params"):
            return "trainable"
        return "model_state" if path[:2] == ("keypoint_encoder", "batch_stats") else "frozen"

    def initial_params(self, config, modules, rng: jax.Array) -> dict:
        """Stage 1's result (`init.stage1`); IMR and the KeyPointEncoder fresh."""
        params = init.stage1_params(config, modules)
        params["imr"] = init.fresh_component(modules, "imr", jax.random.fold_in(rng, 3))
        params["keypoint_encoder"] = init.fresh_component(modules, "keypoint_encoder", jax.random.fold_in(rng, 4))
        return params

    def feature_specs(self, modules, common: Mapping[str, Any]) -> list:
        return records.reconfig_specs(landmark_size=modules.keypoint_encoder.image_size,
                                      prompt_dim=modules.text_encoder.config.hidden_size, **common)

    def check_manifest(self, folder, manifest: Mapping[str, Any], modules) -> None:
        """Nothing beyond the features (`data.check_dataset`)."""

    def dataset(self, folder, config, specs, corrupt=None):
        return pipeline.reconfig_dataset(
            folder, global_batch_size=config.data.global_batch_size, num_targets=config.data.num_targets,
            seed=config.seed, kdef_probability=config.data.kdef_probability, min_images=config.data.min_images,
            expected_features=specs, corrupt=corrupt)

    def batch_shapes(self, spec, config) -> dict:
        """One record feature -> source_* (B, ...) and target_* (B, T, ...) ShapeDtypeStructs."""
        b, t = config.data.global_batch_size, config.data.num_targets
        return {f"source_{spec.name}": jax.ShapeDtypeStruct((b, *spec.shape), np.dtype(spec.dtype)),
                f"target_{spec.name}": jax.ShapeDtypeStruct((b, t, *spec.shape), np.dtype(spec.dtype))}

    def images_per_example(self, config) -> int:
        return config.data.num_targets

    def constants(self, config, modules, params, folder, manifest) -> dict:
        """The base model's conditioning of the fixed prompt (`config.loss.prompt`)."""
        ids = init.prompt_ids(config, modules)
        prompt = jax.jit(functools.partial(_prompt_conditioning, modules))(params, ids)
        return {"prompt": jax.tree.map(np.asarray, prompt)}

    def abstract_constants(self, modules, manifest) -> dict:
        text = modules.text_encoder.config
        ids = jax.ShapeDtypeStruct((1, text.max_positions), jnp.int32)
        params = modeling.abstract_params(modules)
        return {"prompt": jax.eval_shape(functools.partial(_prompt_conditioning, modules), params, ids)}

    def loss(self, modules, config, *, table, scaling: float):
        """-> (loss_fn(params, model_state, constants, batch, draws) -> (loss, (metrics, model_state)),
        draw_fn(rng, batch))."""
        num_timesteps = int(table.alphas_cumprod.shape[0])

        def loss_fn(params, model_state, constants, batch, draws):
            return losses.reconfig_loss(modules, params, model_state, batch, constants, draws, table=table,
                                        scaling=scaling, consistency_weight=config.loss.consistency_weight)

        return loss_fn, lambda rng, batch: losses.reconfig_draws(rng, batch, num_timesteps)


    # ----------------------------------------------------------------- what precompute writes
    # (data/precompute.py: one record per image of an identity folder)

    index_fields: ClassVar[tuple[str, ...]] = ("key", "identity", "source")  # listed in a shard's index
    text_field: ClassVar[str] = "face_prompt"  # the string feature the record's text features come from
    needs_expression_model: ClassVar[bool] = True  # a missing face prompt is generated from the face

    def input_units(self, input_dir) -> list[list]:
        """The shardable units: one identity's images each, so an identity never spans two shards."""
        return [items for _, items in inputs.find_identity_inputs(input_dir)]

    def input_problem(self, item) -> Optional[str]:
        """Nothing is known wrong before decoding (a missing face prompt is generated)."""
        return None

    def record_inputs(self, item, face, image, extractors) -> tuple[dict, dict]:
        """-> (string features, per-image arrays): the face prompt (given, or generated from
        the face) and the landmark image (S, S, 1)."""
        prompt = item.face_prompt if item.face_prompt is not None else extractors.auto_face_prompt(face, image)
        info = {"key": item.key, "identity": item.identity, "source": item.source, "face_prompt": prompt}
        return info, {"landmark_image": np.asarray(extractors.landmark_image(face, image.shape[:2]), np.float32)}

    def record_specs(self, dims, common: Mapping[str, Any], cache_text_states: bool) -> list:
        """The shards' features for the extractors' sizes `dims` (no text states: stage 2 reads
        only the pooled face-prompt feature)."""
        return records.reconfig_specs(landmark_size=dims.landmark_size, prompt_dim=dims.prompt_dim, **common)

    def null_specs(self, dims, cache_text_states: bool) -> Optional[list]:
        """None: stage 2 has no classifier-free drops."""
        return None

    def text_features(self, ids: np.ndarray, encode_text: Callable, cache_text_states: bool) -> dict:
        """The pooled text feature (B, E) of a batch's face-prompt ids (B, L);
        `encode_text(ids) -> (states, pooled)`."""
        return {"face_prompt_embedding": encode_text(ids)[1].astype(np.float32)}


def _prompt_conditioning(modules, params, ids):
    """The base model's float32 conditioning of the stage-2 prompt's ids (1, L)."""
    conditioning = modules.family.text_conditioning(modules, params, ids)[0]
    return jax.tree.map(lambda a: a.astype(jnp.float32), conditioning)
