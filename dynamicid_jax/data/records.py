"""The on-disk record format of precomputed features: tf.train.Example in TFRecord files.

Each record is one `tf.train.Example` whose features are all `bytes_list` of length one:
arrays as their raw little-endian bytes (C order), strings as UTF-8. Shapes and dtypes are
NOT repeated per record; they are described once, by a list of `FeatureSpec`, in the
dataset's `manifest.json`. Readers check every record's byte length against its spec.

Framing is TensorFlow's: uint64 length, masked CRC-32C of the length, payload, masked
CRC-32C of the payload. Framing CRCs come from the `tfrecord` package's writer, so
TensorFlow's reader accepts the shards; TensorFlow itself is not needed. Examples are
serialized with `deterministic=True` (features sorted by name), so the same values always
give the same bytes: that is what makes a resumed precompute byte-identical to an
uninterrupted one.

Stages (shapes with the dimensions the caller picks):
  anchor   (one record per captioned single-person image, stage-1 training):
    key                  ()            string   source file, relative to the input folder
    caption              ()            string
    input_ids            (L,)          int32    CLIP tokens of the caption (L = 77)
    vae_mean, vae_logvar (h, w, C)     float32  VAE moments, not a sample (C = 4)
    id_embedding         (D,)          float32  L2-normalised face embedding of the largest face
    clip_image_features  (N, W)        float16  penultimate CLIP-H tokens (257 x 1280), halved
    text_states          (L, T)        float32  optional: cached CLIP text hidden states
  reconfig (one record per image of an identity folder, stage-2 training):
    key, identity, source ("multi" | "kdef"), face_prompt   strings
    id_embedding, clip_image_features, vae_mean, vae_logvar as above
    landmark_image       (96, 96, 1)   float32  106 landmarks drawn on -1, scaled to [-1, 1]
    face_prompt_embedding (E,)         float32  pooled CLIP text feature of face_prompt (768)
  SDXL shards (the family's fields, `base_models.sdxl`): input_ids (2, L), one row per
  tokenizer, and in both stages
    original_size        (2,)          int32    (height, width) before resizing
    crop_top_left        (2,)          int32    (top, left) of the crop in the resized image
  Shards made with aspect-ratio buckets (`buckets.py`; precompute --buckets), both stages:
    bucket               ()            int32    index into the manifest's buckets["sizes"]
  and the latents (LATENT_FEATURES) have their bucket's (h, w): the manifest's "features"
  give bucket 0's, `with_latent_hw` any other's.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
from typing import BinaryIO, Iterator, Mapping, Sequence

import numpy as np

from dynamicid_jax.errors import UserError

# Bump when the meaning or layout of any stored feature changes; readers refuse a mismatch.
FORMAT_VERSION = 1

STRING = "string"
_ARRAY_DTYPES = ("float16", "float32", "int32", "int64", "uint8")


class RecordFormatError(UserError, ValueError):
    """A record or manifest does not match the expected feature specs: the message says which."""


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One stored feature: its name, per-record shape and dtype (numpy name or "string")."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    note: str = ""

    def __post_init__(self):
        if self.dtype != STRING and self.dtype not in _ARRAY_DTYPES:
            raise RecordFormatError(f"feature {self.name!r}: unsupported dtype {self.dtype!r}")
        if self.dtype == STRING and self.shape != ():
            raise RecordFormatError(f"feature {self.name!r}: strings are scalars, got shape {self.shape}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @functools.cached_property
    def num_bytes(self) -> int:
        """Payload size of an array feature (cached: the decoder asks for it per record)."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict:
        out = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.note:
            out["note"] = self.note
        return out

    @classmethod
    def from_json(cls, obj: Mapping) -> "FeatureSpec":
        return cls(obj["name"], tuple(obj["shape"]), obj["dtype"], obj.get("note", ""))


def anchor_specs(
    *,
    latent_hw: tuple[int, int],
    latent_channels: int,
    text_length: int,
    id_dim: int,
    clip_tokens: int,
    clip_width: int,
    text_states_width: int | None = None,
    input_ids_shape: tuple[int, ...] | None = None,
    extra: Sequence[FeatureSpec] = (),
) -> list[FeatureSpec]:
    """Feature specs of the anchor stage (every size from the models that make and read the
    shards); `text_states_width` set adds cached text states. A base-model family's own
    fields: `input_ids_shape` (default (text_length,); SDXL (2, L), one row per tokenizer)
    and `extra` (SDXL: original_size, crop_top_left), appended after SD1.5's."""
    h, w = latent_hw
    specs = [
        FeatureSpec("key", (), STRING, "source file relative to the input folder"),
        FeatureSpec("caption", (), STRING),
        FeatureSpec("input_ids", input_ids_shape or (text_length,), "int32", "CLIP tokens of the caption"),
        FeatureSpec("vae_mean", (h, w, latent_channels), "float32", "VAE posterior mean (unscaled)"),
        FeatureSpec("vae_logvar", (h, w, latent_channels), "float32", "VAE posterior log-variance"),
        FeatureSpec("id_embedding", (id_dim,), "float32", "L2-normalised embedding of the largest face"),
        FeatureSpec(
            "clip_image_features",
            (clip_tokens, clip_width),
            "float16",
            "penultimate CLIP vision hidden states, stored float16 to halve the size",
        ),
    ]
    if text_states_width is not None:
        specs.append(
            FeatureSpec("text_states", (text_length, text_states_width), "float32", "CLIP text hidden states")
        )
    return specs + list(extra)


def reconfig_specs(
    *,
    latent_hw: tuple[int, int],
    latent_channels: int,
    id_dim: int,
    clip_tokens: int,
    clip_width: int,
    landmark_size: int,
    prompt_dim: int,
    extra: Sequence[FeatureSpec] = (),
) -> list[FeatureSpec]:
    """Feature specs of the reconfiguration stage (every size from the models); `extra`: the
    base-model family's own fields, appended."""
    h, w = latent_hw
    return [
        FeatureSpec("key", (), STRING, "source file relative to the input folder"),
        FeatureSpec("identity", (), STRING, "identity folder name"),
        FeatureSpec("source", (), STRING, '"multi" or "kdef"'),
        FeatureSpec("face_prompt", (), STRING),
        FeatureSpec("face_prompt_embedding", (prompt_dim,), "float32", "pooled CLIP text feature"),
        FeatureSpec("id_embedding", (id_dim,), "float32", "L2-normalised embedding of the largest face"),
        FeatureSpec(
            "clip_image_features",
            (clip_tokens, clip_width),
            "float16",
            "penultimate CLIP vision hidden states, stored float16 to halve the size",
        ),
        FeatureSpec("landmark_image", (landmark_size, landmark_size, 1), "float32", "in [-1, 1]"),
        FeatureSpec("vae_mean", (h, w, latent_channels), "float32", "VAE posterior mean (unscaled)"),
        FeatureSpec("vae_logvar", (h, w, latent_channels), "float32", "VAE posterior log-variance"),
    ] + list(extra)


# The features shaped (h, w, C) by the VAE crop: their (h, w) is the record's bucket's / f.
LATENT_FEATURES = ("vae_mean", "vae_logvar")


def with_latent_hw(specs: Sequence[FeatureSpec], latent_hw: tuple[int, int]) -> list[FeatureSpec]:
    """`specs` with every latent feature (LATENT_FEATURES) at `latent_hw`: one bucket's specs."""
    return [dataclasses.replace(s, shape=(*latent_hw, *s.shape[2:])) if s.name in LATENT_FEATURES else s
            for s in specs]


def bucket_spec() -> FeatureSpec:
    return FeatureSpec("bucket", (), "int32", "index of the record's aspect-ratio bucket in the manifest's buckets")


def specs_to_json(specs: Sequence[FeatureSpec]) -> list[dict]:
    return [s.to_json() for s in specs]


def specs_from_json(objs: Sequence[Mapping]) -> list[FeatureSpec]:
    return [FeatureSpec.from_json(o) for o in objs]


def check_specs(found: Sequence[FeatureSpec], expected: Sequence[FeatureSpec], where: str) -> None:
    """Raise naming every feature whose presence, shape or dtype differs (notes are ignored)."""
    found_by_name = {s.name: s for s in found}
    problems = []
    for e in expected:
        f = found_by_name.get(e.name)
        if f is None:
            problems.append(f"{e.name}: missing (expected {e.dtype}{list(e.shape)})")
        elif (f.shape, f.dtype) != (e.shape, e.dtype):
            problems.append(f"{e.name}: found {f.dtype}{list(f.shape)}, expected {e.dtype}{list(e.shape)}")
    if problems:
        raise RecordFormatError(f"{where}: features do not match: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# tf.train.Example encoding


def tfrecord_module(name: str):
    """`tfrecord.<name>` (example_pb2, writer), imported without torch (`torchless`)."""
    from dynamicid_jax.torchless import import_hiding_torch

    import_hiding_torch("tfrecord")
    return import_hiding_torch(f"tfrecord.{name}")


def encode_example(specs: Sequence[FeatureSpec], values: Mapping[str, object]) -> bytes:
    """Serialize one record; every spec'd feature must be present with its exact shape/dtype."""
    example_pb2 = tfrecord_module("example_pb2")

    extra = set(values) - {s.name for s in specs}
    if extra:
        raise RecordFormatError(f"values for features not in the specs: {sorted(extra)}")
    feature = {}
    for spec in specs:
        if spec.name not in values:
            raise RecordFormatError(f"feature {spec.name!r} missing from the record")
        value = values[spec.name]
        if spec.dtype == STRING:
            if not isinstance(value, str):
                raise RecordFormatError(f"feature {spec.name!r}: expected str, got {type(value).__name__}")
            payload = value.encode("utf-8")
        else:
            arr = np.asarray(value)
            if arr.shape != spec.shape or arr.dtype != np.dtype(spec.dtype):
                raise RecordFormatError(
                    f"feature {spec.name!r}: got {arr.dtype}{list(arr.shape)}, "
                    f"expected {spec.dtype}{list(spec.shape)}"
                )
            payload = np.ascontiguousarray(arr, dtype=np.dtype(spec.dtype).newbyteorder("<")).tobytes()
        feature[spec.name] = example_pb2.Feature(bytes_list=example_pb2.BytesList(value=[payload]))
    example = example_pb2.Example(features=example_pb2.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def decode_example(specs: Sequence[FeatureSpec], data: bytes) -> dict[str, object]:
    """Parse one record into {name: numpy array | str}; checks presence and byte sizes."""
    example_pb2 = tfrecord_module("example_pb2")

    example = example_pb2.Example()
    example.ParseFromString(bytes(data))
    feats = example.features.feature
    out: dict[str, object] = {}
    for spec in specs:
        if spec.name not in feats:
            raise RecordFormatError(f"record lacks feature {spec.name!r}")
        values = feats[spec.name].bytes_list.value
        if len(values) != 1:
            raise RecordFormatError(f"feature {spec.name!r}: expected one bytes value, got {len(values)}")
        payload = values[0]
        if spec.dtype == STRING:
            out[spec.name] = payload.decode("utf-8")
            continue
        if len(payload) != spec.num_bytes:
            raise RecordFormatError(
                f"feature {spec.name!r}: {len(payload)} bytes, expected {spec.num_bytes} "
                f"for {spec.dtype}{list(spec.shape)}"
            )
        dtype = np.dtype(spec.dtype).newbyteorder("<")
        out[spec.name] = np.frombuffer(payload, dtype=dtype).astype(spec.dtype).reshape(spec.shape)
    return out


# ---------------------------------------------------------------------------------------------
# TFRecord framing


def _masked_crc(data: bytes) -> bytes:
    return tfrecord_module("writer").TFRecordWriter.masked_crc(data)


def write_record(f: BinaryIO, payload: bytes) -> tuple[int, int]:
    """Append one framed record; returns (offset of the record, payload length)."""
    offset = f.tell()
    length = struct.pack("<Q", len(payload))
    f.write(length)
    f.write(_masked_crc(length))
    f.write(payload)
    f.write(_masked_crc(payload))
    return offset, len(payload)


def read_record_at(fd: int, offset: int, path: str = "<file>") -> bytes:
    """Read and CRC-check the record that starts at byte `offset` of an open file descriptor.

    Uses `os.pread` (no shared file position), so prefetch threads may share one descriptor.
    """
    header = os.pread(fd, 12, offset)
    if len(header) != 12:
        raise RecordFormatError(f"{path}: truncated record header at offset {offset}")
    length_bytes, length_crc = header[:8], header[8:]
    if _masked_crc(length_bytes) != length_crc:
        raise RecordFormatError(f"{path}: length CRC mismatch at offset {offset}")
    (length,) = struct.unpack("<Q", length_bytes)
    remaining = os.fstat(fd).st_size - offset - 12
    if length + 4 > remaining:  # checked before allocating: a hostile length would ask for exabytes
        raise RecordFormatError(f"{path}: record at offset {offset} claims {length} bytes, the file holds "
                                f"{max(remaining - 4, 0)} more")
    body = os.pread(fd, length + 4, offset + 12)
    if len(body) != length + 4:
        raise RecordFormatError(f"{path}: truncated record at offset {offset}")
    payload, payload_crc = body[:length], body[length:]
    if _masked_crc(payload) != payload_crc:
        raise RecordFormatError(f"{path}: payload CRC mismatch at offset {offset}")
    return payload


def iter_records(path: str | os.PathLike) -> Iterator[bytes]:
    """Every record payload of a TFRecord file in order, CRC-checked."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            payload = read_record_at(fd, offset, str(path))
            yield payload
            offset += 16 + len(payload)
    finally:
        os.close(fd)
