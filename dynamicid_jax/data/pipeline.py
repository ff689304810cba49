"""Input pipeline: precomputed shards -> seeded shuffled batches (one bucket each) -> global arrays.

    ds = anchor_dataset(folder, global_batch_size=16, seed=0)        # grain.MapDataset
    ds = reconfig_dataset(folder, global_batch_size=2, num_targets=32, seed=0)
    it = GlobalBatchIterator(ds, mesh)      # next(it) -> {name: jax.Array sharded on the batch}
    state = it.get_state(); ...; it.set_state(state)                 # exact resume
    it.close()

The datasets' elements are whole batches: `ds[j]` reads the j-th batch's records and decodes
them straight into fresh batch arrays (`BatchDecoder`: no per-record arrays, no stacking).
`GlobalBatchIterator` (`global_batches.py`) reads the next `prefetch` batches in its threads
and places them on the devices there too; its state is the index of the next batch the
caller has not received, whatever was read ahead.

Why a grain MapDataset over our own record index (not `TFRecordIterDataset`): the shard
sidecars written by the precompute (`*.tfrecord.index.json`) give every record's byte
offset, so records are random-access (`record_access.py`). That gives a true global shuffle
per host (not a window), an iterator state that is just the next batch index (exact, tiny,
independent of prefetch), and lets the reconfig stage gather a source and T targets of one
identity by index. Every read checks the record's CRCs.

Each host reads a disjoint subset of shard files (file i goes to host i % process_count) and
batches `global_batch_size / process_count` examples locally; the local batches become one
global array per feature.

Aspect-ratio buckets (shards made with precompute --buckets, `buckets.py`): batch j holds
records of one bucket, the same bucket on every host (`buckets.Schedule`: drawn from the seed
and the manifest's global counts, so hosts agree without talking), and each bucket's records
are their own shuffled, repeated stream. A dataset of one bucket (shards made without
--buckets) is exactly the unbucketed stream. Latents are each bucket's size, so the batches'
shapes change with the bucket (the trainer compiles its step once per bucket).

Arrays keep their stored dtypes (clip_image_features stays float16, halving host->device
traffic; the model casts). String features (key, caption, ...) are dropped unless asked for.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from dynamicid_jax.data import buckets, records, shards
from dynamicid_jax.data.global_batches import GlobalBatchIterator, to_global_batch  # noqa: F401 (this module's API)
from dynamicid_jax.data.record_access import (  # noqa: F401 (this module's API)
    BatchDecoder, CorruptRecords, ShardRecordSource, host_shard_files, read_or_substitute)
from dynamicid_jax.errors import ConfigError


def _array_specs(manifest: Mapping[str, Any], keep_strings: bool) -> list[records.FeatureSpec]:
    specs = records.specs_from_json(manifest["features"])
    return [s for s in specs if keep_strings or s.dtype != records.STRING]


def _process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    import jax

    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ConfigError(f"global_batch_size={global_batch_size} is not divisible by {process_count} hosts")
    return global_batch_size // process_count


@dataclasses.dataclass(frozen=True)
class _Buckets:
    """A host's view of the dataset's buckets: the schedule every host shares, this host's
    record indices of each bucket, and one batch decoder per bucket (its latent size)."""

    schedule: buckets.Schedule
    members: list[list[int]]  # bucket -> this host's record indices (ascending)
    decoders: list[BatchDecoder]
    sizes: tuple[buckets.Size, ...]  # () for shards made without buckets

    def name(self, k: int) -> str:
        """" of bucket WxH" for messages about one bucket of several; "" with one bucket."""
        return f" of bucket {buckets.format_size(self.sizes[k])}" if len(self.sizes) > 1 else ""


def bucket_feature_specs(manifest: Mapping[str, Any], keep_strings: bool = True) -> list[list[records.FeatureSpec]]:
    """Each bucket's record specs: the manifest's (bucket 0's) with the bucket's latent size."""
    specs = _array_specs(manifest, keep_strings)
    if "buckets" not in manifest:  # shards made without buckets: the one (square) bucket
        return [specs]
    sizes = buckets.manifest_sizes(manifest)
    latent = next(s for s in specs if s.name == records.LATENT_FEATURES[0])
    f = sizes[0][0] // latent.shape[0]  # the VAE factor: bucket 0's pixels over its latents
    return [records.with_latent_hw(specs, (h // f, w // f)) for h, w in sizes]


def _host_buckets(manifest: Mapping[str, Any], source: ShardRecordSource, seed: int, host: int,
                  keep_strings: bool, counts: Optional[Sequence[int]] = None) -> _Buckets:
    """`counts`: the buckets' weights in the schedule (default: the manifest's record counts)."""
    decoders = [BatchDecoder(specs) for specs in bucket_feature_specs(manifest, keep_strings)]
    if "buckets" not in manifest:  # shards made without buckets: one stream of every record
        return _Buckets(buckets.Schedule([len(source)], seed), [list(range(len(source)))], decoders, ())
    sizes = buckets.manifest_sizes(manifest)
    counts = manifest["buckets"]["counts"] if counts is None else counts
    members = buckets.host_members([entry["bucket"] for entry in source.entries], len(sizes))
    buckets.missing_on_host(members, counts, host, sizes)
    return _Buckets(buckets.Schedule(counts, seed), members, decoders, sizes)


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

    With buckets: batch j is the n-th batch of bucket k (`buckets.Schedule`), records
    n*b ... n*b + b - 1 of that bucket's own shuffled stream; `num_epochs` then counts
    len(records) / b batches per epoch, whichever buckets they hold.
    """
    import grain

    manifest = shards.load_manifest(folder, "anchor", expected_features)
    index, count = _process(process_index, process_count)
    source = ShardRecordSource(folder, host_shard_files(manifest, index, count))
    if len(source) == 0:
        raise ConfigError(f"host {index} of {count} has no anchor records in {folder}")
    groups = _host_buckets(manifest, source, seed, index, keep_strings)
    orders = [EpochPermutation(len(members), seed) for members in groups.members]
    length = len(source) * num_epochs if num_epochs is not None else 2**62
    b = _local_batch_size(global_batch_size, count)

    def read_batch(j: int) -> dict[str, np.ndarray]:  # elements n*b ... n*b + b - 1 of bucket k's stream
        k, n = groups.schedule(j)
        members, order = groups.members[k], orders[k]

        def read(i):
            return read_or_substitute(source, members[order(i)],
                                      lambda: (members[order(i + m)] for m in range(1, len(members))), corrupt)

        return groups.decoders[k]([read(i) for i in range(n * b, (n + 1) * b)])

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


def identity_pools(source: ShardRecordSource, min_images: int, indices: Optional[Sequence[int]] = None) -> IdentityPools:
    """The pools of the records `indices` of `source` (default: all; with buckets: one bucket's)."""
    by_identity: dict[str, list[int]] = {}
    source_of: dict[str, str] = {}
    for i in range(len(source)) if indices is None else indices:
        entry = source.entries[i]
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


def _identity_weights(manifest: Mapping[str, Any], min_images: int, folder) -> Optional[list[int]]:
    """With buckets: each bucket's records in identities with >= min_images images of that
    bucket, over all shards (so every host draws buckets alike); a bucket without such an
    identity is never drawn (its records are left out, as identities below min_images are).
    None without buckets (one bucket; the pools are checked as before)."""
    if "buckets" not in manifest:
        return None
    weights = [0] * len(manifest["buckets"]["sizes"])
    for shard in manifest["shards"]:
        for k, sizes in enumerate(shard["bucket_identity_sizes"]):
            weights[k] += sum(n for n in sizes if n >= min_images)
    if not any(weights):
        raise ConfigError(f"{folder}: no identity has {min_images} or more images in one aspect-ratio bucket "
                          f"({buckets.format_sizes(buckets.manifest_sizes(manifest))}); precompute with fewer buckets")
    return weights


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

    With buckets: batch j's examples all come from bucket k (`buckets.Schedule`), each
    identity's source and targets drawn among its records of that bucket (pools per bucket);
    buckets are drawn in proportion to the records of identities they hold min_images of.
    """
    import grain

    if not 0.0 <= kdef_probability <= 1.0:
        raise ConfigError(f"kdef_probability must be in [0, 1], got {kdef_probability}")
    manifest = shards.load_manifest(folder, "reconfig", expected_features)
    index, count = _process(process_index, process_count)
    source = ShardRecordSource(folder, host_shard_files(manifest, index, count))
    weights = _identity_weights(manifest, min_images, folder)
    groups = _host_buckets(manifest, source, seed, index, keep_strings, weights)
    draws = []
    for k, members in enumerate(groups.members):
        pools = identity_pools(source, min_images, members)
        if weights is not None and not weights[k]:  # never drawn: no identity has min_images images in it
            draws.append(None)
            continue
        if kdef_probability < 1.0 and not pools.identities["multi"]:
            raise ConfigError(f"host {index}: no 'multi' identities with >= {min_images} images{groups.name(k)} "
                              f"in {folder}")
        if kdef_probability > 0.0 and not pools.identities["kdef"]:
            raise ConfigError(
                f"host {index}: kdef_probability={kdef_probability} but no 'kdef' identities with >= {min_images} "
                f"images{groups.name(k)} in its shards of {folder}; pass kdef_probability=0 or add KDEF-style "
                "identity folders")
        draws.append(_DrawIdentityExample(pools, num_targets, kdef_probability, seed))
    b = _local_batch_size(global_batch_size, count)

    def read_batch(j: int) -> dict[str, np.ndarray]:  # examples j*b ... j*b + b - 1, all of bucket k
        k, _ = groups.schedule(j)
        pools, draw = draws[k].pools, draws[k]
        def same_identity(r):  # substitutes for a corrupt record r: the identity's next records
            members = pools.records[source.entries[r]["identity"]]
            at = members.index(r)
            return (members[(at + k) % len(members)] for k in range(1, len(members)))

        def read(r):
            return read_or_substitute(source, r, lambda: same_identity(r), corrupt)

        rows = groups.decoders[k]([read(int(r)) for i in range(j * b, (j + 1) * b) for r in draw(i)], (b, 1 + num_targets))
        batch = {f"source_{k}": np.ascontiguousarray(v[:, 0]) for k, v in rows.items()}
        batch.update({f"target_{k}": np.ascontiguousarray(v[:, 1:]) for k, v in rows.items()})
        return batch

    return grain.MapDataset.range(num_examples // b).map(read_batch)


