"""A training config is user input: checked whole before anything compiles or is written.

Two moments, both before `trainer.train` builds a module or makes the workdir:

  check_config_argv(argv)   on the raw command line, before absl parses it: the `--config`
                            file exists and its `get_config(ARG)` accepts ARG; every
                            `--config.a.b=V` override names an existing field (else the one
                            line says which part is unknown and what it probably meant).
                            ml_collections would otherwise raise these as tracebacks or as a
                            traceback flattened into the "one" line.
  check_config(config)      on the parsed config: counts positive, learning rates, optimizer
                            constants and loss weights finite and in range, enumerations
                            known, the resolution one the VAE can encode.

Each fault is a `ConfigError` (exit 2, one line) naming the `--config...` field and the value.
Value types are absl's job: an override that does not parse as the field's type already
fails there with one line naming the flag.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from typing import Any, Iterable, Optional, Sequence

from dynamicid_jax.errors import ConfigError

CONFIG_FLAG = "--config"


def config_spec(argv: Sequence[str]) -> Optional[str]:
    """The value of `--config` (last one wins, as in absl) or None when absent."""
    spec = None
    for i, arg in enumerate(argv):
        if arg.startswith(CONFIG_FLAG + "="):
            spec = arg[len(CONFIG_FLAG) + 1:]
        elif arg == CONFIG_FLAG and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def load_config_file(spec: str):
    """`PATH[:ARG]` -> the ConfigDict its `get_config([ARG])` returns (as ml_collections'
    config_flags reads it: PATH relative to the working folder, ARG after the first ':').
    ConfigError naming the file for a missing or unreadable file or a refused ARG."""
    path, sep, arg = spec.partition(":")
    if not path:
        raise ConfigError(f"{CONFIG_FLAG}={spec}: no config file named (e.g. --config=configs/anchor.py)")
    if not os.path.isfile(path):
        where = "is a folder" if os.path.isdir(path) else "file not found"
        raise ConfigError(f"{CONFIG_FLAG}={spec}: {path}: {where} (relative paths start at {os.getcwd()})")
    module_spec = importlib.util.spec_from_file_location("_checked_config", path)
    if module_spec is None:
        raise ConfigError(f"{CONFIG_FLAG}={spec}: {path} is not a Python config file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{CONFIG_FLAG}={spec}: {path} line {e.lineno}: {e.msg}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"{CONFIG_FLAG}={spec}: {path} defines no get_config()")
    try:
        return module.get_config(arg) if sep else module.get_config()
    except (ValueError, TypeError) as e:  # a config argument get_config does not take
        raise ConfigError(f"{CONFIG_FLAG}={spec}: {e}") from None


def _overrides(argv: Sequence[str]) -> Iterable[str]:
    """Field paths of the `--config.a.b[=V]` overrides (also `--noconfig.flag` of booleans)."""
    for arg in argv:
        name = arg.split("=", 1)[0]
        for prefix in (CONFIG_FLAG + ".", "--no" + CONFIG_FLAG[2:] + "."):
            if name.startswith(prefix):
                yield name[len(prefix):]


def check_field_path(config, field_path: str) -> None:
    """ConfigError unless `a.b.c` (indices like `x[0]` allowed) names a field of `config`;
    the message gives the closest existing name."""
    node, walked = config, []
    for part in field_path.split("."):
        name = part.split("[", 1)[0]
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if name not in keys:
            prefix = ".".join([CONFIG_FLAG] + walked)
            if not hasattr(node, "keys"):
                raise ConfigError(f"{prefix}.{part}: {prefix} is a value ({node!r}), it has no field {name!r}")
            close = difflib.get_close_matches(name, [str(k) for k in keys], n=1)
            hint = f"; did you mean {prefix}.{close[0]}?" if close else f"; its fields: {', '.join(map(str, keys))}"
            raise ConfigError(f"{prefix}.{part}: no such config field{hint}")
        node = node[name]
        walked.append(name)


def check_config_argv(argv: Sequence[str]) -> None:
    """The config file and every override path of a train.py command line (see the module
    docstring); returns quietly when there is no `--config` (absl then says it is required)."""
    spec = config_spec(argv)
    if spec is None:
        return
    config = load_config_file(spec)
    for field_path in _overrides(argv):
        check_field_path(config, field_path)


# ---------------------------------------------------------------- values


def _number(config, field: str) -> Any:
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def _require(config, field: str, ok, rule: str) -> None:
    value = _number(config, field)
    good = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and ok(value)
    if not good:
        raise ConfigError(f"{CONFIG_FLAG}.{field}={value!r}: must be {rule}")


def _integer(config, field: str, minimum: int) -> None:
    value = _number(config, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        rule = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{CONFIG_FLAG}.{field}={value!r}: must be {rule}")


def _choice(config, field: str, choices: Sequence[str]) -> None:
    value = _number(config, field)
    if value not in choices:
        raise ConfigError(f"{CONFIG_FLAG}.{field}={value!r}: must be one of {', '.join(map(repr, choices))}")


def _has(config, field: str) -> bool:
    node = config
    for part in field.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


POSITIVE_COUNTS = ("total_steps", "data.global_batch_size", "data.num_threads", "checkpoint.every_steps",
                   "checkpoint.keep", "log_every_steps", "optimizer.accumulation_steps", "data.num_targets",
                   "data.min_images")
NON_NEGATIVE_COUNTS = ("data.prefetch", "optimizer.warmup_steps", "sharding.min_size")
NON_NEGATIVE_REALS = ("optimizer.lr", "optimizer.weight_decay", "optimizer.grad_clip", "loss.consistency_weight")
PROBABILITIES = ("loss.face_drop", "loss.text_drop", "loss.both_drop", "data.kdef_probability")


def check_config(config) -> None:
    """Every value rule of a stage config (configs/anchor.py, configs/reconfig.py); fields a
    stage does not have are skipped. ConfigError naming the first bad field."""
    for field in POSITIVE_COUNTS:
        if _has(config, field):
            _integer(config, field, 1)
    for field in NON_NEGATIVE_COUNTS:
        if _has(config, field):
            _integer(config, field, 0)
    for field in NON_NEGATIVE_REALS:
        if _has(config, field):
            _require(config, field, lambda v: v >= 0, "a finite number >= 0")
    for field in PROBABILITIES:
        if _has(config, field):
            _require(config, field, lambda v: 0 <= v <= 1, "a probability in [0, 1]")
    if all(_has(config, f) for f in PROBABILITIES[:3]):
        total = sum(_number(config, f) for f in PROBABILITIES[:3])
        if total > 1:
            raise ConfigError(f"{CONFIG_FLAG}.loss.face_drop + text_drop + both_drop = {total:g}: the drops are "
                              "exclusive draws and must sum to <= 1")
    _require(config, "optimizer.b1", lambda v: 0 <= v < 1, "in [0, 1)")
    _require(config, "optimizer.b2", lambda v: 0 <= v < 1, "in [0, 1)")
    _require(config, "optimizer.eps", lambda v: v > 0, "a finite number > 0")
    _choice(config, "optimizer.schedule", ("constant", "cosine"))
    _choice(config, "dtype", ("float32", "bfloat16"))
    _choice(config, "nonfinite", ("stop", "skip"))
    _integer(config, "seed", 0)
    check_resolution(config)


def check_resolution(config) -> None:
    """data.resolution: a positive multiple of the VAE factor of config.model (what the
    encoder can take; the shards' latents are resolution / factor on a side)."""
    factor = 2 ** (len(config.model.vae.block_out_channels) - 1)
    value = config.data.resolution
    if not isinstance(value, int) or isinstance(value, bool) or value < factor or value % factor:
        raise ConfigError(f"{CONFIG_FLAG}.data.resolution={value!r}: not a positive multiple of the VAE "
                          f"factor {factor} (the pixel side the shards were made at)")
