"""A requests file: one SampleRequest per line (JSON Lines), in the sidecar's `request` form.

    {"identities": [{"refs": ["alice.jpg"], "box": [0, 0, 1, 0.5]}, {"refs": ["bob.jpg"]}], ...}
    {"identities": [{"refs": ["alice.jpg"], "face_prompt": "a very surprised expression"}],
     "prompt": "a portrait", "seed": 3, "num_images": 4}

Fields left out take the sampler's defaults (the config's `sampling` section, then
SampleRequest's); relative photo paths are relative to the file. A line that cannot be used
(not JSON, an unknown key, a wrong type, a bad box or size, an unreadable photo) becomes a
`Reject` naming its line; the others are returned. Blank lines are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping, Optional

from dynamicid_jax.errors import UserError
from dynamicid_jax.request import DEFAULT_KEYS, IdentityRequest, InputError, SampleRequest, read_image, validate_request

REQUEST_FIELDS = {f.name: f for f in dataclasses.fields(SampleRequest)}
IDENTITY_FIELDS = {f.name for f in dataclasses.fields(IdentityRequest)}
# The config's sampling keys (sampling.DEFAULT_KEYS: request fields, the scheduler included).
DEFAULTABLE = DEFAULT_KEYS
_INT = ("seed", "steps", "height", "width", "num_images", "clip_skip")
_NUMBER = ("guidance", "beta", "id_scale")


@dataclasses.dataclass(frozen=True)
class Reject:
    line: int  # 1-based line number in the file
    error: str
    text: str

    def to_json(self) -> dict:
        return {"line": self.line, "error": self.error, "text": self.text}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_types(data: Mapping[str, Any]) -> None:
    for name in _INT:
        if name in data and not _is_int(data[name]):
            raise InputError(f"{name!r} must be an integer, got {data[name]!r}")
    for name in _NUMBER:
        if name in data and not _is_number(data[name]):
            raise InputError(f"{name!r} must be a number, got {data[name]!r}")
    if "alpha" in data and not _is_number(data["alpha"]):
        raise InputError(f"'alpha' must be a step count or a fraction, got {data['alpha']!r}")
    if data.get("mix") is not None and not _is_number(data["mix"]):
        raise InputError(f"'mix' must be a number or null, got {data['mix']!r}")
    if "gating" in data and not isinstance(data["gating"], bool):
        raise InputError(f"'gating' must be true or false, got {data['gating']!r}")
    for name in ("prompt", "negative_prompt", "scheduler"):
        if name in data and not isinstance(data[name], str):
            raise InputError(f"{name!r} must be a string, got {data[name]!r}")
    files = data.get("negative_embeddings", [])
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise InputError(f"'negative_embeddings' must be a list of embedding file paths, got {files!r}")


def _resolve(path: str, base: pathlib.Path) -> str:
    """A path of the file, relative to its folder unless absolute."""
    return str(path if pathlib.Path(path).is_absolute() else base / path)


def _identity(d, base: pathlib.Path, i: int) -> IdentityRequest:
    if not isinstance(d, dict):
        raise InputError(f"identity {i} must be an object, got {d!r}")
    unknown = sorted(set(d) - IDENTITY_FIELDS)
    if unknown:
        raise InputError(f"identity {i}: unknown key(s) {unknown} (known: {sorted(IDENTITY_FIELDS)})")
    refs = d.get("refs")
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r for r in refs):
        raise InputError(f"identity {i}: 'refs' must be a non-empty list of photo paths, got {refs!r}")
    box = d.get("box")
    if box is not None and (not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box)):
        raise InputError(f"identity {i}: 'box' must be 4 numbers [y_min, x_min, y_max, x_max], got {box!r}")
    for name in ("face_prompt", "source_prompt", "target_landmarks"):
        if d.get(name) is not None and not isinstance(d[name], str):
            raise InputError(f"identity {i}: {name!r} must be a string or null, got {d[name]!r}")
    resolve = lambda p: _resolve(p, base)  # noqa: E731
    return IdentityRequest(
        refs=[resolve(r) for r in refs], box=None if box is None else [float(v) for v in box],
        face_prompt=d.get("face_prompt"), target_landmarks=None if d.get("target_landmarks") is None
        else resolve(d["target_landmarks"]), source_prompt=d.get("source_prompt"),
    )


def parse_request(data, base: pathlib.Path, defaults: Mapping[str, Any]) -> SampleRequest:
    """One line's object -> SampleRequest (InputError naming the problem)."""
    if not isinstance(data, dict):
        raise InputError(f"a request must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(REQUEST_FIELDS))
    if unknown:
        raise InputError(f"unknown key(s) {unknown} (known: {sorted(REQUEST_FIELDS)})")
    if "identities" not in data or not isinstance(data["identities"], list):
        raise InputError("'identities' must be a list of {\"refs\": [...], ...} objects")
    _check_types(data)
    fields = {k: v for k, v in defaults.items() if k in DEFAULTABLE}
    fields.update({k: v for k, v in data.items() if k != "identities"})
    fields["identities"] = [_identity(d, base, i) for i, d in enumerate(data["identities"])]
    if "negative_embeddings" in data:
        fields["negative_embeddings"] = [_resolve(f, base) for f in data["negative_embeddings"]]
    fields.setdefault("prompt", "a photo of a person")
    return SampleRequest(**fields)


def read_requests(
    path: str | pathlib.Path, defaults: Optional[Mapping[str, Any]] = None, vae_factor: int = 8,
    identity_branch: bool = True,
) -> tuple[list[tuple[int, SampleRequest]], list[Reject]]:
    """([(line number, request)], [Reject]) of a requests file; every photo is read once.

    Raises InputError only when the file itself cannot be read.
    """
    path = pathlib.Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read requests file {path}: {e}") from e
    defaults = dict(defaults or {})
    photo_errors: dict[str, Optional[str]] = {}
    requests, rejects = [], []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"not JSON: {e}") from None
            request = parse_request(data, path.parent, defaults)
            validate_request(request, vae_factor, identity_branch)
            _check_photos(request, photo_errors)
            _check_embeddings(request, photo_errors)
        except (InputError, TypeError) as e:
            rejects.append(Reject(number, str(e), text))
            continue
        requests.append((number, request))
    return requests, rejects


def _check_once(key: str, errors: dict[str, Optional[str]], read, catch: type[Exception]) -> None:
    """`read(key)` the first time `key` is seen (its outcome remembered in `errors`); an
    InputError with the remembered message whenever it failed."""
    if key not in errors:
        try:
            read(key)
            errors[key] = None
        except catch as e:
            errors[key] = str(e)
    if errors[key] is not None:
        raise InputError(errors[key])


def _check_embeddings(request: SampleRequest, errors: dict[str, Optional[str]]) -> None:
    """Each textual-inversion file is read once per file."""
    from dynamicid_jax.models.textual_inversion import read_embedding

    for path in request.negative_embeddings:
        _check_once(path, errors, read_embedding, UserError)


def _check_photos(request: SampleRequest, errors: dict[str, Optional[str]]) -> None:
    for ident in request.identities:
        for photo in ident.refs + ([ident.target_landmarks] if ident.target_landmarks else []):
            _check_once(photo, errors, read_image, InputError)
