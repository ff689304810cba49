"""Training inputs of a stage (`training.stages`): which shards a model configuration can use,
and their batches.

The shards' manifest must agree with the model being trained, else the run is refused with
the mismatch named: the format version and stage (`shards.load_manifest`), the base-model
family, the aspect-ratio bucket set (`config.data.buckets`, or the one square bucket of
`config.data.resolution`, against the manifest's), every feature's shape and dtype as this
model configuration implies them (`expected_features`; latents of the first bucket), and the
model identities the config pins (`config.data.expected_models`, compared with the
manifest's "models" entry written by the precompute).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import ml_collections
import numpy as np

from dynamicid_jax.data import buckets, pipeline, records, shards
from dynamicid_jax.errors import ConfigError, UserError


class DataMismatchError(UserError, ValueError):
    """Shards made for another model configuration (the message names the difference)."""


def expected_features(stage, modules, config: ml_collections.ConfigDict) -> list[records.FeatureSpec]:
    """Feature specs the shards of `stage` (a `training.stages` object) must have for `modules`
    at `config.data.resolution` (with buckets: the first bucket's size; the manifest lists the
    latents of bucket 0)."""
    f = modules.vae_scale_factor
    if config.data.resolution % f:
        raise ConfigError(f"data.resolution {config.data.resolution} is not a multiple of the VAE factor {f}")
    sizes = buckets.config_sizes(config.data)
    if config.data.get("buckets", ""):  # every bucket must pass the UNet's downsamplings evenly
        buckets.check_multiple(sizes, buckets.size_multiple(config.model),
                               f"--config.data.buckets={config.data.buckets}")
    vision = modules.vision_encoder.config
    common = dict(
        latent_hw=(sizes[0][0] // f, sizes[0][1] // f),
        latent_channels=modules.unet.config.in_channels,
        id_dim=modules.id_dim,
        clip_tokens=vision.num_positions,
        clip_width=vision.hidden_size,
    )
    return stage.feature_specs(modules, common)


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


def _recorded_resolution(folder):
    """The precompute's --resolution as its manifest records it (None when unreadable or absent)."""
    try:
        return json.loads((pathlib.Path(folder) / shards.MANIFEST).read_text())["settings"]["resolution"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _recorded_family(folder) -> str | None:
    """The base-model family the manifest names (shards written before it was recorded are
    SD1.5's); None when the manifest is unreadable (load_manifest then says why)."""
    try:
        models = json.loads((pathlib.Path(folder) / shards.MANIFEST).read_text()).get("models", {})
    except (OSError, ValueError, AttributeError):
        return None
    return models.get("family", "sd15") if isinstance(models, dict) else None


def _recorded_buckets(folder):
    """The bucket set the manifest records (`buckets.manifest_sizes`); None when unreadable."""
    try:
        return buckets.manifest_sizes(json.loads((pathlib.Path(folder) / shards.MANIFEST).read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_buckets(folder, config: ml_collections.ConfigDict) -> None:
    """The config's bucket set must be the shards': DataMismatchError naming both. (Square
    shards at another resolution than a bucketless config: `check_dataset`'s resolution hint.)"""
    made, want = _recorded_buckets(folder), buckets.config_sizes(config.data)
    square = len(made or ()) == 1 and made[0][0] == made[0][1]
    if made is None or made == want or (square and not config.data.get("buckets", "")):
        return
    raise DataMismatchError(f"{folder}: shards made with buckets {buckets.format_sizes(made)}, the config trains "
                            f"buckets {buckets.format_sizes(want)} (pass --config.data.buckets="
                            f"{buckets.format_sizes(made)} or precompute with --buckets={buckets.format_sizes(want)})")


def check_dataset(folder, stage, modules, config: ml_collections.ConfigDict) -> dict:
    """Load and verify the manifest -> manifest dict; raises DataMismatchError naming mismatches."""
    family = _recorded_family(folder)
    if family is not None and family != modules.family.name:  # before the features, which differ all over
        raise DataMismatchError(f"{folder}: shards of the {family} base-model family; this run trains "
                                f"{modules.family.name} (precompute with a {modules.family.name} base model, or "
                                f"train a {family} config)")
    check_buckets(folder, config)  # before the features: other buckets mean other latent sizes
    specs = expected_features(stage, modules, config)
    try:
        manifest = shards.load_manifest(pathlib.Path(folder), stage.name, specs)
    except shards.ManifestError as e:
        made_at = _recorded_resolution(folder)
        hint = ""
        if made_at is not None and made_at != config.data.resolution:
            hint = (f"; the shards were made at {made_at} px, the config trains at {config.data.resolution} px: "
                    f"precompute with --resolution={config.data.resolution} or pass "
                    f"--config.data.resolution={made_at}")
        raise DataMismatchError(f"{e} (the model config implies these features; shards made for another "
                                f"model configuration cannot be used){hint}") from None
    _check_models(manifest, config.data.expected_models.to_dict(), folder)
    stage.check_manifest(folder, manifest, modules)
    return manifest


def dataset(folder, stage, modules, config: ml_collections.ConfigDict, corrupt=None):
    """The stage's batched grain MapDataset (host-local batches of global_batch_size / hosts).

    corrupt: a `pipeline.CorruptRecords` to skip and count bad records (None: the first stops)."""
    return stage.dataset(folder, config, expected_features(stage, modules, config), corrupt)


def abstract_batch(manifest: Mapping[str, Any], stage, config: ml_collections.ConfigDict, bucket: int = 0) -> dict:
    """ShapeDtypeStructs of one global batch of bucket `bucket` (the array features the
    pipeline yields; latents of that bucket's size)."""
    out = {}
    for spec in pipeline.bucket_feature_specs(manifest, keep_strings=False)[bucket]:
        out.update(stage.batch_shapes(spec, config))
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
