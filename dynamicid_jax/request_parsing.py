"""Every written form of a sampling request -> one `SampleRequest`, by one set of rules.

    parse_request(data, defaults=config.sampling, base=folder, text=False, label=key_label)

The four forms and what they hand to `parse_request`:
  request-file lines   the JSON object of the line (typed values; paths relative to the file)
  sidecars             the sidecar's `request` object (`read_sidecar`: --from_json; the app)
  CLI flags            `flags_request`: the flags of `add_request_args` as text
  the app's form       `app/forms.py`: the form's values (text boxes, numbers, check boxes)

Text (flags, form fields) is converted here, by one parser per kind of field (`parse_alpha`,
`parse_box`, integers, numbers); JSON values are taken as they are. A field left out (None in
a text form) takes `defaults` (the config's `sampling` section), then SampleRequest's own.
Types and ranges are then checked once, by `request.validate_request`, for every form.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from typing import Any, Callable, Mapping, Optional

from dynamicid_jax import masks
from dynamicid_jax.input_files import file_sha256
from dynamicid_jax.request import (DEFAULT_KEYS, DEFAULT_PROMPT, TIME_ID_FIELDS, IdentityRequest, InputError,
                                   SampleRequest, flag_label)

REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(SampleRequest))
IDENTITY_FIELDS = tuple(f.name for f in dataclasses.fields(IdentityRequest))
INTEGER_FIELDS = ("seed", "steps", "height", "width", "num_images", "clip_skip")
NUMBER_FIELDS = ("guidance", "beta", "id_scale")
# The settings `launch/sample.py` takes as flags of the same name.
FLAG_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "height", "width", "num_images", "alpha",
               "beta", "id_scale", "mix", "scheduler", "clip_skip") + TIME_ID_FIELDS

ALPHA_HELP = "a step count (e.g. 12) or a fraction in (0, 1] (e.g. 0.24)"
BOX_HELP = "4 comma-separated numbers y_min,x_min,y_max,x_max in [0, 1]"
PAIR_HELP = "2 comma-separated integers y,x (pixels)"
# What each SDXL micro-conditioning time id means and its default (`family.request_extras`
# applies them): the CLI's help and the app's labels.
TIME_ID_HELP = {
    "original_size": "the size the model is told the picture had (default: height,width)",
    "crops_coords_top_left": "the crop corner (default: 0,0)",
    "target_size": "the size the model is told to make (default: height,width)",
}


def key_label(name: str) -> str:
    """How a requests file's errors name a field: its key."""
    return repr(name)


def parse_alpha(value, label: str = "--alpha") -> int | float:
    """alpha as written: an int is a step count ("12", 12), anything else numeric a fraction
    of the steps ("0.24", "1e-1", 0.24). label: how the error names the input."""
    if isinstance(value, bool):
        raise InputError(f"{label} {value!r}: expected {ALPHA_HELP}")
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{label} {text!r}: expected {ALPHA_HELP}") from None


def parse_box(value, label: str = "--box") -> Optional[list]:
    """A box as written: "y_min,x_min,y_max,x_max" (blank: None) or a list (kept; its numbers
    are checked by `validate_request`)."""
    return _numbers(value, label, float, 4, BOX_HELP)


def parse_pair(value, label: str) -> Optional[list]:
    """A time id as written: "1024,768" (blank: None) or a list (kept; checked by `validate_request`)."""
    return _numbers(value, label, int, 2, PAIR_HELP)


def _numbers(value, label: str, number: Callable, count: int, help_text: str) -> Optional[list]:
    """Comma-separated text -> `count` numbers of type `number` (blank: None); a list is kept
    as it is (its values are `validate_request`'s to check); else InputError naming `label`."""
    if value is None or isinstance(value, list):
        return value
    text = str(value).strip()
    if not text:
        return None
    try:
        values = [number(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise InputError(f"{label} {text!r}: expected {help_text}")
    return values


def _integer(value, label: str):
    """Text "12" -> 12; a whole float 12.0 (a form's number widget) -> 12; else unchanged."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, str):
        return value
    try:
        return int(value.strip())
    except ValueError:
        raise InputError(f"{label} {value!r}: expected an integer") from None


def _number(value, label: str):
    if not isinstance(value, str):
        return value
    try:
        return float(value.strip())
    except ValueError:
        raise InputError(f"{label} {value!r}: expected a number") from None


def _from_text(name: str, value, label: Callable[[str], str]):
    """One field's value as a text form gives it -> its typed value."""
    if name in INTEGER_FIELDS:
        return _integer(value, label(name))
    if name in NUMBER_FIELDS:
        return _number(value, label(name))
    if name == "alpha":
        return parse_alpha(value, label(name))
    if name == "mix":
        return None if isinstance(value, str) and not value.strip() else _number(value, label(name))
    if name in TIME_ID_FIELDS:
        return parse_pair(value, label(name))
    return value


def _resolve(path, base: Optional[pathlib.Path]):
    """A path of a requests file, relative to its folder unless absolute (others: as given)."""
    if base is None or not isinstance(path, str) or not path or pathlib.Path(path).is_absolute():
        return path
    return str(base / path)


# Per-identity texts where a blank value means "none" in every request form: an empty face
# prompt leaves that person unedited (IMR to an empty prompt is not a request anyone makes).
BLANK_IS_NONE = ("face_prompt", "source_prompt", "target_landmarks", "mask")


def parse_identity(data, i: int, *, base: Optional[pathlib.Path] = None, text: bool = False,
                   label: Callable[[str], str] = key_label) -> IdentityRequest:
    """Identity `i`'s object ({"refs": [...], "box": ..., ...}) -> IdentityRequest."""
    if not isinstance(data, dict):
        raise InputError(f"identity {i} must be an object, got {data!r}")
    unknown = sorted(set(data) - set(IDENTITY_FIELDS))
    if unknown:
        raise InputError(f"identity {i}: unknown key(s) {unknown} (known: {sorted(IDENTITY_FIELDS)})")
    fields = dict(data)
    if text:
        fields = {k: v for k, v in fields.items() if v is not None}
        fields["box"] = parse_box(fields.get("box"), label("box"))
    if isinstance(fields.get("refs"), list):
        fields["refs"] = [_resolve(r, base) for r in fields["refs"]]
    fields["target_landmarks"] = _resolve(fields.get("target_landmarks"), base)
    for name in BLANK_IS_NONE:  # blank in any form (a flag, a form field, a JSON "") = not given:
        if isinstance(fields.get(name), str) and not fields[name].strip():  # "" is no edit, never an edit to ""
            fields[name] = None
    fields["mask"] = _resolve(fields.get("mask"), base)
    try:
        return IdentityRequest(**fields)
    except TypeError as e:  # "refs" missing
        raise InputError(f"identity {i}: {e}") from None


def parse_request(data, *, defaults: Optional[Mapping[str, Any]] = None, base: Optional[pathlib.Path] = None,
                  text: bool = False, label: Callable[[str], str] = key_label) -> SampleRequest:
    """One request object -> SampleRequest; InputError naming an unknown key or a bad value.

    defaults: values for fields left out (the config's sampling section, `request.DEFAULT_KEYS`;
    the app: its page's settings). base: the folder relative photo and embedding paths start from (a requests file's);
    None keeps paths as given. text: values may be text typed by a person (flags, a form):
    numbers, alpha and boxes are parsed from it, None and a blank `mix` mean "not given".
    The result still goes through `validate_request` (types and ranges).
    """
    if not isinstance(data, dict) or not isinstance(data.get("identities"), list):
        raise InputError("not a sampling request: expected an object with an 'identities' list")
    unknown = sorted(set(data) - set(REQUEST_FIELDS))
    if unknown:
        raise InputError(f"unknown key(s) {unknown} (known: {sorted(REQUEST_FIELDS)})")
    fields = {k: v for k, v in (defaults or {}).items() if k in REQUEST_FIELDS and k != "identities"}
    for name, value in data.items():
        if name == "identities" or (text and value is None):
            continue
        fields[name] = _from_text(name, value, label) if text else value
    if isinstance(fields.get("negative_embeddings"), list):
        fields["negative_embeddings"] = [_resolve(p, base) for p in fields["negative_embeddings"]]
    identities = [parse_identity(d, i, base=base, text=text, label=label) for i, d in enumerate(data["identities"])]
    return SampleRequest(identities=identities, **fields)


def setting_defaults(defaults: Optional[Mapping[str, Any]] = None) -> dict:
    """{field: value} of every setting but the identities when none is given: SampleRequest's
    defaults overridden by `defaults` (the config's sampling section); what a form shows."""
    fields = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
              for f in dataclasses.fields(SampleRequest) if f.name != "identities"}
    fields.update({k: v for k, v in dict(defaults or {}).items() if k in DEFAULT_KEYS})
    return fields


# -------------------------------------------------------------------------------- the CLI's flags


def add_request_args(parser: argparse.ArgumentParser) -> None:
    """The flags of one request (`launch/sample.py`). Every value is kept as text (None when
    not given) and typed by `flags_request`, as the other forms are. --scheduler, --clip_skip
    and --negative_embedding come with the model flags (`cli.add_model_args`)."""
    add = parser.add_argument
    add("--ref", action="append", default=[], help="reference photo(s) of one identity; repeat per identity")
    add("--prompt", default=None, help=f"default: {DEFAULT_PROMPT!r}")
    add("--negative_prompt", default=None)
    add("--box", action="append", default=[], help="y_min,x_min,y_max,x_max in [0,1], once per identity")
    add("--mask", action="append", default=[],
        help="mask image of the identity's region (white = region; the picture's aspect ratio), once per "
             "identity in --ref order, instead of its --box ('' = that identity's --box)")
    add("--face_prompt", action="append", default=[], help="target face prompt per identity ('' = none)")
    add("--source_prompt", action="append", default=[], help="reference-face description per identity")
    add("--target_landmarks", action="append", default=[], help="photo giving target landmarks, per identity")
    for name in ("seed", "steps", "guidance", "height", "width", "num_images", "beta", "id_scale"):
        add(f"--{name}", default=None)
    add("--alpha", default=None, help=f"layout steps: {ALPHA_HELP}")
    add("--mix", default=None, help="identity mixing weight m (one box, several identities)")
    add("--no_gating", action="store_true", help="ablation: plain decoupled cross-attention")
    for name in TIME_ID_FIELDS:
        add(f"--{name}", default=None, help=f"SDXL micro-conditioning, {PAIR_HELP}: {TIME_ID_HELP[name]}")


def _per_identity(values: list, n: int, flag: str) -> list:
    if len(values) > n:
        raise InputError(f"{flag} given {len(values)} times for {n} identities")
    return [v if v else None for v in values] + [None] * (n - len(values))


def flags_request(args: argparse.Namespace, defaults: Optional[Mapping[str, Any]] = None) -> SampleRequest:
    """The flags of `add_request_args` (+ --scheduler/--clip_skip/--negative_embedding) ->
    SampleRequest; per-identity flags are given once per --ref, in --ref order."""
    n = len(args.ref)  # none: plain text-to-image, which validate_request allows without DynamicID weights only
    if (args.box or args.mask) and max(len(args.box), len(args.mask)) != n:
        raise InputError(f"boxes and identities differ in count: {len(args.box)} --box and {len(args.mask)} --mask "
                         f"for {n} --ref")
    per = {name: _per_identity(getattr(args, name), n, f"--{name}")
           for name in ("box", "mask", "face_prompt", "source_prompt", "target_landmarks")}
    identities = [dict({name: per[name][i] for name in per}, refs=[r for r in ref.split(",") if r])
                  for i, ref in enumerate(args.ref)]
    data = {name: getattr(args, name) for name in FLAG_FIELDS}
    data.update(identities=identities, gating=not args.no_gating, negative_embeddings=list(args.negative_embedding))
    return parse_request(data, defaults=defaults, text=True, label=flag_label)


def read_sidecar(path: str, flag: str = "--from_json") -> SampleRequest:
    """The SampleRequest of a sidecar (or bare request) JSON file; InputError naming the file.
    The embedding files it records must still be the bytes it was made with (sha256)."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise InputError(f"{flag} {file}: {'is a folder' if file.is_dir() else 'file not found'}")
    try:
        from dynamicid_jax.input_files import FileFormatError, read_text  # size-bounded, one shared reader

        data = json.loads(read_text(file, "request file"))
    except FileFormatError as e:  # too large, or not UTF-8
        raise InputError(f"{flag} {e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{flag} {file}: not a JSON file ({e})") from None
    try:
        request = parse_request(data.get("request", data) if isinstance(data, dict) else data)
    except InputError as e:
        raise InputError(f"{flag} {file}: {e}") from None
    resolved = data.get("resolved", {}) if isinstance(data, dict) else {}
    try:
        masks.check_unchanged(resolved.get("masks"), f"{flag} {file}")
    except masks.MaskError as e:
        raise InputError(str(e)) from None
    recorded = resolved.get("negative_embeddings", [])
    for record in recorded:
        embedding = pathlib.Path(record["file"])
        if embedding.is_file() and file_sha256(embedding) != record["sha256"]:
            raise InputError(f"{flag} {file}: embedding {embedding} changed since (sha256 differs from the sidecar's)")
    return request
