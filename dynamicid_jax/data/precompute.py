"""The precompute jobs: raw images -> features -> TFRecord shards (+ manifest, rejects).

    run_precompute(job, extractors) -> summary dict

Inputs are listed and sorted (`inputs.py`), cut into `num_shards` contiguous slices (anchor:
of images; reconfig: of identity folders, so an identity never spans two shards), and shard
i is written by process `i % process_count`. Each shard is written atomically
(`shards.AtomicShardWriter`); a rerun skips finished shards, so a crashed run resumed ends
with exactly the records of an uninterrupted one. When every shard exists, whichever process
notices first merges the manifest (`shards.finalize_dataset`; concurrent finishers write
identical bytes); `finalize_only=True` does just that merge.

Every input either becomes a record or a line in rejects.jsonl with its reason (corrupt
image, no face, missing caption): nothing is ever written as zeros.

Model calls are batched in fixed-size batches (the last one padded by repeating its final row
and the padding dropped), so a jitted model compiles once per job (once per bucket).

Aspect-ratio buckets (`job.buckets`, `buckets.py`): each photo is cropped to the bucket
nearest its aspect ratio; its record carries the bucket's index (`bucket`) and latents of the
bucket's size, its shard index lists it, and the manifest lists the sizes and the records per
bucket. Images wait for the VAE in one batch per bucket. Without buckets (the default) every
photo gets the square crop at `resolution` and the shards are what they always were.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np

from dynamicid_jax.data import buckets, inputs, records, shards
from dynamicid_jax.errors import ConfigError, StorageError, UserError
from dynamicid_jax.training import stages


@dataclasses.dataclass(frozen=True)
class ExtractorDims:
    """Output sizes of the extractors; they fix the feature specs of the shards."""

    id_dim: int  # face embedding D (512 ArcFace, 128 SFace)
    clip_tokens: int  # vision tokens N (257 for ViT-H/14 at 224)
    clip_width: int  # vision width W (1280)
    text_length: int  # token ids per caption L (77)
    text_width: int  # text hidden width T (768)
    prompt_dim: int  # pooled text feature E (768)
    latent_channels: int  # VAE latent channels C (4)
    vae_downsample: int  # VAE spatial factor f (8)
    clip_image_size: int  # side P of the CLIP-preprocessed image (224)
    landmark_size: int = 96
    text_ids_shape: tuple[int, ...] = ()  # one caption's token ids; () = (text_length,) (SDXL: (2, L))


@dataclasses.dataclass(frozen=True)
class Extractors:
    """What the jobs compute, as callables: the real models (`extractors.build_extractors`) or
    small stand-ins in tests. Batch callables always get exactly the job's batch size of rows.

    largest_face(image_rgb uint8 (H, W, 3), source_name) -> face with `.embedding` (D,);
        raises one of `no_face_errors` when there is no face.
    landmark_image(face, (H, W)) -> (S, S, 1) float32 in [-1, 1].
    auto_face_prompt(face, image_rgb) -> str, the automatic face prompt of a source image.
    tokenize(texts) -> (B, L) int32 token ids.
    encode_text(ids (B, L)) -> (hidden states (B, L, T), pooled (B, E)) float32.
    clip_pixels(image_rgb) -> (P, P, 3) float32, the CLIP-preprocessed image.
    encode_clip_pixels(pixels (B, P, P, 3)) -> (B, N, W) float32 penultimate hidden states.
    encode_vae(pixels (B, R, R, 3) in [-1, 1]) -> (mean, logvar), each (B, R/f, R/f, C) float32.
    models: JSON description of the models (goes into the manifest).
    record_specs: the base-model family's own per-record fields (`family.record_specs()`;
        SDXL: original_size, crop_top_left), and
    record_values(original (H, W), crop (top, left)) -> their values for one image.
    """

    largest_face: Callable[[np.ndarray, str], Any]
    no_face_errors: tuple[type[BaseException], ...]
    landmark_image: Callable[[Any, tuple[int, int]], np.ndarray]
    auto_face_prompt: Callable[[Any, np.ndarray], str]
    tokenize: Callable[[Sequence[str]], np.ndarray]
    encode_text: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    clip_pixels: Callable[[np.ndarray], np.ndarray]
    encode_clip_pixels: Callable[[np.ndarray], np.ndarray]
    encode_vae: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    dims: ExtractorDims
    models: dict
    record_specs: tuple = ()
    record_values: Optional[Callable[[tuple[int, int], tuple[int, int]], dict]] = None


@dataclasses.dataclass(frozen=True)
class PrecomputeJob:
    stage: str  # a training stage's name (`training.stages.STAGES`); it says what a record holds
    input_dir: pathlib.Path
    output_dir: pathlib.Path
    num_shards: Optional[int] = None  # None: about `records_per_shard` inputs per shard
    # VAE input side (square center crop): the base model's native size (`base_models.native_resolution`)
    # is what the training configs expect; always given, the job knows no base model.
    resolution: Optional[int] = None
    batch_size: int = 8  # fixed model batch (last one padded)
    cache_text_states: bool = False  # anchor: also store CLIP text hidden states
    process_index: int = 0
    process_count: int = 1
    max_shards: Optional[int] = None  # stop after this many shards in this run (incremental runs)
    records_per_shard: int = 256
    progress: bool = True
    # Aspect-ratio buckets ((height, width), ...; `buckets.parse`); None: one square bucket at
    # `resolution` (no bucket feature: the shards of a job without buckets).
    buckets: Optional[tuple[tuple[int, int], ...]] = None

    def __post_init__(self):
        if self.stage not in stages.STAGES:
            raise ConfigError(f"stage must be one of {tuple(stages.STAGES)}, got {self.stage!r}")
        if self.resolution is None:
            raise ConfigError("resolution is required (the base model's native size, e.g. base_models.native_resolution)")
        # Named as the CLI's flags (data_pipelines/precompute.py), which are these fields.
        for name in ("batch_size", "resolution", "process_count", "records_per_shard"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)}: must be a positive integer")
        for name in ("num_shards", "max_shards"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)}: must be a positive integer (or left out)")
        if self.buckets is not None and not self.buckets:
            raise ConfigError("--buckets: empty (leave it out for one square bucket at --resolution)")
        if not 0 <= self.process_index < self.process_count:
            raise ConfigError(f"--process_index {self.process_index}: must be in [0, --process_count "
                              f"{self.process_count})")

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """The bucket set: `buckets`, or the one square bucket (resolution, resolution)."""
        return self.buckets or ((self.resolution, self.resolution),)


# --------------------------------------------------------------------------- specs


def stage_specs(job: PrecomputeJob, dims: ExtractorDims, family_specs=()) -> list[records.FeatureSpec]:
    """The shards' features (the manifest's; latents of bucket 0, see `bucket_specs`): the image
    features every stage shares, the stage's own, the base-model family's own (`family_specs`;
    SDXL: original_size, crop_top_left), then the bucket index when the job has buckets."""
    f = dims.vae_downsample
    if job.buckets is None and job.resolution % f:
        raise ConfigError(f"resolution {job.resolution} is not a multiple of the VAE factor {f}")
    buckets.check_multiple(job.sizes, f, f"--buckets {buckets.format_sizes(job.sizes)}")
    h, w = job.sizes[0]
    common = dict(latent_hw=(h // f, w // f), latent_channels=dims.latent_channels, id_dim=dims.id_dim,
                  clip_tokens=dims.clip_tokens, clip_width=dims.clip_width)
    bucket = [records.bucket_spec()] if job.buckets is not None else []
    return stages.get(job.stage).record_specs(dims, common, job.cache_text_states) + list(family_specs) + bucket


def bucket_specs(job: PrecomputeJob, dims: ExtractorDims, specs) -> list[list[records.FeatureSpec]]:
    """The record specs of each bucket (`stage_specs` with that bucket's latent size)."""
    f = dims.vae_downsample
    return [records.with_latent_hw(specs, (h // f, w // f)) for h, w in job.sizes]


def null_specs(job: PrecomputeJob, dims: ExtractorDims) -> Optional[list[records.FeatureSpec]]:
    """The stage's once-per-dataset classifier-free null inputs, or None when it has none."""
    return stages.get(job.stage).null_specs(dims, job.cache_text_states)


# --------------------------------------------------------------------------- batching


def _pad_rows(rows, size: int):
    """Pad a batch (array or list) to `size` rows by repeating the last row (one compile)."""
    missing = size - len(rows)
    if missing == 0:
        return rows
    if isinstance(rows, list):
        return rows + rows[-1:] * missing
    return np.concatenate([rows, np.repeat(rows[-1:], missing, axis=0)])


def _batched(fn: Callable, rows, size: int):
    """Apply a fixed-batch fn to `len(rows) <= size` rows; numpy outputs for the real rows only."""
    out = fn(_pad_rows(rows, size))
    if isinstance(out, tuple):
        return tuple(np.asarray(o)[: len(rows)] for o in out)
    return np.asarray(out)[: len(rows)]


# --------------------------------------------------------------------------- per-stage work


@dataclasses.dataclass
class _Accepted:
    """One input that passed decoding and face detection, waiting for the batched models."""

    info: dict  # string features (the stage's `record_inputs`: key, caption | identity, source, face_prompt)
    embedding: np.ndarray
    vae_pixels: np.ndarray
    clip_pixels: np.ndarray
    arrays: dict  # the stage's per-image arrays (reconfig: landmark_image)
    family_fields: Optional[dict] = None  # the family's per-record values (`Extractors.record_values`)
    bucket: int = 0  # index into job.sizes


def _analyze(job: PrecomputeJob, ex: Extractors, item) -> tuple[Optional[_Accepted], Optional[str]]:
    """Decode and analyse one input -> (accepted, None) or (None, reject reason)."""
    stage = stages.get(job.stage)
    problem = stage.input_problem(item)
    if problem is not None:
        return None, problem
    try:
        image = inputs.load_image(job.input_dir / item.key)
    except inputs.CorruptImageError as e:
        return None, f"corrupt image: {e}"
    try:
        face = ex.largest_face(image, item.key)
    except ex.no_face_errors as e:  # SmallFaceError says "face too small", others "no face"
        return None, f"{getattr(e, 'reject_reason', 'no face')}: {e}"
    info, arrays = stage.record_inputs(item, face, image, ex)
    bucket = buckets.nearest(*image.shape[:2], job.sizes)
    pixels, original_size, crop_top_left = inputs.vae_crop(image, job.sizes[bucket])
    return (
        _Accepted(
            info=info,
            embedding=np.asarray(face.embedding, np.float32),
            vae_pixels=pixels,
            clip_pixels=np.asarray(ex.clip_pixels(image), np.float32),
            arrays=arrays,
            family_fields=ex.record_values(original_size, crop_top_left) if ex.record_values else None,
            bucket=bucket,
        ),
        None,
    )


def _features(job: PrecomputeJob, ex: Extractors, batch: list[_Accepted]) -> list[dict]:
    """Run the batched models on accepted inputs (of one bucket) -> one feature dict per input."""
    size = job.batch_size
    clip = _batched(ex.encode_clip_pixels, np.stack([a.clip_pixels for a in batch]), size)
    mean, logvar = _batched(ex.encode_vae, np.stack([a.vae_pixels for a in batch]), size)
    stage = stages.get(job.stage)
    ids = _batched(ex.tokenize, [a.info[stage.text_field] for a in batch], size).astype(np.int32)
    text = stage.text_features(ids, lambda rows: _batched(ex.encode_text, rows, size), job.cache_text_states)
    out = []
    for i, a in enumerate(batch):
        feats = dict(a.info)
        feats.update(
            id_embedding=a.embedding,
            clip_image_features=clip[i].astype(np.float16),
            vae_mean=mean[i].astype(np.float32),
            vae_logvar=logvar[i].astype(np.float32),
        )
        feats.update(a.arrays)
        feats.update(a.family_fields or {})
        if job.buckets is not None:
            feats["bucket"] = np.asarray(a.bucket, np.int32)
        feats.update({name: rows[i] for name, rows in text.items()})
        out.append(feats)
    return out


def _write_shard(job, ex, specs, name, items, progress) -> tuple[int, int]:
    """Compute and atomically write one shard -> (records, rejects).

    A failed write (disk full, ...) publishes nothing of this shard and raises StorageError:
    finished shards stay, and rerunning the same command redoes only the unfinished ones."""
    try:
        return _write_shard_unguarded(job, ex, specs, name, items, progress)
    except OSError as e:
        if isinstance(e, UserError):
            raise
        raise StorageError(f"writing shard {job.output_dir / name} failed: {e}; the shards finished so far are "
                           "kept and a rerun of the same command resumes with this one (free space first)") from e


def _write_shard_unguarded(job, ex, specs, name, items, progress) -> tuple[int, int]:
    """Records leave in model batches of one bucket each, in the order the batches fill
    (then the partial ones, by bucket): deterministic, so a rerun writes the same bytes."""
    rejects = []
    pending: list[list[_Accepted]] = [[] for _ in job.sizes]  # per bucket
    index_fields = stages.get(job.stage).index_fields
    per_bucket = bucket_specs(job, ex.dims, specs)
    with shards.AtomicShardWriter(job.output_dir, name) as writer:

        def flush(k):
            for feats in _features(job, ex, pending[k]):
                index = {f: feats[f] for f in index_fields}
                if job.buckets is not None:  # the training pipeline groups records by bucket from the index
                    index["bucket"] = k
                writer.write(records.encode_example(per_bucket[k], feats), **index)
            writer.flush()
            pending[k].clear()

        for item in items:
            accepted, reason = _analyze(job, ex, item)
            if accepted is None:
                rejects.append({"file": item.key, "reason": reason})
            else:
                pending[accepted.bucket].append(accepted)
                if len(pending[accepted.bucket]) == job.batch_size:
                    flush(accepted.bucket)
            progress.update(1)
        for k in range(len(job.sizes)):
            if pending[k]:
                flush(k)
        num_records = writer.num_records
        writer.commit(rejects)
    return num_records, len(rejects)


def _write_null_features(job: PrecomputeJob, ex: Extractors, specs) -> None:
    path = job.output_dir / shards.NULL_FEATURES
    if path.exists():
        return
    size = job.batch_size
    ids = _batched(ex.tokenize, [""], size).astype(np.int32)
    p = ex.dims.clip_image_size
    clip = _batched(ex.encode_clip_pixels, np.zeros((1, p, p, 3), np.float32), size)
    values = {"input_ids": ids[0], "clip_image_features": clip[0].astype(np.float16)}
    if any(spec.name == "text_states" for spec in specs):  # the stage keeps them (cached text states)
        values["text_states"] = _batched(ex.encode_text, ids, size)[0][0].astype(np.float32)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        records.write_record(f, records.encode_example(specs, values))
    tmp.replace(path)


# --------------------------------------------------------------------------- the job


def _units(job: PrecomputeJob) -> list[list]:
    """The shardable units: one image (anchor) or one identity's images (reconfig)."""
    return stages.get(job.stage).input_units(job.input_dir)


def _fingerprint(units: list[list]) -> str:
    listing = json.dumps([dataclasses.astuple(i) for unit in units for i in unit])
    return hashlib.sha256(listing.encode()).hexdigest()


def run_precompute(job: PrecomputeJob, extractors: Extractors) -> dict:
    """Write this process's unfinished shards; finalize when all shards exist. -> summary."""
    from tqdm import tqdm

    units = _units(job)  # input errors come before anything is written
    num_shards = job.num_shards or max(1, -(-len(units) // job.records_per_shard))
    slices = shards.shard_slices(len(units), num_shards)
    specs = stage_specs(job, extractors.dims, extractors.record_specs)
    job.output_dir.mkdir(parents=True, exist_ok=True)
    run_config = {
        "stage": job.stage,
        "num_shards": num_shards,
        "num_inputs": sum(len(u) for u in units),
        "inputs_sha256": _fingerprint(units),
        "features": records.specs_to_json(specs),
        "models": extractors.models,
        "settings": {"resolution": job.resolution, "batch_size": job.batch_size,
                     "cache_text_states": job.cache_text_states},
    }
    if job.buckets is not None:  # absent without buckets: the run config (and manifest) of before
        run_config["settings"]["buckets"] = [list(size) for size in job.buckets]
    null = null_specs(job, extractors.dims)
    if null is not None:
        run_config["null_features"] = records.specs_to_json(null)
    try:
        shards.check_or_write_run_config(job.output_dir, run_config)
        if null is not None and job.process_index == 0:
            _write_null_features(job, extractors, null)
    except OSError as e:
        if isinstance(e, UserError):
            raise
        raise StorageError(f"writing {job.output_dir}'s run config or null features failed: {e} "
                           "(free space, then rerun the same command)") from e

    todo = [i for i in shards.owned_shards(num_shards, job.process_index, job.process_count)
            if not shards.is_shard_finished(job.output_dir, shards.shard_name(job.stage, i, num_shards))]
    skipped = len(shards.owned_shards(num_shards, job.process_index, job.process_count)) - len(todo)
    if job.max_shards is not None:
        todo = todo[: job.max_shards]
    total = sum(len(u) for i in todo for u in units[slices[i][0]:slices[i][1]])
    written = rejected = 0
    with tqdm(total=total, desc=f"{job.stage} p{job.process_index}", unit="img", file=sys.stderr,
              disable=not job.progress) as progress:
        for i in todo:
            start, stop = slices[i]
            items = [item for unit in units[start:stop] for item in unit]
            n, r = _write_shard(job, extractors, specs, shards.shard_name(job.stage, i, num_shards), items, progress)
            written, rejected = written + n, rejected + r
    summary = {"shards_written": len(todo), "shards_skipped": skipped, "records": written, "rejects": rejected,
               "num_shards": num_shards, "finalized": False}
    if not shards.missing_shards(job.output_dir, job.stage, num_shards):
        shards.finalize_dataset(job.output_dir)
        summary["finalized"] = True
    return summary


def finalize(output_dir: str | pathlib.Path) -> dict:
    """Merge an output folder's shard sidecars into manifest.json / rejects.jsonl."""
    return shards.finalize_dataset(pathlib.Path(output_dir))
