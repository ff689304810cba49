"""Where a model loader's weights come from: the one dispatch `load_unet`, `load_vae`,
`load_text_encoder` and `load_vision_encoder` share.

A path is, in the order tried: a converted folder (`models/converted.py`, orbax, no torch),
a single-file SD1.5 or SDXL checkpoint (`models/single_file.py`), a diffusers pipeline folder or a
component folder (`config.json` + weights, read by `models/torch_import.py`).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Sequence

from dynamicid_jax.errors import MissingFileError
from dynamicid_jax.input_files import FileFormatError, read_json
from dynamicid_jax.models import converted
from dynamicid_jax.models.single_file import SDXL, detect_family, extract_component
from dynamicid_jax.models.torch_import import StateDict, find_weight_file, read_state_dict


def read_component(
    path: str | os.PathLike,
    *,
    name: str,
    subfolder: str,
    weight_stems: Sequence[str],
    config_cls: type,
    config_from_json: Callable[[dict], Any],
    import_fn: Callable[[Any, StateDict], Any],
    single_file: bool = False,
    config: Any = None,
    single_file_config: Callable[[StateDict, str], Any] | None = None,
) -> tuple[Any, Any]:
    """The one dispatch every model loader shares -> (config, params).

    path, in the order tried: a folder written by `python -m dynamicid_jax.convert` (orbax, no
    torch); with `single_file`, a single checkpoint file (SD1.5 or SDXL `.safetensors`/`.ckpt`,
    the component split out by `single_file.extract_component`; it carries no config, so
    `config=`, the base-model family's (`base_models.single_file_config`), or else for SDXL
    `single_file_config(state_dict, path)`, the architecture read off the shapes); a pipeline
    folder holding `subfolder/config.json`; a component
    folder holding `config.json` (read by `config_from_json`). name: the component (`unet`,
    `vae`, `text_encoder`, `vision_encoder`), as convert and single_file spell it.
    import_fn(config, state_dict) -> params raises WeightImportError on any key mismatch.
    """
    path = pathlib.Path(path)
    if config is not None and not path.is_file():
        raise ValueError(f"loading {name}: config= is only for single-file checkpoints; {path} carries its own config")
    if converted.is_converted(path):
        return converted.load_converted(path, name, config_cls)
    if path.is_file():
        if not single_file:
            raise ValueError(f"loading {name}: {path} is a file; {name} weights come as a folder with config.json")
        family = detect_family(path)
        state_dict = extract_component(path, name, family)
        if config is None:
            if single_file_config is None or family != SDXL:  # only SDXL's shapes follow known conventions
                raise ValueError(f"loading {name}: {path} is a {family} single file, which carries no config: pass "
                                 "config= (the family's, `base_models.single_file_config`)")
            config = single_file_config(state_dict, str(path))
        return config, import_fn(config, state_dict)
    folder = _config_folder(path, name=name, subfolder=subfolder)
    config = config_from_json(_config_json(folder, name))
    return config, import_fn(config, read_state_dict(find_weight_file(folder, weight_stems)))


def read_config(path: str | os.PathLike, *, name: str, subfolder: str, config_cls: type,
                config_from_json: Callable[[dict], Any]) -> Any:
    """The config `read_component` would build for `path`, without reading any weights; None
    for a single-file checkpoint (it carries no config: the base-model family decides)."""
    path = pathlib.Path(path)
    if converted.is_converted(path):
        return converted.read_converted_config(path, name, config_cls)
    if path.is_file():
        return None
    return config_from_json(_config_json(_config_folder(path, name=name, subfolder=subfolder), name))


def _config_json(folder: pathlib.Path, name: str) -> dict:
    """folder/config.json, size-bounded; FileFormatError naming it unless a JSON object."""
    config_json = read_json(folder / "config.json", f"{name} config")
    if not isinstance(config_json, dict):
        raise FileFormatError(f"{folder / 'config.json'}: not a {name} config (a JSON object)")
    return config_json


def _config_folder(path: pathlib.Path, *, name: str, subfolder: str) -> pathlib.Path:
    """`path/subfolder` or `path` itself, whichever holds config.json; MissingFileError else."""
    for folder in (path / subfolder, path):
        if (folder / "config.json").is_file():
            return folder
    if not path.exists():
        raise MissingFileError(f"{name} weights not found: {path}")
    raise MissingFileError(f"{path}: neither {subfolder}/config.json nor config.json (a {name} folder) found")
