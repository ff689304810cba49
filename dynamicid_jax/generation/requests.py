"""A requests file: one SampleRequest per line (JSON Lines), in the sidecar's `request` form.

    {"identities": [{"refs": ["alice.jpg"], "box": [0, 0, 1, 0.5]}, {"refs": ["bob.jpg"]}], ...}
    {"identities": [{"refs": ["alice.jpg"], "face_prompt": "a very surprised expression"}],
     "prompt": "a portrait", "seed": 3, "num_images": 4}

Each line is parsed by `request_parsing.parse_request` (the rules of every other form of a
request): fields left out take the sampler's defaults (the config's `sampling` section, then
SampleRequest's); relative photo and embedding paths are relative to the file. A line that
cannot be used (not JSON, an unknown key, a wrong type, a bad box or size, an unreadable
photo) becomes a `Reject` naming its line; the others are returned. Blank lines are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping, Optional

from dynamicid_jax.errors import UserError
from dynamicid_jax.request import InputError, SampleRequest, read_image, validate_request
from dynamicid_jax.request_parsing import key_label, parse_request


@dataclasses.dataclass(frozen=True)
class Reject:
    line: int  # 1-based line number in the file
    error: str
    text: str

    def to_json(self) -> dict:
        return {"line": self.line, "error": self.error, "text": self.text}


REQUESTS_LIMIT = 256 * 2**20  # about a million request lines; a larger file is not a requests file


def read_requests(
    path: str | pathlib.Path, defaults: Optional[Mapping[str, Any]] = None, vae_factor: int = 8,
    identity_branch: bool = True, family=None, embedding_widths=None,
) -> tuple[list[tuple[int, SampleRequest]], list[Reject]]:
    """([(line number, request)], [Reject]) of a requests file; every photo is read once.

    family: the base model's (`validate_request`: a line with time ids on SD1.5 is rejected).
    embedding_widths: its text encoders' (`family.embedding_widths`): a line naming an
    embedding file of another form or width is rejected (None: any readable file).
    Raises InputError only when the file itself cannot be read.
    """
    path = pathlib.Path(path)
    from dynamicid_jax.input_files import read_text  # size-bounded (hardening: one shared reader)

    try:
        lines = read_text(path, "requests file", limit=REQUESTS_LIMIT).splitlines()
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
            request = parse_request(data, defaults=defaults, base=path.parent)
            validate_request(request, vae_factor, label=key_label, identity_branch=identity_branch, family=family)
            _check_photos(request, photo_errors)
            _check_embeddings(request, photo_errors, embedding_widths)
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


def _check_embeddings(request: SampleRequest, errors: dict[str, Optional[str]], widths=None) -> None:
    """Each textual-inversion file is read once per file (checked against `widths`)."""
    from dynamicid_jax.models.textual_inversion import read_embedding

    for path in request.negative_embeddings:
        _check_once(path, errors, lambda p: read_embedding(p, widths), UserError)


def _check_photos(request: SampleRequest, errors: dict[str, Optional[str]]) -> None:
    for ident in request.identities:
        for photo in ident.refs + ([ident.target_landmarks] if ident.target_landmarks else []):
            _check_once(photo, errors, read_image, InputError)
