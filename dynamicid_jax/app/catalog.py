"""The operator's style LoRAs and negative embeddings, offered to clients by file name.

    launch/app.py --lora_dir styles/ --embedding_dir embeddings/ --negative_embedding extra/badhands.pt

The operator names folders (and files) at start-up; the page lists their files by name and a
client picks names, never paths: `Catalog.path(name)` is the only way from a client's value to
a file, and a name it does not list is an InputError. Sidecars the app writes record names
(`public_name`).
"""

from __future__ import annotations

import pathlib
from typing import Iterable, Sequence

from dynamicid_jax.errors import ConfigError
from dynamicid_jax.models.textual_inversion import SUFFIXES as EMBEDDING_SUFFIXES
from dynamicid_jax.request import InputError

# What models/lora_files.py reads (torch_import.read_state_dict): safetensors or a torch pickle.
LORA_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class Catalog:
    """Files with one of `suffixes` in `folders` (not recursive) and the single `files`, by
    file name. what: how errors name the kind ("style LoRA"). ConfigError (start-up input) on
    a missing folder or file, or two files of one name."""

    def __init__(self, what: str, suffixes: Sequence[str], folders: Iterable = (), files: Iterable = (),
                 flag: str = ""):
        self.what = what
        self._paths: dict[str, pathlib.Path] = {}
        found = []
        for folder in map(pathlib.Path, folders):
            if not folder.is_dir():
                raise ConfigError(f"{flag} {folder}: not a folder")
            found += sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        for file in map(pathlib.Path, files):
            if not file.is_file():
                raise ConfigError(f"{what} file not found: {file}")
            found.append(file)
        for path in found:
            other = self._paths.setdefault(path.name, path.resolve())
            if other != path.resolve():
                raise ConfigError(f"two {what} files are named {path.name}: {other} and {path}; rename one")

    @property
    def names(self) -> list[str]:
        return sorted(self._paths)

    def path(self, name: str) -> str:
        """The file offered as `name`; InputError when no such name is offered."""
        if not isinstance(name, str) or name not in self._paths:
            offered = ", ".join(self.names) or "none"
            raise InputError(f"{self.what} {name!r} is not offered by this app (offered: {offered})")
        return str(self._paths[name])

    def paths(self, names: Sequence[str] | None) -> list[str]:
        return [self.path(n) for n in names or []]


def public_name(path: str) -> str:
    """What a client sees of a server file: its name."""
    return pathlib.PurePath(path).name


def lora_catalog(folders: Iterable = ()) -> Catalog:
    return Catalog("style LoRA", LORA_SUFFIXES, folders, flag="--lora_dir")


def embedding_catalog(folders: Iterable = (), files: Iterable = ()) -> Catalog:
    return Catalog("negative embedding", EMBEDDING_SUFFIXES, folders, files, flag="--embedding_dir")
