"""Device mesh and parameter/batch shardings for every model, decided by path and shape.

Mesh axes: `data` (pure data parallelism) and `fsdp` (data parallel AND parameters split
across devices). The batch is split over both axes; a parameter is split over `fsdp` only.

Parameter placement is one ordered list of rules `(regex, strategy)`: the first regex that
matches (re.search) the '/'-joined parameter path decides. Strategies:
  "fsdp"       split the largest dimension divisible by the fsdp size over `fsdp`, when the
               tensor has at least `min_size` elements; otherwise replicate.
  "replicate"  a full copy on every device.
  a PartitionSpec, used as given (checked against the shape).
A path no rule matches is replicated. Nothing here knows a model: it works for the UNet,
VAE, CLIP towers and DynamicID's modules alike.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dynamicid_jax.errors import ConfigError

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)

Strategy = Union[str, PartitionSpec]
Rules = Sequence[tuple[str, Strategy]]

# Norm scales and biases are tiny and read everywhere: keep whole copies.
DEFAULT_RULES: tuple[tuple[str, Strategy], ...] = (
    (r"(^|/)(scale|bias)$", "replicate"),
    (r".*", "fsdp"),
)
# 2**16 float32 elements = 256 KiB: below this, splitting costs more in collectives than it saves.
DEFAULT_MIN_SIZE = 2**16


def make_mesh(data: int, fsdp: int, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all). One size may be -1 = the rest.

    Built with `jax.sharding.Mesh` directly so the axes are Auto (jax.make_mesh defaults to
    Explicit axes, under which `with_sharding_constraint` fails).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, size in ((DATA, data), (FSDP, fsdp)):
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ConfigError(f"mesh size {name}={size!r} must be a positive int or -1")
    if data == -1 and fsdp == -1:
        raise ConfigError("mesh sizes: at most one of data, fsdp may be -1")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if n % known:
            raise ConfigError(f"mesh sizes: {n} devices do not divide by {known} (data={data}, fsdp={fsdp})")
        data, fsdp = (n // known, fsdp) if data == -1 else (data, n // known)
    if data * fsdp != n:
        raise ConfigError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} does not match {n} devices")
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), (DATA, FSDP))


def path_name(path: tuple, sep: str = "/") -> str:
    """jax key path -> 'a/b/c' (dict keys, attribute names and sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return sep.join(parts)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> PartitionSpec:
    """Split the largest dimension divisible by `fsdp_size` over fsdp; P() if none or too small."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    # Largest first; on ties the later axis (output features) wins.
    for axis in sorted(range(len(shape)), key=lambda a: (-shape[a], -a)):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = FSDP
            return PartitionSpec(*spec)
    return PartitionSpec()


def _check_spec(name: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule for {name}: spec {spec} has more entries than shape {tuple(shape)}")
    for dim, axes in zip(shape, spec):
        if axes is None:
            continue
        axes = axes if isinstance(axes, tuple) else (axes,)
        unknown = [a for a in axes if a not in mesh.shape]
        if unknown:
            raise ValueError(f"sharding rule for {name}: mesh has no axis {unknown} (axes {tuple(mesh.shape)})")
        size = int(np.prod([mesh.shape[a] for a in axes]))
        if dim % size:
            raise ValueError(f"sharding rule for {name}: dimension {dim} of {tuple(shape)} does not divide by {size}")
    return spec


def param_partition_specs(
    params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, min_size: int = DEFAULT_MIN_SIZE
) -> Any:
    """PartitionSpec per leaf of `params` (arrays or ShapeDtypeStructs), same tree structure."""
    compiled = [(re.compile(pattern), strategy) for pattern, strategy in rules]
    fsdp_size = mesh.shape[FSDP]

    def spec_for(path, leaf) -> PartitionSpec:
        name, shape = path_name(path), tuple(leaf.shape)
        for pattern, strategy in compiled:
            if pattern.search(name):
                if isinstance(strategy, PartitionSpec):
                    return _check_spec(name, shape, strategy, mesh)
                if strategy == "fsdp":
                    return fsdp_spec(shape, fsdp_size, min_size)
                if strategy == "replicate":
                    return PartitionSpec()
                raise ValueError(f"sharding rule {pattern.pattern!r}: unknown strategy {strategy!r}")
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_for, params)


def param_shardings(
    params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, min_size: int = DEFAULT_MIN_SIZE
) -> Any:
    """NamedSharding per leaf of `params`, from `param_partition_specs`."""
    specs = param_partition_specs(params, mesh, rules, min_size)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp together; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (scalars, small shared inputs)."""
    return NamedSharding(mesh, PartitionSpec())
