"""What every command-line entry point shares: the user-error exit, flags, quiet logs.

    def main(argv=None) -> int:
        args = cli.ArgumentParser(description=...).parse_args(argv)   # adds --verbose
        cli.quiet_logs(args.verbose)
        return cli.run_main(_run, args)

`run_main` turns a `dynamicid_jax.errors.UserError` into one line `error: <message>` on
stderr and status 2; any other exception propagates with its traceback (status 1). No entry
point keeps its own list of exception types: a new user error subclasses `UserError`.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import warnings
from typing import Any, Callable

from dynamicid_jax.errors import ConfigError, UserError, one_line

USER_ERROR_STATUS = 2
# Libraries that log INFO chatter per save/restore/compile (orbax alone prints hundreds of
# lines per training run); their WARNINGs and ERRORs still show.
_CHATTY_LOGGERS = ("absl", "orbax", "jax", "etils", "grain", "tensorboardX", "dynamicid_jax")


def report_user_error(error: BaseException | str) -> int:
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS


def run_main(fn: Callable[..., Any], *args, **kwargs) -> int:
    """Call `fn`; a UserError -> one stderr line and 2. Returns fn's int result, else 0."""
    try:
        result = fn(*args, **kwargs)
    except UserError as e:
        return report_user_error(e)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error style (one line `error: ...`, status 2; `--help`
    still prints the usage) and the shared `--verbose` flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--verbose", action="store_true",
                          help="show the libraries' INFO logs (orbax, absl, jax); default: warnings only")

    def error(self, message: str):  # argparse calls this for unknown flags and bad values
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_STATUS)


class _Once(logging.Filter):
    """Lets each distinct WARNING-or-above message through once per process."""

    def __init__(self):
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


_ONCE = _Once()


def quiet_logs(verbose: bool = False) -> None:
    """INFO of orbax/absl/jax off (verbose: on); each distinct warning shown once."""
    level = logging.INFO if verbose else logging.WARNING
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
        absl_logging.set_stderrthreshold("info" if verbose else "warning")
    except ImportError:  # pragma: no cover - absl comes with jax/orbax
        pass
    for name in _CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if _ONCE not in logger.filters:
            logger.addFilter(_ONCE)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
    if not verbose:
        warnings.simplefilter("once")


def check_output_folder(path: str | os.PathLike, flag: str) -> pathlib.Path:
    """Refuse, before any work, an output folder that cannot be made: `path` names an
    existing file, or lies under a file, or its nearest existing parent is not writable."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a folder (name a folder, new or existing)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, so the folder cannot be made")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {parent} is not writable")
    return path


__all__ = ["ArgumentParser", "ConfigError", "UserError", "check_output_folder", "quiet_logs", "report_user_error",
           "run_main"]
