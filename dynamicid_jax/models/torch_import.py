"""Reading PyTorch-layout checkpoints into our Flax parameter trees.

One strict mechanism for every model: walk OUR parameter tree (from `jax.eval_shape`, so no
init runs), ask a per-model `key_fn` which PyTorch key (and which transform) fills each leaf,
check the shape, and at the end report every missing, unexpected and mis-shaped key at once.
There is no fallback to random init: an incomplete checkpoint is an error that names keys.

`.safetensors` files are parsed here directly (no torch; bfloat16 too), their header checked
against the file before anything is allocated. `.bin`/`.ckpt`/`.pt` pickles are read by the
restricted `torch_pickle` reader (no torch, no code the pickle names is ever run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Callable, Iterable, Mapping, Optional, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from dynamicid_jax.errors import MissingFileError, UserError
from dynamicid_jax.input_files import FileFormatError, check_file, read_json

StateDict = dict[str, np.ndarray]
Transform = Callable[[np.ndarray], np.ndarray]
# key_fn(flax_path) -> (torch_key, transform) or None when the leaf has no counterpart.
KeyFn = Callable[[tuple[str, ...]], Optional[tuple[str, Transform]]]


class WeightImportError(UserError, ValueError):
    """A checkpoint does not match the model: the message lists every offending key."""


def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> flax kernel (in, out)."""
    return np.ascontiguousarray(w.T)


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (out, in, kh, kw) -> flax kernel (kh, kw, in, out).

    A 2-D (out, in) weight (a Linear standing in for a 1x1 conv, as some checkpoints store
    attention projections) becomes (1, 1, in, out).
    """
    if w.ndim == 2:
        w = w[:, :, None, None]
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def linear_from_conv1x1(w: np.ndarray) -> np.ndarray:
    """torch 1x1 Conv2d weight (out, in, 1, 1) or Linear (out, in) -> flax Dense kernel."""
    if w.ndim == 4:
        w = w[:, :, 0, 0]
    return linear_kernel(w)


@dataclasses.dataclass(frozen=True)
class RowSlice:
    """Rows [start, stop) of a fused torch weight (e.g. to_kv -> to_k, to_v), then `then`.
    A value, not a closure, so an exporter can write the rows back (`export_state_dict`)."""

    start: int
    stop: int
    then: Transform = linear_kernel

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return self.then(w[self.start:self.stop])


def row_slice(start: int, stop: int, then: Transform = linear_kernel) -> Transform:
    """Take rows [start, stop) of a fused torch weight (e.g. to_kv -> to_k, to_v), then convert."""
    return RowSlice(start, stop, then)


def _to_numpy_tree(obj, prefix: str = "") -> StateDict:
    """Tensors (numpy arrays from `torch_pickle`) of a possibly nested mapping; nested keys are
    joined with "." (e.g. the DynamicID SAA.bin {"proj_module": {...}, "SAA_module": {...}} ->
    "proj_module.proj.0.weight"). Floating point arrives as float32; other values are skipped."""
    out: StateDict = {}
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            floating = np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16
            out[prefix + str(k)] = v.astype(np.float32) if floating else v
        elif isinstance(v, Mapping):
            out.update(_to_numpy_tree(v, f"{prefix}{k}."))
    return out


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


SAFETENSORS_HEADER_LIMIT = 100 * 2**20  # the format's own limit (safetensors refuses larger headers too)


def safetensors_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """(tensors {key: {"dtype", "shape", "data_offsets"}}, metadata {str: str}, data start) of
    a .safetensors file, every claim checked against the file before anything is allocated:
    the 8-byte header length against the file size, the header as a JSON object, each
    tensor's dtype known, its shape non-negative ints whose bytes equal its offsets' span,
    and the span inside the data. FileFormatError naming the file otherwise."""
    size = check_file(path, "safetensors file")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < header_len <= min(size - 8, SAFETENSORS_HEADER_LIMIT):
            raise FileFormatError(f"{path}: not a .safetensors file (its 8-byte header length {header_len} does not "
                                  f"fit the {size}-byte file)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FileFormatError(f"{path}: not a .safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: not a .safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FileFormatError(f"{path}: corrupt .safetensors header (__metadata__ must map names to strings)")
    data_size = size - 8 - header_len
    for key, info in header.items():
        problem = _tensor_entry_problem(info, data_size)
        if problem:
            raise FileFormatError(f"{path}: corrupt .safetensors header: tensor {key!r}: {problem}")
    return header, metadata, 8 + header_len


def _tensor_entry_problem(info, data_size: int) -> Optional[str]:
    """Why one header entry cannot be read from `data_size` data bytes, or None."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        return "needs dtype, shape and data_offsets"
    if info["dtype"] not in _SAFETENSORS_DTYPES:
        return f"unsupported dtype {info['dtype']!r}"
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in shape):
        return f"shape {shape!r} is not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        return f"data_offsets {offsets!r} are not inside the {data_size} data bytes"
    expected = int(np.prod(shape, dtype=object)) * np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).itemsize
    if offsets[1] - offsets[0] != expected:
        return f"shape {shape} of {info['dtype']} needs {expected} bytes, its offsets span {offsets[1] - offsets[0]}"
    return None


def read_safetensors(path: str | os.PathLike, prefix: str = "") -> StateDict:
    """Tensors of a .safetensors file whose key starts with `prefix` (stripped), read from a
    memory map, so a 2-7 GB single file yields one component without reading the rest.
    Floating point (float16, bfloat16, float64) arrives as float32, integers as stored.

    Parses the format directly (8-byte header length, JSON header, raw little-endian data)
    because safetensors' numpy reader rejects bfloat16, which some fine-tunes are saved in;
    the header is checked whole first (`safetensors_header`).
    """
    header, _, data_start = safetensors_header(path)
    # np.memmap refuses an empty region (a file of zero-size tensors only).
    data = (np.memmap(path, dtype=np.uint8, mode="r", offset=data_start)
            if os.path.getsize(path) > data_start else np.zeros(0, np.uint8))
    out: StateDict = {}
    for key, info in header.items():
        if not key.startswith(prefix):
            continue
        start, stop = info["data_offsets"]
        value = np.frombuffer(data[start:stop], dtype=_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        floating = np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16
        out[key[len(prefix):]] = value.astype(np.float32) if floating else value.copy()
    return out


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a checkpoint file into {key: float32/int numpy array}.

    .safetensors: read without torch (`read_safetensors`). .bin/.ckpt/.pt/.pth: torch pickle
    (the restricted `torch_pickle` reader), with a top-level "state_dict" unwrapped. `*.index.json` (sharded
    checkpoints): every shard it names. Floating-point tensors arrive as float32.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"weight file not found: {path}")
    if path.name.endswith(".index.json"):  # sharded: {"weight_map": {key: shard file name}}
        index = read_json(path, "weight index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FileFormatError(f"{path}: not a weight index (no 'weight_map' of key -> shard file)")
        state_dict: StateDict = {}
        for shard in sorted(set(weight_map.values())):
            if pathlib.PurePath(shard).name != shard:  # a shard is a file beside the index, never elsewhere
                raise FileFormatError(f"{path}: shard {shard!r} is not a file name beside the index")
            state_dict.update(read_state_dict(path.parent / shard))
        missing = sorted(set(weight_map) - set(state_dict))
        if missing:
            raise WeightImportError(f"{path}: keys listed in the index but absent from their shards: {missing[:10]}")
        return state_dict
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".bin", ".ckpt", ".pt", ".pth"):
        # The restricted reader: plain tensors in containers, no global the pickle names is run.
        from dynamicid_jax.models import torch_pickle

        obj = torch_pickle.load(path)
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise FileFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
        return _to_numpy_tree(obj)
    raise WeightImportError(f"unsupported weight file type {path.suffix!r}: {path}")


def find_weight_file(folder: str | os.PathLike, stems: Sequence[str]) -> pathlib.Path:
    """First existing weight file in folder: `<stem>.safetensors`, a sharded
    `<stem>.safetensors.index.json`, then `<stem>.bin` (or its `.bin.index.json`)."""
    folder = pathlib.Path(folder)
    for ext in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"):
        for stem in stems:
            candidate = folder / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
    names = ", ".join(f"{s}.safetensors|.bin[.index.json]" for s in stems)
    raise MissingFileError(f"no weight file ({names}) in {folder}")


def import_params(
    abstract_params,
    state_dict: Mapping[str, np.ndarray],
    key_fn: KeyFn,
    *,
    model_name: str,
    ignore_unexpected: Iterable[str] = (),
    dtype=np.float32,
):
    """Fill a parameter tree shaped like `abstract_params` from a PyTorch state dict.

    abstract_params: nested dict of arrays or ShapeDtypeStructs (from jax.eval_shape).
    key_fn: maps each flax path (tuple of names) to (torch_key, transform).
    ignore_unexpected: regexes of torch keys that may stay unused (e.g. buffers like
      `position_ids`); anything else left unused is an error.
    Returns a nested dict of numpy arrays in `dtype`.
    """
    flat = traverse_util.flatten_dict(abstract_params)
    ignore = [re.compile(p) for p in ignore_unexpected]
    used: set[str] = set()
    missing, misshaped, out = [], [], {}
    for path, leaf in flat.items():
        mapped = key_fn(path)
        name = "/".join(path)
        if mapped is None:
            missing.append(f"{name} (no source key)")
            continue
        torch_key, transform = mapped
        if torch_key not in state_dict:
            missing.append(f"{torch_key} (for {name})")
            continue
        used.add(torch_key)
        value = np.asarray(transform(state_dict[torch_key]))
        if tuple(value.shape) != tuple(leaf.shape):
            misshaped.append(
                f"{torch_key}: checkpoint {tuple(state_dict[torch_key].shape)} -> {tuple(value.shape)}, "
                f"model {name} expects {tuple(leaf.shape)}"
            )
            continue
        out[path] = value.astype(dtype)
    unexpected = sorted(k for k in state_dict if k not in used and not any(p.search(k) for p in ignore))
    if missing or unexpected or misshaped:
        parts = [f"{model_name}: checkpoint does not match the model"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                shown = keys[:40]
                more = f" ... and {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
                parts.append(f"{len(keys)} {title}: " + ", ".join(shown) + more)
        raise WeightImportError("\n  ".join(parts))
    return traverse_util.unflatten_dict(out)


_INVERSES: dict[Callable, Transform] = {
    identity: identity,
    linear_kernel: lambda k: np.ascontiguousarray(k.T),
    conv_kernel: lambda k: np.ascontiguousarray(np.transpose(k, (3, 2, 0, 1))),
}


def export_state_dict(params, key_fn: KeyFn, *, keep: Callable[[str], bool] = lambda key: True) -> StateDict:
    """The inverse of `import_params`: a parameter tree -> the PyTorch state dict `key_fn`
    reads it from (each leaf through its transform's inverse; `RowSlice` leaves written back
    into their fused weight, whose slices must tile its rows from 0). Leaves whose key
    `keep` refuses are left out. ValueError for a leaf with no key or a transform with no
    inverse: an export must never write a file its own import would not read back."""
    out: StateDict = {}
    fused: dict[str, list[tuple[int, int, np.ndarray]]] = {}
    for path, value in traverse_util.flatten_dict(params).items():
        mapped = key_fn(path)
        if mapped is None:
            raise ValueError(f"no export key for {'/'.join(path)}")
        key, transform = mapped
        if not keep(key):
            continue
        value = np.asarray(value, np.float32)
        if isinstance(transform, RowSlice):
            fused.setdefault(key, []).append((transform.start, transform.stop, _INVERSES[transform.then](value)))
        elif transform in _INVERSES:
            out[key] = _INVERSES[transform](value)
        else:
            raise ValueError(f"{'/'.join(path)} -> {key}: its transform has no inverse")
    for key, slices in fused.items():
        slices.sort(key=lambda s: s[0])
        rows = [s[0] for s in slices] + [slices[-1][1]]
        if rows[0] != 0 or any(s[1] != nxt for s, nxt in zip(slices, rows[1:])):
            raise ValueError(f"{key}: exported row slices {[s[:2] for s in slices]} do not tile the weight")
        out[key] = np.concatenate([s[2] for s in slices], axis=0)
    return out


def abstract_shapes(init_fn: Callable, *args, **kwargs):
    """Parameter shapes of `init_fn(*args)` without running it (jax.eval_shape)."""
    return jax.eval_shape(init_fn, *args, **kwargs)
