"""Writing a file so that no reader ever sees half of it: write a unique temporary file in
the same folder, then rename it over the target (atomic on POSIX). Several processes may
write the same path (the shared tiny vocabulary, an evaluation report); the last rename wins
whole. The shard writer (`data/shards.py`) keeps its own fsync'ed variant, whose fixed
temporary names its clean-up knows.
"""

from __future__ import annotations

import os
import pathlib
import tempfile


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over `path`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
