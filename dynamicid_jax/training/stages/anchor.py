"""Stage 1 (anchoring): face projection, every LoRA and the identity projections train on
single images with the diffusion loss and the exclusive face / text / both drops
(`losses.anchor_loss`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Optional

import jax
import numpy as np

from dynamicid_jax.data import inputs, pipeline, records
from dynamicid_jax.training import data, init, losses


@dataclasses.dataclass(frozen=True)
class Anchor:
    name: ClassVar[str] = "anchor"
    # What the step reads (the rest, e.g. vae and vision_encoder, stay on disk).
    components: ClassVar[tuple[str, ...]] = ("unet", "text_encoder", "face_projection")

    def role(self, path: tuple[str, ...]) -> str:
        """trainable: the face projection, every LoRA leaf and to_k_ip/to_v_ip of the UNet;
        frozen: the rest of the UNet and the text encoder."""
        if path[0] == "face_projection":
            return "trainable"
        if path[0] == "unet" and (path[-1] in ("lora_down", "lora_up") or path[-2] in ("to_k_ip", "to_v_ip")):
            return "trainable"
        return "frozen"

    def initial_params(self, config, modules, rng: jax.Array) -> dict:
        """UNet and text encoder from the base model; LoRA fresh (an exact no-op), to_k_ip/to_v_ip
        copies of to_k/to_v; the face projection freshly initialised."""
        params = init.load_base(config, modules, ("unet", "text_encoder"))
        params["unet"] = init.anchor_unet(params["unet"], modules, jax.random.fold_in(rng, 1))
        params["face_projection"] = init.fresh_component(modules, "face_projection", jax.random.fold_in(rng, 2))
        return params

    def feature_specs(self, modules, common: Mapping[str, Any]) -> list:
        return records.anchor_specs(text_length=modules.text_encoder.config.max_positions, **common)

    def check_manifest(self, folder, manifest: Mapping[str, Any], modules) -> None:
        """Cached text states (when the shards hold them) must fit the UNet's context."""
        text = next((s for s in records.specs_from_json(manifest["features"]) if s.name == "text_states"), None)
        want = (modules.text_encoder.config.max_positions, modules.unet.config.cross_attention_dim)
        if text is not None and text.shape != want:
            raise data.DataMismatchError(f"{folder}: cached text_states {list(text.shape)} do not fit the UNet "
                                         f"context {want}")

    def dataset(self, folder, config, specs, corrupt=None):
        return pipeline.anchor_dataset(folder, global_batch_size=config.data.global_batch_size, seed=config.seed,
                                       expected_features=specs, corrupt=corrupt)

    def batch_shapes(self, spec, config) -> dict:
        """One record feature -> its ShapeDtypeStruct in a global batch (B, ...)."""
        b = config.data.global_batch_size
        return {spec.name: jax.ShapeDtypeStruct((b, *spec.shape), np.dtype(spec.dtype))}

    def images_per_example(self, config) -> int:
        return 1

    def constants(self, config, modules, params, folder, manifest) -> dict:
        """The dataset's classifier-free null inputs."""
        return {"null": data.null_features(folder, manifest)}

    def abstract_constants(self, modules, manifest) -> dict:
        null = manifest["null_features"]["features"]
        return {"null": {s.name: jax.ShapeDtypeStruct(s.shape, np.dtype(s.dtype))
                         for s in records.specs_from_json(null) if s.dtype != records.STRING}}

    def loss(self, modules, config, *, table, scaling: float):
        """-> (loss_fn(params, model_state, constants, batch, draws) -> (loss, (metrics, model_state)),
        draw_fn(rng, batch))."""
        drops = (config.loss.face_drop, config.loss.text_drop, config.loss.both_drop)
        num_timesteps = int(table.alphas_cumprod.shape[0])

        def loss_fn(params, model_state, constants, batch, draws):
            loss, metrics = losses.anchor_loss(modules, params, batch, constants, draws, table=table,
                                               scaling=scaling, drops=drops)
            return loss, (metrics, model_state)

        return loss_fn, lambda rng, batch: losses.anchor_draws(rng, batch, num_timesteps)


    # ----------------------------------------------------------------- what precompute writes
    # (data/precompute.py: one record per captioned image, plus the dataset's null inputs)

    index_fields: ClassVar[tuple[str, ...]] = ("key",)  # string features listed in a shard's index
    text_field: ClassVar[str] = "caption"  # the string feature the record's text features come from
    needs_expression_model: ClassVar[bool] = False  # captions are given, never generated

    def input_units(self, input_dir) -> list[list]:
        """The shardable units: one image each (`inputs.find_anchor_inputs`)."""
        return [[item] for item in inputs.find_anchor_inputs(input_dir)]

    def input_problem(self, item) -> Optional[str]:
        """A reject reason known before the image is decoded, or None."""
        return "missing caption" if item.caption is None else None

    def record_inputs(self, item, face, image, extractors) -> tuple[dict, dict]:
        """-> (string features, per-image arrays) of one accepted input."""
        return {"key": item.key, "caption": item.caption}, {}

    def record_specs(self, dims, common: Mapping[str, Any], cache_text_states: bool) -> list:
        """The shards' features for the extractors' sizes `dims` (`precompute.ExtractorDims`)."""
        return records.anchor_specs(text_length=dims.text_length,
                                    text_states_width=dims.text_width if cache_text_states else None, **common)

    def null_specs(self, dims, cache_text_states: bool) -> Optional[list]:
        """The once-per-dataset classifier-free null inputs (the empty caption, blank pixels)."""
        specs = [
            records.FeatureSpec("input_ids", (dims.text_length,), "int32", "tokens of the empty caption"),
            records.FeatureSpec(
                "clip_image_features", (dims.clip_tokens, dims.clip_width), "float16",
                "CLIP vision tower on all-zero (already normalised) pixels, as IP-Adapter's drop",
            ),
        ]
        if cache_text_states:
            specs.append(records.FeatureSpec("text_states", (dims.text_length, dims.text_width), "float32",
                                             "text states of the empty caption"))
        return specs

    def text_features(self, ids: np.ndarray, encode_text: Callable, cache_text_states: bool) -> dict:
        """The record's text features of a batch's caption ids (B, L): the ids themselves, and
        the text encoder's hidden states (B, L, T) when cached; `encode_text(ids) -> (states, pooled)`."""
        out = {"input_ids": ids}
        if cache_text_states:
            out["text_states"] = encode_text(ids)[0].astype(np.float32)
        return out
