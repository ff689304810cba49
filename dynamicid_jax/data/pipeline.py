"""Input pipeline: precomputed shards -> seeded shuffled batches -> global `jax.Array`s.

    ds = anchor_dataset(folder, global_batch_size=16, seed=0)        # grain.MapDataset
    ds = reconfig_dataset(folder, global_batch_size=2, num_targets=32, seed=0)
    it = GlobalBatchIterator(ds, mesh)      # next(it) -> {name: jax.Array sharded on the batch}
    state = it.get_state(); ...; it.set_state(state)                 # exact resume
    it.close()

Why a grain MapDataset over our own record index (not `TFRecordIterDataset`): the shard
sidecars written by the precompute (`*.tfrecord.index.json`) give every record's byte
offset, so records are random-access. That gives a true global shuffle per host (not a
window), an iterator state that is just the next element index (exact, tiny, independent of
prefetch), and lets the reconfig stage gather a source and T targets of one identity by
index. Every read checks the record's CRCs.

Each host reads a disjoint subset of shard files (file i goes to host i % process_count),
batches `global_batch_size / process_count` examples locally, and the local batches become
one global array per feature with `jax.make_array_from_process_local_data`, sharded over the
mesh's batch axes ('data', 'fsdp') by `dynamicid_jax.sharding.batch_sharding`.

Arrays keep their stored dtypes (clip_image_features stays float16, halving host->device
traffic; the model casts). String features (key, caption, ...) are dropped unless asked for.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from dynamicid_jax.data import records, shards

# --------------------------------------------------------------------------- record access


def host_shard_files(manifest: Mapping[str, Any], process_index: int, process_count: int) -> list[str]:
    """The shard files host `process_index` reads: every process_count-th, disjoint, covering."""
    files = [s["file"] for s in manifest["shards"]]
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if len(files) < process_count:
        raise ValueError(
            f"{len(files)} shard file(s) cannot be split over {process_count} hosts; "
            "precompute with --num_shards >= the number of hosts"
        )
    return files[process_index::process_count]


class ShardRecordSource:
    """Random access to the records of some shard files: `source[i]` -> CRC-checked bytes.

    Implements grain's RandomAccessDataSource protocol (`__len__`, `__getitem__`). Record i
    of the concatenation of `files` in order; `entries[i]` is its sidecar entry (key, ...).
    """

    def __init__(self, folder: str | pathlib.Path, files: Sequence[str]):
        self.folder = pathlib.Path(folder)
        self.files = list(files)
        self.entries: list[dict] = []
        self._locations: list[tuple[int, int]] = []  # (file number, byte offset)
        for n, name in enumerate(self.files):
            index = shards.read_shard_index(self.folder, name)
            if index["num_records"] != len(index["records"]):
                raise shards.ManifestError(f"{name}: index lists {len(index['records'])} of {index['num_records']} records")
            for entry in index["records"]:
                self.entries.append(entry)
                self._locations.append((n, entry["offset"]))
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._locations)

    def __getitem__(self, i: int) -> bytes:
        n, offset = self._locations[i]
        fd = self._fds.get(n)
        if fd is None:
            fd = self._fds.setdefault(n, os.open(self.folder / self.files[n], os.O_RDONLY))
        return records.read_record_at(fd, offset, self.files[n])

    def close(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        self.close()

    def __getstate__(self):  # descriptors do not travel to worker processes; reopened lazily
        return {**self.__dict__, "_fds": {}}

    def __repr__(self) -> str:
        return f"ShardRecordSource({self.folder}, {len(self.files)} files, {len(self)} records)"


def _array_specs(manifest: Mapping[str, Any], keep_strings: bool) -> list[records.FeatureSpec]:
    specs = records.specs_from_json(manifest["features"])
    return [s for s in specs if keep_strings or s.dtype != records.STRING]


def _stack(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    import jax

    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by {process_count} hosts")
    return global_batch_size // process_count


# --------------------------------------------------------------------------- anchor stage


class EpochPermutation:
    """Element i of the repeated dataset -> record index: one numpy permutation of the n
    records per epoch, seeded by (seed, epoch), the current and previous epoch cached.

    Why not grain's `MapDataset.shuffle`: its keyed index bijection cost about 3 ms per
    element here (profiled), several times the read and decode of a record, and showed up
    as input stalls of the tiny train step. A cached permutation is O(1) per element; it
    holds 8 bytes per record (80 MB for 10M records on one host).
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, i: int) -> int:
        epoch, position = divmod(int(i), self.n)
        order = self._cache.get(epoch)
        if order is None:  # concurrent readers may both compute it: same result, harmless
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._cache = {e: o for e, o in self._cache.items() if e == epoch - 1} | {epoch: order}
        return int(order[position])


def anchor_dataset(
    folder: str | pathlib.Path,
    *,
    global_batch_size: int,
    seed: int,
    expected_features: Optional[Sequence[records.FeatureSpec]] = None,
    num_epochs: Optional[int] = None,
    keep_strings: bool = False,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
):
    """Shuffled, repeated batches of anchor records -> grain.MapDataset of {name: (b, ...)}.

    Shuffle: a seeded permutation of this host's records, reseeded every epoch; `num_epochs`
    None repeats forever. Batches are `global_batch_size / process_count` records, the last
    partial batch dropped (finite epochs). `expected_features` are checked against the
    manifest (format version, names, shapes, dtypes) before anything is read.
    """
    import grain

    manifest = shards.load_manifest(folder, "anchor", expected_features)
    index, count = _process(process_index, process_count)
    source = ShardRecordSource(folder, host_shard_files(manifest, index, count))
    if len(source) == 0:
        raise ValueError(f"host {index} of {count} has no anchor records in {folder}")
    specs = _array_specs(manifest, keep_strings)
    order = EpochPermutation(len(source), seed)
    length = len(source) * num_epochs if num_epochs is not None else 2**62
    return (
        grain.MapDataset.range(length)
        .map(lambda i: records.decode_example(specs, source[order(i)]))
        .batch(_local_batch_size(global_batch_size, count), drop_remainder=True, batch_fn=_stack)
    )


def load_null_features(folder: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The anchor dataset's classifier-free null inputs: {input_ids (L,), clip_image_features (N, W), ...}."""
    manifest = shards.load_manifest(folder, "anchor")
    null = manifest["null_features"]
    payloads = list(records.iter_records(pathlib.Path(folder) / null["file"]))
    if len(payloads) != 1:
        raise shards.ManifestError(f"{null['file']}: expected one record, found {len(payloads)}")
    return records.decode_example(records.specs_from_json(null["features"]), payloads[0])


# --------------------------------------------------------------------------- reconfig stage


@dataclasses.dataclass(frozen=True)
class IdentityPools:
    """Record indices of a host's identities, split by source ("multi" and "kdef")."""

    identities: dict[str, list[str]]  # source -> identity names (sorted)
    records: dict[str, list[int]]  # identity -> record indices into the ShardRecordSource
    too_small: list[str]  # identities left out for having fewer than min_images records


def identity_pools(source: ShardRecordSource, min_images: int) -> IdentityPools:
    by_identity: dict[str, list[int]] = {}
    source_of: dict[str, str] = {}
    for i, entry in enumerate(source.entries):
        by_identity.setdefault(entry["identity"], []).append(i)
        if source_of.setdefault(entry["identity"], entry["source"]) != entry["source"]:
            raise shards.ManifestError(f"identity {entry['identity']!r} has records of two sources")
    kept = {k: v for k, v in by_identity.items() if len(v) >= min_images}
    pools: dict[str, list[str]] = {"multi": [], "kdef": []}
    for identity in sorted(kept):
        pools[source_of[identity]].append(identity)
    return IdentityPools(pools, kept, sorted(set(by_identity) - set(kept)))


@dataclasses.dataclass(frozen=True)
class _DrawIdentityExample:
    """Element i -> one identity's source record and `num_targets` target records (indices).

    Deterministic in (seed, i), so the dataset is a pure function of the index and iterator
    states restore exactly. With probability `kdef_probability` the identity comes from the
    KDEF pool, else from the multi-image pool; targets are drawn from the identity's other
    records, without replacement when it has enough, with replacement otherwise.
    """

    pools: IdentityPools
    num_targets: int
    kdef_probability: float
    seed: int

    def __call__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, i])
        use_kdef = rng.random() < self.kdef_probability
        names = self.pools.identities["kdef" if use_kdef else "multi"]
        members = self.pools.records[names[rng.integers(len(names))]]
        src = int(rng.integers(len(members)))
        others = members[:src] + members[src + 1 :]
        replace = len(others) < self.num_targets
        targets = rng.choice(others, size=self.num_targets, replace=replace)
        return np.asarray([members[src], *targets], np.int64)


def reconfig_dataset(
    folder: str | pathlib.Path,
    *,
    global_batch_size: int,
    num_targets: int,
    seed: int,
    kdef_probability: float = 0.05,
    min_images: int = 2,
    expected_features: Optional[Sequence[records.FeatureSpec]] = None,
    keep_strings: bool = False,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    num_examples: int = 2**62,
):
    """Batches of identity examples -> grain.MapDataset of
    {"source_<name>": (b, ...), "target_<name>": (b, T, ...)} for every stored feature.

    One example is one identity (drawn per example, see `_DrawIdentityExample`), its source
    record and `num_targets` target records. Identities with fewer than `min_images` records
    are left out (listed in `.pools.too_small` of the returned dataset's source; at least 2
    so a target differs from the source). A pool the mixing needs but the host lacks is an
    error, never a silent change of the mixing ratio.
    """
    import grain

    if not 0.0 <= kdef_probability <= 1.0:
        raise ValueError(f"kdef_probability must be in [0, 1], got {kdef_probability}")
    manifest = shards.load_manifest(folder, "reconfig", expected_features)
    index, count = _process(process_index, process_count)
    source = ShardRecordSource(folder, host_shard_files(manifest, index, count))
    pools = identity_pools(source, min_images)
    if kdef_probability < 1.0 and not pools.identities["multi"]:
        raise ValueError(f"host {index}: no 'multi' identities with >= {min_images} images in {folder}")
    if kdef_probability > 0.0 and not pools.identities["kdef"]:
        raise ValueError(
            f"host {index}: kdef_probability={kdef_probability} but no 'kdef' identities with >= {min_images} "
            f"images in its shards of {folder}; pass kdef_probability=0 or add KDEF-style identity folders"
        )
    specs = _array_specs(manifest, keep_strings)
    draw = _DrawIdentityExample(pools, num_targets, kdef_probability, seed)

    def load(i: int) -> dict[str, np.ndarray]:
        rows = [records.decode_example(specs, source[int(r)]) for r in draw(i)]
        example = {f"source_{k}": np.asarray(v) for k, v in rows[0].items()}
        example.update({f"target_{k}": np.stack([r[k] for r in rows[1:]]) for k in rows[0]})
        return example

    ds = grain.MapDataset.range(num_examples).map(load)
    ds = ds.batch(_local_batch_size(global_batch_size, count), drop_remainder=True, batch_fn=_stack)
    return ds


# --------------------------------------------------------------------------- global arrays


def to_global_batch(local: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
    """Host-local numpy batch -> {name: global jax.Array}, axis 0 = all hosts' rows.

    String features stay host-local numpy arrays (they cannot be device arrays).
    """
    import jax

    out = {}
    for name, value in local.items():
        value = np.asarray(value)
        if value.dtype.kind in "USO":
            out[name] = value
            continue
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


class GlobalBatchIterator:
    """Iterates a batched grain MapDataset as global jax.Array batches, with prefetch threads.

    `get_state()` / `set_state()` are grain's (the next element index): restoring gives exactly
    the batches an uninterrupted iterator would have given. Call `close()` (or use `with`) to
    stop the prefetch threads.
    """

    def __init__(self, dataset, mesh=None, *, num_threads: int = 2, prefetch: int = 2, sharding=None):
        import grain

        if sharding is None and mesh is not None:
            from dynamicid_jax.sharding import batch_sharding

            sharding = batch_sharding(mesh)
        self.sharding = sharding  # None: host-local batches only (`next_local`)
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._iterator = iter(dataset.to_iter_dataset(options))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self.sharding is None:
            raise ValueError("GlobalBatchIterator without a mesh gives host-local batches only: use next_local()")
        return to_global_batch(next(self._iterator), self.sharding)

    def next_local(self) -> dict[str, np.ndarray]:
        """The next host-local numpy batch (no device transfer)."""
        return next(self._iterator)

    def get_state(self) -> dict:
        return self._iterator.get_state()

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)

    def close(self) -> None:
        self._iterator.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
