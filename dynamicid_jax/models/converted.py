"""The converted-folder format that `python -m dynamicid_jax.convert` writes and every model
loader reads (torch-free, no model import):

    DIR/dynamicid_converted.json   {"format": 1, "components": {name: {"config_class": ...,
                                                                        "config": {...}}}}
    DIR/<component>/               orbax checkpoint of that component's params (float32)

Configs are the loaders' frozen dataclasses, written as JSON and rebuilt from their field
annotations (`config_from_json`); an unknown field or another config class is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import types
import typing
from typing import Any

from dynamicid_jax.errors import ConfigError, MissingFileError
from dynamicid_jax.input_files import read_json

MARKER = "dynamicid_converted.json"
FORMAT_VERSION = 1


def is_converted(path: str | os.PathLike) -> bool:
    """True when `path` is a folder written by `python -m dynamicid_jax.convert`."""
    return (pathlib.Path(path) / MARKER).is_file()


def _read_marker(directory: pathlib.Path) -> dict:
    marker = directory / MARKER
    if not marker.is_file():
        return {"format": FORMAT_VERSION, "components": {}}
    data = read_json(marker, "converted-model marker")
    if not isinstance(data, dict):
        raise ConfigError(f"{marker}: not a converted-model marker (a JSON object)")
    if data.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{marker}: format {data.get('format')!r}, this code reads format {FORMAT_VERSION}")
    return data


def _jsonable(value: Any) -> Any:
    """Config dataclass -> JSON (tuples become lists, nested dataclasses dicts, dtypes names)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"config value {value!r} ({type(value).__name__}) cannot be written as JSON")


def _from_json(annotation: Any, value: Any) -> Any:
    """Inverse of `_jsonable` guided by the dataclass field annotation."""
    if value is None:
        return None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        candidates = [a for a in args if a is not type(None)]
        return _from_json(candidates[0], value) if len(candidates) == 1 else value
    if dataclasses.is_dataclass(annotation):
        return config_from_json(annotation, value)
    if isinstance(value, list):  # JSON arrays were tuples: configs stay hashable
        inner = args[0] if origin is tuple and args else Any
        return tuple(_from_json(inner, v) for v in value)
    return value


def config_from_json(config_cls: type, data: dict) -> Any:
    """Rebuild a (frozen, possibly nested) config dataclass from its JSON dict."""
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{config_cls.__name__}: converted config has unknown fields {unknown}")
    return config_cls(**{k: _from_json(hints[k], v) for k, v in data.items()})


def save_component(directory: str | os.PathLike, component: str, config: Any, params: Any) -> None:
    """Write one component's params (orbax) and config (JSON marker) under `directory`."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / component
    if target.exists():
        raise ConfigError(f"--out {directory}: {component}/ exists already; choose an empty --out folder")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, params)
    checkpointer.wait_until_finished()
    marker = _read_marker(directory)
    marker["components"][component] = {"config_class": type(config).__name__, "config": _jsonable(config)}
    (directory / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))


def record_family(directory: str | os.PathLike, family: str) -> None:
    """Write the base-model family (`base_models`' name) into the marker."""
    directory = pathlib.Path(directory).resolve()
    marker = _read_marker(directory)
    marker["family"] = family
    (directory / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))


def recorded_family(directory: str | os.PathLike) -> str | None:
    """The family the marker records (None: a folder converted before it was recorded)."""
    return _read_marker(pathlib.Path(directory).resolve()).get("family")


def read_converted_config(directory: str | os.PathLike, component: str, config_cls: type) -> Any:
    """The config of `component` in a converted folder (its JSON marker; no weights read)."""
    directory = pathlib.Path(directory).resolve()
    entry = _read_marker(directory)["components"].get(component)
    if entry is None or not (directory / component).is_dir():
        have = sorted(_read_marker(directory)["components"])
        raise MissingFileError(f"{directory} holds no converted {component!r} (it has {have})")
    if entry.get("config_class") != config_cls.__name__:
        raise ConfigError(
            f"{directory}/{component} was written with config {entry.get('config_class')!r}, "
            f"not {config_cls.__name__!r}"
        )
    return config_from_json(config_cls, entry["config"])


def load_converted(directory: str | os.PathLike, component: str, config_cls: type) -> tuple[Any, Any]:
    """(config, params) of `component` from a converted folder; params as numpy float32 trees."""
    import orbax.checkpoint as ocp

    config = read_converted_config(directory, component, config_cls)
    params = ocp.StandardCheckpointer().restore(pathlib.Path(directory).resolve() / component)
    return config, params
