"""A linen module's random parameters from its initializers alone: traced once, memoised, and
optionally kept on disk.

flax's `init` runs the module forward on dummy inputs, whose activations nobody uses. Jitting
it makes XLA compile that whole forward (most of a tiny run's start-up:
benchmarks/design_choices_report.md); dropping the equations no output depends on leaves only
the initializers (5,501 -> 1,584 for the tiny UNet), which run op by op. The values are the
jitted init's up to float32 rounding: XLA fuses the float conversions differently (measured
equal for the UNet and VAE, a few ulp elsewhere; tests/test_random_init.py bounds it).

Each `init` is traced once per process and (module, argument types): the same trace gives the
parameter shapes (`abstract`) and the values (`evaluate`). Small trees are memoised per
process. With DYNAMICID_JAX_INIT_CACHE_DIR set (the Makefile and the tests set it beside the
XLA compile cache), small trees are also written there, keyed by a hash of the pruned program
(its printed jaxpr and constants), the random key and the jax/jaxlib versions and backend: the
same inputs to the same program, so a hit is the value op-by-op evaluation would give. The op
by op run costs seconds per process (one small XLA program per initializer, each compiled or
read from the compile cache), which every training, sampling and evaluation process paid.

The trace itself (flax running every module's setup and forward in Python) costs seconds per
process and module too, so the same folder keeps, per traced init, its output shapes and the
hash of its pruned program, keyed by what the trace is a function of: the module (its repr
holds every field, configs included), the argument types, and the code that traces it (this
package's sources, the jax, jaxlib, flax and numpy versions). A process whose trace and values
are on disk neither traces nor runs anything. A module whose repr holds a memory address (a
function field) has no stable key and is always traced.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pathlib
import zipfile
from typing import Any

import jax
import numpy as np

from dynamicid_jax.atomic_write import atomic_write_bytes

CACHE_ENV = "DYNAMICID_JAX_INIT_CACHE_DIR"
# Trees above this are neither memoised nor written to disk (SD1.5-size inits stay uncached:
# a real model's random parts are made once per run, and holding a second copy costs memory).
SMALL_BYTES = 64 << 20

_TRACES: dict = {}
_SUMMARIES: dict = {}
_VALUES: dict = {}


def _key_type(rng: jax.Array) -> tuple:
    return str(jax.random.key_impl(rng)), tuple(np.shape(rng))


def _signature(args: tuple) -> tuple:
    """The types a trace depends on: tree structure (static fields included), shapes, dtypes."""
    leaves, treedef = jax.tree.flatten(args)
    return str(treedef), tuple((np.shape(a), str(np.asarray(a).dtype)) for a in leaves)


def _values(args: tuple) -> tuple:
    return tuple(np.asarray(a).tobytes() for a in jax.tree.leaves(args))


def _trace_key(module, rng: jax.Array, args: tuple) -> tuple:
    """What a trace depends on within a process: the module, the key's type, the argument types."""
    return module, _key_type(rng), _signature(args)


def _trace(module, rng: jax.Array, args: tuple):
    """(pruned ClosedJaxpr of module.init(rng, *args), output tree of ShapeDtypeStructs)."""
    import jax.extend.core as jcore

    memo = _trace_key(module, rng, args)
    if memo in _TRACES:
        return _TRACES[memo]
    closed, shapes = jax.make_jaxpr(module.init, return_shape=True)(rng, *args)
    jaxpr = closed.jaxpr
    needed = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in needed for v in eqn.outvars):
            kept.append(eqn)
            needed.update(v for v in eqn.invars if isinstance(v, jcore.Var))
    pruned = jcore.ClosedJaxpr(jaxpr.replace(eqns=kept[::-1]), closed.consts)
    _TRACES[memo] = (pruned, shapes)
    return pruned, shapes


def _program_digest(pruned) -> str:
    """The pruned program as its values' cache sees it: printed jaxpr, constants, versions."""
    h = hashlib.sha256()
    h.update(f"{jax.__version__} {jax.lib.__version__} {jax.default_backend()}\n".encode())
    h.update(str(pruned.jaxpr).encode())
    for const in pruned.consts:
        h.update(np.asarray(const).tobytes())
    return h.hexdigest()


@functools.cache
def _code_digest() -> str:
    """What a trace of a given module is a function of besides the module: this package's
    sources and the versions of the libraries that run them."""
    import flax

    h = hashlib.sha256(f"{jax.__version__} {jax.lib.__version__} {flax.__version__} {np.__version__} "
                       f"{jax.default_backend()}\n".encode())
    package = pathlib.Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _trace_file(module, rng: jax.Array, args: tuple) -> pathlib.Path | None:
    """Where the trace's summary is kept: None without a cache folder or a stable module key."""
    folder = os.environ.get(CACHE_ENV)
    text = repr(module)
    if not folder or " at 0x" in text:
        return None
    h = hashlib.sha256(f"{_code_digest()}\n{text}\n{_key_type(rng)}\n{_signature(args)}".encode())
    return pathlib.Path(folder) / "traces" / f"{h.hexdigest()}.json"


def _tree_from_rows(rows) -> dict:
    tree: dict = {}
    for keys, shape, dtype in rows:
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
    return tree


def _write_summary(path: pathlib.Path, shapes, digest: str) -> None:
    """Kept only for a tree of dicts with string keys and builtin dtypes (what the json holds)."""
    entries, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rows = []
    for keys, leaf in entries:
        if not keys or not all(isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str) for k in keys):
            return
        if np.dtype(leaf.dtype).isbuiltin != 1:
            return
        rows.append([[k.key for k in keys], list(leaf.shape), np.dtype(leaf.dtype).str])
    if jax.tree.structure(_tree_from_rows(rows)) == treedef:
        atomic_write_bytes(path, json.dumps({"program": digest, "leaves": rows}).encode())


def _read_summary(path: pathlib.Path):
    """(shapes, program digest) from disk, or None for a missing, torn or foreign file."""
    try:
        saved = json.loads(path.read_text())
        return _tree_from_rows(saved["leaves"]), str(saved["program"])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _summary(module, rng: jax.Array, args: tuple):
    """(output tree of ShapeDtypeStructs, program digest): from the disk when there, else traced."""
    memo = _trace_key(module, rng, args)
    if memo not in _SUMMARIES:
        path = _trace_file(module, rng, args)
        found = _read_summary(path) if path is not None and path.is_file() else None
        if found is None:
            pruned, shapes = _trace(module, rng, args)
            found = shapes, _program_digest(pruned)
            if path is not None:
                _write_summary(path, *found)
        _SUMMARIES[memo] = found
    return _SUMMARIES[memo]


def abstract(module, rng: jax.Array, *args) -> Any:
    """module.init's output as ShapeDtypeStructs (shares the trace `evaluate` uses)."""
    return _summary(module, rng, args)[0]


def _nbytes(shapes) -> int:
    return sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(shapes))


def _cache_file(digest: str, rng: jax.Array, args: tuple) -> pathlib.Path | None:
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        return None
    h = hashlib.sha256(digest.encode())
    h.update(_key_type(rng)[0].encode() + np.asarray(jax.random.key_data(rng)).tobytes())
    for value in _values(args):  # the dummy inputs are zeros, but an initializer could read them
        h.update(value)
    return pathlib.Path(folder) / f"{h.hexdigest()}.npz"


def _read(path: pathlib.Path, shapes) -> list | None:
    """The cached leaves, or None when missing or not what the trace says (a torn or foreign
    file is recomputed and rewritten, never used)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            leaves = [f[f"arr_{i}"] for i in range(len(f.files))]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    expected = jax.tree.leaves(shapes)
    if len(leaves) != len(expected) or any(
            a.shape != s.shape or a.dtype != s.dtype for a, s in zip(leaves, expected)):
        return None
    return leaves


def evaluate(module, rng: jax.Array, *args) -> Any:
    """module.init(rng, *args) computed from its initializers only (see the module docstring).
    rng: a concrete key. Returns fresh containers (callers may edit the dicts)."""
    import jax.extend.core as jcore

    shapes, digest = _summary(module, rng, args)
    small = _nbytes(shapes) <= SMALL_BYTES
    memo = (module, _key_type(rng), np.asarray(jax.random.key_data(rng)).tobytes(), _signature(args),
            _values(args)) if small else None
    leaves = _VALUES.get(memo) if small else None
    if leaves is None:
        path = _cache_file(digest, rng, args) if small else None
        cached = _read(path, shapes) if path is not None and path.is_file() else None
        if cached is not None:
            leaves = list(jax.device_put(cached))
        else:
            pruned, _ = _trace(module, rng, args)  # traced here when the summary came from disk
            leaves = jcore.jaxpr_as_fun(pruned)(*jax.tree.leaves((rng, *args)))
            if path is not None and all(np.dtype(s.dtype).isbuiltin == 1 for s in jax.tree.leaves(shapes)):
                buffer = io.BytesIO()
                np.savez(buffer, *[np.asarray(x) for x in leaves])
                atomic_write_bytes(path, buffer.getvalue())
        if small:
            _VALUES[memo] = leaves
    return jax.tree.unflatten(jax.tree.structure(shapes), list(leaves))
