"""The one user-error base class every entry point catches, and its generic kinds.

A `UserError` is something the person running a command can fix: a bad flag value, a file
that is missing or not an image, shards made for another model, a full disk. Its message
names the input and says what is wrong; `dynamicid_jax.cli.run_main` prints it as one line
`error: ...` on stderr and exits with status 2, without a traceback. Every other exception
is a bug or an unexpected internal failure: it keeps its traceback (exit 1).

Module-specific user errors (request.InputError, faces NoFaceError, WeightImportError,
DataMismatchError, RecordFormatError, ...) subclass `UserError` where they are defined; they
also keep their historical built-in base (ValueError, FileNotFoundError, ...) so callers that
catch those still do. This module imports nothing, so any module may use it.
"""

from __future__ import annotations


class UserError(Exception):
    """An input, setting or environment fault the user can fix; the message names it."""


class ConfigError(UserError, ValueError):
    """A setting (flag, config field, folder layout) that cannot be used."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a named folder must hold) does not exist."""


class StorageError(UserError, OSError):
    """Writing an output failed (disk full, read-only, permissions); what was already
    committed stays usable and a rerun resumes from it (the message says where)."""


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (several lines are joined with ' | ')."""
    text = str(error) or type(error).__name__
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())
