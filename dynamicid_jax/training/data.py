"""Training inputs of each stage: which shards a model configuration can use, and their batches.

The shards' manifest must agree with the model being trained, else the run is refused with
the mismatch named: the format version and stage (`shards.load_manifest`), every feature's
shape and dtype as this model configuration implies them (`expected_features`), and the
model identities the config pins (`config.data.expected_models`, compared with the
manifest's "models" entry written by the precompute).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from dynamicid_jax.data import pipeline, records, shards
from dynamicid_jax.errors import ConfigError, UserError


class DataMismatchError(UserError, ValueError):
    """Shards made for another model configuration (the message names the difference)."""


def expected_features(stage: str, modules, config: ml_collections.ConfigDict) -> list[records.FeatureSpec]:
    """Feature specs the shards must have for `modules` at `config.data.resolution`."""
    f = modules.vae_scale_factor
    if config.data.resolution % f:
        raise ConfigError(f"data.resolution {config.data.resolution} is not a multiple of the VAE factor {f}")
    vision = modules.vision_encoder.config
    common = dict(
        latent_hw=(config.data.resolution // f,) * 2,
        latent_channels=modules.unet.config.in_channels,
        id_dim=modules.id_dim,
        clip_tokens=vision.num_positions,
        clip_width=vision.hidden_size,
    )
    if stage == "anchor":
        return records.anchor_specs(text_length=modules.text_encoder.config.max_positions, **common)
    return records.reconfig_specs(
        landmark_size=modules.keypoint_encoder.image_size, prompt_dim=modules.text_encoder.config.hidden_size, **common
    )


def _check_models(manifest: Mapping[str, Any], expected: Mapping[str, Any], folder) -> None:
    found = manifest.get("models", {})
    problems = []
    for key, want in expected.items():
        if key not in found:
            problems.append(f"{key}: not recorded (expected {want!r})")
        elif json.loads(json.dumps(found[key])) != json.loads(json.dumps(want)):
            problems.append(f"{key}: {found[key]!r}, expected {want!r}")
    if problems:
        raise DataMismatchError(f"{folder}: shards were made with other models: " + "; ".join(problems))


def check_dataset(folder, stage: str, modules, config: ml_collections.ConfigDict) -> dict:
    """Load and verify the manifest -> manifest dict; raises DataMismatchError naming mismatches."""
    specs = expected_features(stage, modules, config)
    try:
        manifest = shards.load_manifest(pathlib.Path(folder), stage, specs)
    except shards.ManifestError as e:
        raise DataMismatchError(f"{e} (the model config implies these features; shards made for another "
                                "model configuration cannot be used)") from None
    _check_models(manifest, config.data.expected_models.to_dict(), folder)
    if stage == "anchor":
        text = next((s for s in records.specs_from_json(manifest["features"]) if s.name == "text_states"), None)
        width = modules.unet.config.cross_attention_dim
        if text is not None and text.shape != (modules.text_encoder.config.max_positions, width):
            raise DataMismatchError(f"{folder}: cached text_states {list(text.shape)} do not fit the UNet "
                                    f"context ({modules.text_encoder.config.max_positions}, {width})")
    return manifest


def dataset(folder, stage: str, modules, config: ml_collections.ConfigDict, corrupt=None):
    """The stage's batched grain MapDataset (host-local batches of global_batch_size / hosts).

    corrupt: a `pipeline.CorruptRecords` to skip and count bad records (None: the first stops)."""
    specs = expected_features(stage, modules, config)
    if stage == "anchor":
        return pipeline.anchor_dataset(folder, global_batch_size=config.data.global_batch_size, seed=config.seed,
                                       expected_features=specs, corrupt=corrupt)
    return pipeline.reconfig_dataset(
        folder, global_batch_size=config.data.global_batch_size, num_targets=config.data.num_targets,
        seed=config.seed, kdef_probability=config.data.kdef_probability, min_images=config.data.min_images,
        expected_features=specs, corrupt=corrupt)


def abstract_batch(manifest: Mapping[str, Any], stage: str, config: ml_collections.ConfigDict) -> dict:
    """ShapeDtypeStructs of one global batch (the array features the pipeline yields)."""
    b = config.data.global_batch_size
    out = {}
    for spec in records.specs_from_json(manifest["features"]):
        if spec.dtype == records.STRING:
            continue
        if stage == "anchor":
            out[spec.name] = jax.ShapeDtypeStruct((b, *spec.shape), np.dtype(spec.dtype))
        else:
            t = config.data.num_targets
            out[f"source_{spec.name}"] = jax.ShapeDtypeStruct((b, *spec.shape), np.dtype(spec.dtype))
            out[f"target_{spec.name}"] = jax.ShapeDtypeStruct((b, t, *spec.shape), np.dtype(spec.dtype))
    return out


def null_features(folder, manifest: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Anchor stage: the cached classifier-free null inputs, checked against the batch features."""
    null = pipeline.load_null_features(folder)
    features = {s.name: s for s in records.specs_from_json(manifest["features"])}
    for name in ("input_ids", "clip_image_features") + (("text_states",) if "text_states" in features else ()):
        if name not in null:
            raise DataMismatchError(f"{folder}: {shards.NULL_FEATURES} lacks {name!r}")
        if tuple(null[name].shape) != features[name].shape:
            raise DataMismatchError(f"{folder}: null {name} {list(null[name].shape)} != record {list(features[name].shape)}")
    return {k: np.asarray(v) for k, v in null.items()}
