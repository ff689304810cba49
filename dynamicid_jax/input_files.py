"""Reading a file the user named without trusting it: its size is bounded before it is read.

A file named `.json` may be a 40 GB video, a `.safetensors` may be a text file; reading such
a file whole, or allocating what its header claims, ends in a `MemoryError` or a traceback.
Every reader of a user-named file goes through one of these (or, for a binary format, a
reader that checks its own header the same way: `models/torch_import.read_safetensors`,
`models/torch_pickle.load`, `data/records.read_record_at`, `faces/onnx_session`), and a
corrupt or hostile file is one `FileFormatError` line naming the file and what is wrong.

Limits (bytes): JSON_LIMIT for configs, sidecars, manifests, request and test-set files;
callers pass another one where a file is legitimately larger (a tokenizer vocabulary).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Optional

from dynamicid_jax.errors import MissingFileError, UserError

JSON_LIMIT = 16 * 2**20  # a request/config/sidecar/manifest is kilobytes; 16 MiB leaves room for big manifests


class FileFormatError(UserError, ValueError):
    """A user-named file that is not what its name or role says (corrupt, truncated, too big)."""


def _size_text(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def check_file(path: str | os.PathLike, what: str = "file", limit: Optional[int] = None) -> int:
    """The size of `path` in bytes, after checking it is an existing regular file of at most
    `limit` bytes; MissingFileError / FileFormatError naming it otherwise."""
    path = pathlib.Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: {what} not found")
    if path.is_dir():
        raise FileFormatError(f"{path}: is a folder, a {what} is expected")
    size = path.stat().st_size
    if limit is not None and size > limit:
        raise FileFormatError(f"{path}: {_size_text(size)}, more than the {_size_text(limit)} a {what} may hold "
                              "(is it the right file?)")
    return size


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes (read in chunks: any size), what sidecars record of input files."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_text(path: str | os.PathLike, what: str = "text file", limit: int = JSON_LIMIT) -> str:
    """The UTF-8 text of a file of at most `limit` bytes (FileFormatError naming it otherwise)."""
    check_file(path, what, limit)
    raw = pathlib.Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: not a UTF-8 {what} (byte {e.start} is {raw[e.start:e.start + 1]!r})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file", limit: int = JSON_LIMIT) -> Any:
    """The JSON value of a file of at most `limit` bytes; FileFormatError naming the file and
    the line of a syntax error."""
    text = read_text(path, what, limit)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}: not a JSON {what} (line {e.lineno} column {e.colno}: {e.msg})") from None
    except RecursionError:  # '[[[[...' nested deeper than the parser's stack
        raise FileFormatError(f"{path}: JSON nested too deeply to be a {what}") from None


__all__ = ["FileFormatError", "JSON_LIMIT", "check_file", "read_json", "read_text"]
