"""Check a precomputed dataset before a long run: `python data_pipelines/precompute.py --verify DIR`.

    report = verify_dataset(folder)     # {"ok": bool, "records": n, "problems": [...], ...}

Checks, for every shard the manifest lists: the shard and its index exist; the record
counts of the manifest, the index and the file agree; every record's framing CRCs (length
and payload); each record's payload parses as a tf.train.Example holding every feature of
the manifest's specs with its exact byte size (strings as UTF-8; with aspect-ratio buckets,
the specs of the bucket its index entry names); the file has no bytes
beyond its last record (a truncated or appended file); and, for the anchor stage, the null
features record. Every problem names the shard file and the byte offset (or the count that
differs); all of them are collected, not just the first.
"""

from __future__ import annotations

import os
import pathlib

from dynamicid_jax.data import pipeline, records, shards
from dynamicid_jax.errors import UserError

_MAX_LISTED = 50  # problems listed in the report (the count is always exact)


class DatasetCorruptError(UserError, ValueError):
    """`verify_dataset` found problems; the message gives the count and the first ones."""


def _check_records(path: pathlib.Path, entries: list[dict], per_bucket, problems: list[str]) -> int:
    """CRC-check and decode every record the index lists (with its bucket's specs, `per_bucket`);
    returns the number of good ones."""
    if not path.is_file():
        problems.append(f"{path}: shard file missing")
        return 0
    size, good, expected_end = path.stat().st_size, 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for entry in entries:
            offset = int(entry["offset"])
            try:
                payload = records.read_record_at(fd, offset, str(path))
                if len(payload) != int(entry["length"]):
                    raise records.RecordFormatError(f"{path}: record at offset {offset} is {len(payload)} bytes, "
                                                    f"the index says {entry['length']}")
                bucket = entry.get("bucket", 0)
                if not (isinstance(bucket, int) and 0 <= bucket < len(per_bucket)):
                    raise records.RecordFormatError(f"{path}: record at offset {offset}: bucket {bucket!r} is not "
                                                    f"one of the manifest's {len(per_bucket)}")
                records.decode_example(per_bucket[bucket], payload)
                good += 1
            except records.RecordFormatError as e:
                problems.append(str(e) if str(path) in str(e) else f"{path}: record at offset {offset}: {e}")
            except Exception as e:  # a payload whose CRC passes but does not parse as an Example
                problems.append(f"{path}: record at offset {offset} does not parse ({type(e).__name__}: {e})")
            expected_end = max(expected_end, offset + 16 + int(entry["length"]))
    finally:
        os.close(fd)
    if size != expected_end:
        problems.append(f"{path}: {size} bytes, but its records end at byte {expected_end} "
                        f"({'truncated' if size < expected_end else 'extra bytes after the last record'})")
    return good


def verify_dataset(folder: str | os.PathLike) -> dict:
    """Check every shard of a finished dataset folder -> report (see the module docstring).

    Raises ManifestError when there is no usable manifest at all (nothing to check against).
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise shards.ManifestError(f"--verify {folder}: not a folder")
    manifest = shards.read_json(folder / shards.MANIFEST) if (folder / shards.MANIFEST).is_file() else None
    if manifest is None:
        raise shards.ManifestError(f"{folder / shards.MANIFEST} not found (an unfinished precompute? run it again "
                                   "or --finalize)")
    manifest = shards.load_manifest(folder, manifest.get("stage"))  # format version and stage
    per_bucket = pipeline.bucket_feature_specs(manifest)
    problems: list[str] = []
    total_good = total_listed = 0
    for shard in manifest["shards"]:
        name = shard["file"]
        try:
            index = shards.read_shard_index(folder, name)
        except (shards.ManifestError, ValueError) as e:
            problems.append(f"{folder / name}: {e}")
            continue
        entries = index.get("records", [])
        counts = {"manifest": shard["num_records"], "index": index.get("num_records"), "index entries": len(entries)}
        if len(set(counts.values())) != 1:
            listed = ", ".join(f"{k} {v}" for k, v in counts.items())
            problems.append(f"{folder / name}: record counts differ ({listed})")
        total_listed += len(entries)
        total_good += _check_records(folder / name, entries, per_bucket, problems)
    if sum(s["num_records"] for s in manifest["shards"]) != manifest["num_records"]:
        problems.append(f"{folder / shards.MANIFEST}: num_records {manifest['num_records']} is not the sum of its "
                        f"shards' {sum(s['num_records'] for s in manifest['shards'])}")
    if "null_features" in manifest:  # the stage's classifier-free null inputs (anchor)
        null = manifest["null_features"]
        try:
            payloads = list(records.iter_records(folder / null["file"]))
            if len(payloads) != 1:
                raise records.RecordFormatError(f"{folder / null['file']}: {len(payloads)} records, expected 1")
            records.decode_example(records.specs_from_json(null["features"]), payloads[0])
        except (OSError, records.RecordFormatError) as e:
            problems.append(f"{folder / null['file']}: {e}")
    return {"ok": not problems, "folder": str(folder), "stage": manifest["stage"], "shards": len(manifest["shards"]),
            "records": total_listed, "good_records": total_good, "num_problems": len(problems),
            "problems": problems[:_MAX_LISTED]}


def raise_if_problems(report: dict) -> None:
    """DatasetCorruptError (a UserError: exit 2) summarising a report that found problems."""
    if report["ok"]:
        return
    shown = "; ".join(report["problems"][:3])
    more = f"; ... {report['num_problems'] - 3} more" if report["num_problems"] > 3 else ""
    raise DatasetCorruptError(f"--verify {report['folder']}: {report['num_problems']} problem(s) in "
                              f"{report['records']} records: {shown}{more}")
