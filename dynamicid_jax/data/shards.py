"""Shard files of a precomputed dataset: names, input slices, atomic writes, index, manifest.

A dataset folder holds, for a stage NAME ("anchor" or "reconfig") and S shards:

    NAME-00000-of-0000S.tfrecord          records (see `records.py`)
    NAME-00000-of-0000S.tfrecord.index.json   per-shard sidecar: each record's key, byte
                                          offset and length (plus identity/source, and its
                                          bucket with aspect-ratio buckets), and the inputs
                                          this shard rejected
    run_config.json                       the settings every process of the run must share
    null_features.tfrecord                anchor only: one record of classifier-free null inputs
    manifest.json                         written last, by `finalize_dataset`
    rejects.jsonl                         every rejected input with its reason, merged

A shard is finished exactly when its final `.tfrecord` name exists: it is written under a
temporary name and renamed after its sidecar, so a crash leaves either nothing or a stale
temporary that the next run overwrites. The manifest is merged from the sidecars once every
shard exists.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, BinaryIO, Mapping, Sequence

from dynamicid_jax import input_files
from dynamicid_jax.data import records
from dynamicid_jax.errors import ConfigError, UserError

MANIFEST = "manifest.json"
RUN_CONFIG = "run_config.json"
REJECTS = "rejects.jsonl"
NULL_FEATURES = "null_features.tfrecord"
_TMP_SUFFIX = ".tmp"
_INDEX_SUFFIX = ".index.json"


class ManifestError(UserError, ValueError):
    """A dataset folder is incomplete or does not match what the caller expects."""


def shard_name(stage: str, index: int, num_shards: int) -> str:
    """`anchor-00003-of-00016.tfrecord`."""
    return f"{stage}-{index:05d}-of-{num_shards:05d}.tfrecord"


def index_name(shard_file: str) -> str:
    return shard_file + _INDEX_SUFFIX


def shard_slices(num_units: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) of a sorted unit list for each shard; sizes differ by <= 1."""
    if num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards > num_units:
        raise ConfigError(f"num_shards={num_shards} exceeds the number of inputs ({num_units})")
    return [(i * num_units // num_shards, (i + 1) * num_units // num_shards) for i in range(num_shards)]


def owned_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """Shards of one process: i with i % process_count == process_index (disjoint, covering)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    return list(range(process_index, num_shards, process_count))


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    """Write JSON under a temporary name, fsync, rename (readers never see half a file)."""
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: pathlib.Path) -> dict:
    """A dataset's JSON file (manifest, shard index, run config), size-bounded; ManifestError
    naming it unless it holds a JSON object."""
    value = input_files.read_json(path, "dataset JSON file")
    if not isinstance(value, dict):
        raise ManifestError(f"{path}: holds a JSON {type(value).__name__}, not an object")
    return value


class AtomicShardWriter:
    """Writes one shard under a temporary name; `commit()` publishes it with its sidecar.

    Usage:
        with AtomicShardWriter(folder, name) as w:
            w.write(payload, key=..., identity=...)
            w.commit(rejects=[...])
    Leaving the block without `commit()` (an exception, a kill) publishes nothing.
    """

    def __init__(self, folder: pathlib.Path, name: str):
        self.folder = pathlib.Path(folder)
        self.name = name
        self._tmp = self.folder / (name + _TMP_SUFFIX)
        self._file: BinaryIO | None = None
        self._entries: list[dict] = []
        self._committed = False

    def __enter__(self) -> "AtomicShardWriter":
        self._file = open(self._tmp, "wb")  # truncates a stale temporary of a killed run
        return self

    def write(self, payload: bytes, **info: str) -> None:
        offset, length = records.write_record(self._file, payload)
        self._entries.append({"offset": offset, "length": length, **info})

    def flush(self) -> None:
        """Push written records to the temporary file (progress is visible on disk)."""
        self._file.flush()

    @property
    def num_records(self) -> int:
        return len(self._entries)

    def commit(self, rejects: Sequence[Mapping[str, str]] = ()) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        sidecar = {"shard": self.name, "num_records": len(self._entries), "records": self._entries,
                   "rejects": list(rejects)}
        write_json_atomic(self.folder / index_name(self.name), sidecar)
        os.replace(self._tmp, self.folder / self.name)  # the commit point
        self._committed = True

    def __exit__(self, *exc) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if not self._committed and self._tmp.exists():
            self._tmp.unlink()


def is_shard_finished(folder: pathlib.Path, name: str) -> bool:
    return (pathlib.Path(folder) / name).exists() and (pathlib.Path(folder) / index_name(name)).exists()


def read_shard_index(folder: pathlib.Path, name: str) -> dict:
    path = pathlib.Path(folder) / index_name(name)
    if not path.exists():
        raise ManifestError(f"shard index {path} is missing")
    return read_json(path)


def check_or_write_run_config(folder: pathlib.Path, run_config: Mapping[str, Any]) -> None:
    """First process writes run_config.json; later runs/processes must match it exactly.

    Resuming with other settings (shard count, resolution, models, inputs) would mix
    incompatible shards, so it is refused with the differing fields named.
    """
    path = pathlib.Path(folder) / RUN_CONFIG
    run_config = json.loads(json.dumps(run_config))  # normalise tuples -> lists
    if path.exists():
        found = read_json(path)
        if found != run_config:
            keys = sorted(k for k in set(found) | set(run_config) if found.get(k) != run_config.get(k))
            raise ManifestError(
                f"{path} was written by a run with different settings ({', '.join(keys)}); "
                "use a new --output folder or the original settings"
            )
        return
    write_json_atomic(path, run_config)


def missing_shards(folder: pathlib.Path, stage: str, num_shards: int) -> list[str]:
    return [shard_name(stage, i, num_shards) for i in range(num_shards)
            if not is_shard_finished(folder, shard_name(stage, i, num_shards))]


def _bucket_counts(entries: Sequence[Mapping[str, Any]], num_buckets: int) -> dict:
    """A shard's records per bucket, and for records of identities (whole in one shard) the
    sorted image counts of its identities in each bucket: what a reader needs to know, for
    every host alike, which buckets can give identity examples (`pipeline.reconfig_dataset`)."""
    out = {"bucket_counts": [sum(r["bucket"] == k for r in entries) for k in range(num_buckets)]}
    if entries and "identity" in entries[0]:
        per_bucket: list[dict[str, int]] = [{} for _ in range(num_buckets)]
        for r in entries:
            per_bucket[r["bucket"]][r["identity"]] = per_bucket[r["bucket"]].get(r["identity"], 0) + 1
        out["bucket_identity_sizes"] = [sorted(counts.values()) for counts in per_bucket]
    return out


def finalize_dataset(folder: pathlib.Path) -> dict:
    """Merge the shard sidecars into manifest.json and rejects.jsonl; returns the manifest.

    Deterministic: the same shards always give the same manifest bytes, so concurrent
    finishers that both finalize write identical files.
    """
    folder = pathlib.Path(folder)
    if not (folder / RUN_CONFIG).is_file():
        raise ManifestError(f"cannot finalize {folder}: no {RUN_CONFIG} (not the --output folder of a precompute run)")
    run_config = read_json(folder / RUN_CONFIG)
    stage, num_shards = run_config["stage"], run_config["num_shards"]
    missing = missing_shards(folder, stage, num_shards)
    if missing:
        raise ManifestError(f"cannot finalize {folder}: {len(missing)} shard(s) unfinished: {missing[:5]}")
    if "null_features" in run_config and not (folder / NULL_FEATURES).exists():
        raise ManifestError(f"cannot finalize {folder}: {NULL_FEATURES} is missing (written by process 0)")
    sizes = run_config["settings"].get("buckets")  # aspect-ratio buckets (buckets.py), if the run had them
    shards, rejects = [], []
    for i in range(num_shards):
        name = shard_name(stage, i, num_shards)
        index = read_shard_index(folder, name)
        shards.append({"file": name, "index": index_name(name), "num_records": index["num_records"]})
        if sizes is not None:
            shards[-1].update(_bucket_counts(index["records"], len(sizes)))
        rejects.extend(index["rejects"])
    manifest = {
        "format_version": records.FORMAT_VERSION,
        "stage": stage,
        "features": run_config["features"],
        "num_records": sum(s["num_records"] for s in shards),
        "num_rejects": len(rejects),
        "shards": shards,
        "models": run_config["models"],
        "settings": run_config["settings"],
    }
    if sizes is not None:  # [height, width] each, and the records of each over all shards
        manifest["buckets"] = {"sizes": sizes,
                               "counts": [sum(s["bucket_counts"][k] for s in shards) for k in range(len(sizes))]}
    if "null_features" in run_config:  # the stage has classifier-free null inputs (anchor)
        manifest["null_features"] = {"file": NULL_FEATURES, "features": run_config["null_features"]}
    tmp = folder / (REJECTS + _TMP_SUFFIX)
    with open(tmp, "w") as f:
        for r in rejects:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, folder / REJECTS)
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def load_manifest(
    folder: pathlib.Path,
    stage: str,
    expected_features: Sequence[records.FeatureSpec] | None = None,
) -> dict:
    """Read manifest.json and refuse a dataset the caller cannot use, naming the mismatch.

    Checks the format version, the stage and (when given) every expected feature's shape and
    dtype; the dataset may hold extra features.
    """
    path = pathlib.Path(folder) / MANIFEST
    if not path.exists():
        raise ManifestError(f"{path} not found (an unfinished precompute? run it again or --finalize)")
    manifest = read_json(path)
    if manifest.get("format_version") != records.FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version {manifest.get('format_version')} != {records.FORMAT_VERSION} "
            "expected by this reader; recompute the shards"
        )
    if manifest.get("stage") != stage:
        raise ManifestError(f"{path}: stage {manifest.get('stage')!r}, expected {stage!r}")
    if expected_features is not None:
        try:
            records.check_specs(records.specs_from_json(manifest["features"]), expected_features, str(path))
        except records.RecordFormatError as e:
            raise ManifestError(str(e)) from None
    return manifest
