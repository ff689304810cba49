"""Random access to precomputed records: which shard files a host reads, CRC-checked reads
by record index, opt-in skipping of corrupt records, and decoding straight into batch arrays.

    source = ShardRecordSource(folder, host_shard_files(manifest, host, hosts))
    batch = BatchDecoder(specs)([source[i] for i in indices])   # {name: (b, *shape)}

Random access works because the precompute's shard sidecars (`*.tfrecord.index.json`) give
every record's byte offset (`shards.py`); `data/pipeline.py` builds the training datasets on it.
"""

from __future__ import annotations

import os
import pathlib
import threading
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from dynamicid_jax.data import records, shards
from dynamicid_jax.errors import ConfigError


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


def read_or_substitute(source: ShardRecordSource, index: int, candidates, corrupt: Optional[CorruptRecords]) -> bytes:
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
