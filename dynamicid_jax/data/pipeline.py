"""Input pipeline: precomputed shards -> seeded shuffled batches -> global `jax.Array`s.

    ds = anchor_dataset(folder, global_batch_size=16, seed=0)        # grain.MapDataset
    ds = reconfig_dataset(folder, global_batch_size=2, num_targets=32, seed=0)
    it = GlobalBatchIterator(ds, mesh)      # next(it) -> {name: jax.Array sharded on the batch}
    state = it.get_state(); ...; it.set_state(state)                 # exact resume
    it.close()

The datasets' elements are whole batches: `ds[j]` reads the j-th batch's records and decodes
them straight into fresh batch arrays (`BatchDecoder`: no per-record arrays, no stacking).
`GlobalBatchIterator` reads the next `prefetch` batches in its threads and places them on
the devices there too, so `next()` hands over arrays that are already on the mesh; its
state is the index of the next batch the caller has not received, whatever was read ahead.

Why a grain MapDataset over our own record index (not `TFRecordIterDataset`): the shard
sidecars written by the precompute (`*.tfrecord.index.json`) give every record's byte
offset, so records are random-access. That gives a true global shuffle per host (not a
window), an iterator state that is just the next batch index (exact, tiny, independent of
prefetch), and lets the reconfig stage gather a source and T targets of one identity by
index. Every read checks the record's CRCs.

Each host reads a disjoint subset of shard files (file i goes to host i % process_count),
batches `global_batch_size / process_count` examples locally, and the local batches become
one global array per feature (`jax.make_array_from_process_local_data`; one `jax.device_put`
of the whole batch in a single process), sharded over the mesh's batch axes ('data',
'fsdp') by `dynamicid_jax.sharding.batch_sharding`.

Arrays keep their stored dtypes (clip_image_features stays float16, halving host->device
traffic; the model casts). String features (key, caption, ...) are dropped unless asked for.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import pathlib
import threading
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from dynamicid_jax.data import records, shards
from dynamicid_jax.errors import ConfigError

# --------------------------------------------------------------------------- record access


def host_shard_files(manifest: Mapping[str, Any], process_index: int, process_count: int) -> list[str]:
    """The shard files host `process_index` reads: every process_count-th, disjoint, covering."""
    files = [s["file"] for s in manifest["shards"]]
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if len(files) < process_count:
        raise ConfigError(
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
        self._open_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._locations)

    def __getitem__(self, i: int) -> bytes:
        n, offset = self._locations[i]
        fd = self._fds.get(n)
        if fd is None:
            with self._open_lock:  # reader threads: one descriptor per file (pread shares it)
                fd = self._fds.get(n)
                if fd is None:
                    fd = self._fds[n] = os.open(self.folder / self.files[n], os.O_RDONLY)
        return records.read_record_at(fd, offset, str(self.folder / self.files[n]))

    def location(self, i: int) -> tuple[str, int]:
        """(shard file path, byte offset) of record i."""
        n, offset = self._locations[i]
        return str(self.folder / self.files[n]), offset

    def close(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        self.close()

    def __getstate__(self):  # descriptors do not travel to worker processes; reopened lazily
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_open_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _fds={}, _open_lock=threading.Lock())

    def __repr__(self) -> str:
        return f"ShardRecordSource({self.folder}, {len(self.files)} files, {len(self)} records)"


class CorruptRecords:
    """Opt-in skipping of corrupt records (config.data.skip_corrupt_records): counts them.

    A record whose CRC or framing fails is replaced, in its batch, by the next readable
    record of the same stream (anchor: the next one of the shuffled order; reconfig: the next
    record of the same identity), so batches keep their size and the run goes on; that record
    then appears twice in the batch. Each distinct bad record is logged once (a warning naming
    file and offset) and listed in `.found` {(file, offset): reason}; the trainer writes the
    count into the run summary. Without it (the default) the first bad record stops the run.
    """

    def __init__(self):
        self.found: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()

    def add(self, location: tuple[str, int], error: Exception) -> None:
        import logging

        with self._lock:
            if location in self.found:
                return
            self.found[location] = str(error)
        logging.getLogger("dynamicid_jax").warning("skipping corrupt record %s at offset %d: %s",
                                                   location[0], location[1], error)

    def __len__(self) -> int:
        return len(self.found)

    def to_json(self) -> dict:
        return {"count": len(self.found),
                "records": [{"file": f, "offset": o, "error": e} for (f, o), e in sorted(self.found.items())[:1000]]}


def _read_or_substitute(source: ShardRecordSource, index: int, candidates, corrupt: Optional[CorruptRecords]) -> bytes:
    """source[index]; with `corrupt`, a bad record is counted and the first readable of
    `candidates()` (record indices, in order) is read instead."""
    try:
        return source[index]
    except records.RecordFormatError as e:
        if corrupt is None:
            raise
        corrupt.add(source.location(index), e)
    for other in candidates():
        try:
            return source[other]
        except records.RecordFormatError as e:
            corrupt.add(source.location(other), e)
    raise records.RecordFormatError(f"every candidate record for record {index} is corrupt "
                                    f"(first: {source.location(index)[0]} at offset {source.location(index)[1]})")


def _array_specs(manifest: Mapping[str, Any], keep_strings: bool) -> list[records.FeatureSpec]:
    specs = records.specs_from_json(manifest["features"])
    return [s for s in specs if keep_strings or s.dtype != records.STRING]


class BatchDecoder:
    """Serialized records -> one batch {name: array of shape (*lead, *feature shape)}, decoded
    straight into one fresh array per feature.

    Gives exactly what stacking `records.decode_example` of every record gives (same checks:
    every feature present, one value, the spec's byte size; strings as str arrays), without
    its per-record work (mostly `FeatureSpec.num_bytes` per record, then np.stack; profile in
    benchmarks/design_choices_report.md): here the byte sizes are computed once and each
    feature is one join of the records' bytes. Arrays are
    new for every call, never reused: a batch placed on a CPU device may share its buffer.
    """

    def __init__(self, specs: Sequence[records.FeatureSpec]):
        self._example = records.tfrecord_module("example_pb2").Example
        self._arrays = [(s.name, np.dtype(s.dtype), s.shape, s.num_bytes) for s in specs if s.dtype != records.STRING]
        self._strings = [s.name for s in specs if s.dtype == records.STRING]
        self._order = [s.name for s in specs]

    def __call__(self, payloads: Sequence[bytes], lead: Optional[tuple[int, ...]] = None) -> dict[str, np.ndarray]:
        """`payloads` in row-major order of `lead` (default: one row per payload)."""
        lead = (len(payloads),) if lead is None else tuple(lead)
        if int(np.prod(lead, dtype=np.int64)) != len(payloads):
            raise ValueError(f"{len(payloads)} records do not fill a batch of shape {lead}")
        arrays: dict[str, list[bytes]] = {name: [] for name, *_ in self._arrays}
        strings: dict[str, list[str]] = {name: [] for name in self._strings}
        for payload in payloads:
            example = self._example()
            example.ParseFromString(payload)
            feats = example.features.feature
            for name, dtype, shape, size in self._arrays:
                value = _single_value(feats, name)
                if len(value) != size:
                    raise records.RecordFormatError(f"feature {name!r}: {len(value)} bytes, expected {size} "
                                                    f"for {dtype}{list(shape)}")
                arrays[name].append(value)
            for name in self._strings:
                strings[name].append(_single_value(feats, name).decode("utf-8"))
        out = {}
        for name, dtype, shape, _ in self._arrays:  # stored little-endian; a no-op cast on little-endian hosts
            data = np.frombuffer(bytearray().join(arrays[name]), dtype.newbyteorder("<"))
            out[name] = data.astype(dtype, copy=False).reshape(*lead, *shape)
        for name in self._strings:
            out[name] = np.array(strings[name]).reshape(lead)
        return {name: out[name] for name in self._order}  # the specs' order, as decode_example


def _single_value(feats, name: str) -> bytes:
    if name not in feats:
        raise records.RecordFormatError(f"record lacks feature {name!r}")
    values = feats[name].bytes_list.value
    if len(values) != 1:
        raise records.RecordFormatError(f"feature {name!r}: expected one bytes value, got {len(values)}")
    return values[0]


def _process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    import jax

    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ConfigError(f"global_batch_size={global_batch_size} is not divisible by {process_count} hosts")
    return global_batch_size // process_count


# --------------------------------------------------------------------------- anchor stage


class EpochPermutation:
    """Element i of the repeated dataset -> record index: one numpy permutation of the n
    records per epoch, seeded by (seed, epoch), the current and previous epoch cached.

    Why not grain's `MapDataset.shuffle`: its keyed index bijection cost several times the
    read and decode of a record per element (profiled: benchmarks/design_choices_report.md)
    and showed up as input stalls of the tiny train step. A cached permutation is O(1) per element; it
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
    corrupt: Optional[CorruptRecords] = None,
):
    """Shuffled, repeated batches of anchor records -> grain.MapDataset of {name: (b, ...)}
    (element j = batch j, records j*b ... j*b + b - 1 of the shuffled stream).

    Shuffle: a seeded permutation of this host's records, reseeded every epoch; `num_epochs`
    None repeats forever. Batches are `global_batch_size / process_count` records, the last
    partial batch dropped (finite epochs). `expected_features` are checked against the
    manifest (format version, names, shapes, dtypes) before anything is read. `corrupt`
    (a CorruptRecords) skips and counts bad records instead of raising on the first.
    """
    import grain

    manifest = shards.load_manifest(folder, "anchor", expected_features)
    index, count = _process(process_index, process_count)
    source = ShardRecordSource(folder, host_shard_files(manifest, index, count))
    if len(source) == 0:
        raise ConfigError(f"host {index} of {count} has no anchor records in {folder}")
    decode = BatchDecoder(_array_specs(manifest, keep_strings))
    order = EpochPermutation(len(source), seed)
    length = len(source) * num_epochs if num_epochs is not None else 2**62
    b = _local_batch_size(global_batch_size, count)

    def read_batch(j: int) -> dict[str, np.ndarray]:  # elements j*b ... j*b + b - 1 of the shuffled stream
        def read(i):
            return _read_or_substitute(source, order(i), lambda: (order(i + k) for k in range(1, len(source))), corrupt)

        return decode([read(i) for i in range(j * b, (j + 1) * b)])

    return grain.MapDataset.range(length // b).map(read_batch)


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
    corrupt: Optional[CorruptRecords] = None,
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
        raise ConfigError(f"kdef_probability must be in [0, 1], got {kdef_probability}")
    manifest = shards.load_manifest(folder, "reconfig", expected_features)
    index, count = _process(process_index, process_count)
    source = ShardRecordSource(folder, host_shard_files(manifest, index, count))
    pools = identity_pools(source, min_images)
    if kdef_probability < 1.0 and not pools.identities["multi"]:
        raise ConfigError(f"host {index}: no 'multi' identities with >= {min_images} images in {folder}")
    if kdef_probability > 0.0 and not pools.identities["kdef"]:
        raise ConfigError(
            f"host {index}: kdef_probability={kdef_probability} but no 'kdef' identities with >= {min_images} "
            f"images in its shards of {folder}; pass kdef_probability=0 or add KDEF-style identity folders"
        )
    decode = BatchDecoder(_array_specs(manifest, keep_strings))
    draw = _DrawIdentityExample(pools, num_targets, kdef_probability, seed)
    b = _local_batch_size(global_batch_size, count)

    def read_batch(j: int) -> dict[str, np.ndarray]:  # examples j*b ... j*b + b - 1
        def same_identity(r):  # substitutes for a corrupt record r: the identity's next records
            members = pools.records[source.entries[r]["identity"]]
            at = members.index(r)
            return (members[(at + k) % len(members)] for k in range(1, len(members)))

        def read(r):
            return _read_or_substitute(source, r, lambda: same_identity(r), corrupt)

        rows = decode([read(int(r)) for i in range(j * b, (j + 1) * b) for r in draw(i)], (b, 1 + num_targets))
        batch = {f"source_{k}": np.ascontiguousarray(v[:, 0]) for k, v in rows.items()}
        batch.update({f"target_{k}": np.ascontiguousarray(v[:, 1:]) for k, v in rows.items()})
        return batch

    return grain.MapDataset.range(num_examples // b).map(read_batch)


# --------------------------------------------------------------------------- global arrays


def to_global_batch(local: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
    """Host-local numpy batch -> {name: global jax.Array}, axis 0 = all hosts' rows.

    String features stay host-local numpy arrays (they cannot be device arrays). One process:
    a single `jax.device_put` of all arrays (the global batch is the local one); several:
    `jax.make_array_from_process_local_data` per array.
    """
    import jax

    local = {name: np.asarray(value) for name, value in local.items()}
    arrays = {name: value for name, value in local.items() if value.dtype.kind not in "USO"}
    if jax.process_count() == 1:
        placed = jax.device_put(arrays, sharding)
    else:
        placed = {name: jax.make_array_from_process_local_data(
            sharding, value, (value.shape[0] * jax.process_count(), *value.shape[1:]))
            for name, value in arrays.items()}
    return {name: placed.get(name, value) for name, value in local.items()}


class GlobalBatchIterator:
    """Iterates a batched MapDataset (element j = batch j) as global jax.Array batches.

    `num_threads` threads read the next `prefetch` batches ahead (at least one) and, given a
    mesh or sharding, place them on the devices too and wait until they are there: `next()`
    returns arrays ready for the step, and the time it blocks is only time the input was not
    ready. Without a mesh, `next_local()` gives the host-local numpy batches.

    `get_state()` is {"next_index": index of the next batch `next()` will return}: batches
    read ahead but not yet returned are not part of it, so a checkpoint taken after consuming
    k batches resumes at batch k exactly, and `set_state()` drops what was read ahead. The
    format is grain's iterator state, so states saved by the grain iterator used before keep
    working. Call `close()` (or use `with`) to stop the threads.

    Placed batches read ahead occupy device memory: `prefetch` batches besides the one in use.
    (grain's own iterator, used before, read ahead too but left the placement to `next()` on
    the caller's thread, which made `next()` block the loop far longer than here: figures in
    benchmarks/input_share_report.md.)
    """

    def __init__(self, dataset, mesh=None, *, num_threads: int = 2, prefetch: int = 2, sharding=None):
        if sharding is None and mesh is not None:
            from dynamicid_jax.sharding import batch_sharding

            sharding = batch_sharding(mesh)
        self.sharding = sharding  # None: host-local batches only (`next_local`)
        self._dataset = dataset
        self._length = len(dataset)
        self._depth = max(1, int(prefetch))
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, int(num_threads)), thread_name_prefix="input")
        self._pending: collections.deque = collections.deque()  # futures of batches next_index, next_index + 1, ...
        self._next_index = 0  # the next batch handed to the caller
        self._closed = False

    def _read(self, index: int):
        batch = self._dataset[index]
        if self.sharding is None:
            return batch
        import jax

        return jax.block_until_ready(to_global_batch(batch, self.sharding))

    def _fill(self) -> None:
        ahead = self._next_index + len(self._pending)
        while len(self._pending) < self._depth and ahead < self._length:
            self._pending.append(self._pool.submit(self._read, ahead))
            ahead += 1

    def _take(self):
        if self._closed:
            raise ValueError("GlobalBatchIterator is closed")
        self._fill()
        if not self._pending:
            raise StopIteration
        future = self._pending.popleft()
        try:
            batch = future.result()
        except BaseException:
            self._drop_pending()  # the state stays at the batch that failed
            raise
        self._next_index += 1
        self._fill()
        return batch

    def _drop_pending(self) -> None:
        for future in self._pending:
            future.cancel()
        concurrent.futures.wait(self._pending)
        self._pending.clear()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self.sharding is None:
            raise ValueError("GlobalBatchIterator without a mesh gives host-local batches only: use next_local()")
        return self._take()

    def next_local(self) -> dict[str, np.ndarray]:
        """The next host-local numpy batch (an iterator made without a mesh or sharding)."""
        if self.sharding is not None:
            raise ValueError("this GlobalBatchIterator places its batches on the mesh: use next(), or make one "
                             "without a mesh for host-local batches")
        return self._take()

    def get_state(self) -> dict:
        return {"next_index": self._next_index}

    def set_state(self, state: Mapping[str, Any]) -> None:
        index = int(state["next_index"])
        if not 0 <= index <= self._length:
            raise ValueError(f"iterator state {dict(state)} is outside the dataset's {self._length} batches")
        self._drop_pending()
        self._next_index = index

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop_pending()
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
