"""The app's form values -> a checked `SampleRequest`, and sidecars -> form values.

The form is one more written form of a request: its values go through
`request_parsing.parse_request` (text=True: the alpha, box and number parsers of the CLI's
flags), with the page's settings as defaults. Nothing here opens a path a client typed:
references, landmark photos and region masks are upload paths (checked to lie in the app's upload folder, of
an image type, at most MAX_UPLOAD_BYTES), negative embeddings and style LoRAs are names of the
operator's files (`catalog.py`), and a sidecar's `refs` are only shown by name. Errors are
`InputError`s naming the input.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Optional, Sequence

import numpy as np

from dynamicid_jax.app.catalog import public_name
from dynamicid_jax.faces.expression import EMOTIONS
from dynamicid_jax.faces.pose import pose_bins
from dynamicid_jax.request import IMAGE_SUFFIXES, InputError, SampleRequest, validate_request
from dynamicid_jax.request_parsing import parse_box, parse_request

MAX_PEOPLE = 4
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_SIDE = 2048  # pixels: a shared server should not be asked for arbitrary memory
MAX_IMAGES = 8
SIDECAR_SUFFIXES = (".json",)
PAGE_LORAS = "page_loras"  # the sidecar's weights: the style LoRAs a client chose, [{"name", "scale", ...}]
KEEP = "keep"
EXPRESSION_CHOICES = (KEEP,) + EMOTIONS
ORIENTATION_CHOICES = (KEEP, "front", "side", "facing up", "facing down")
# Settings a sidecar restores (every field of SampleRequest but the identities and the
# textual-inversion files, which name server paths: the app never opens a path it is sent).
# What the page says when the app serves a base model alone (no identity branch).
PLAIN_NOTICE = ("this app serves a base model without DynamicID weights (plain text-to-image; start it with "
                "--dynamicid for people from photos)")
SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(SampleRequest)
                       if f.name not in ("identities", "negative_embeddings"))


@dataclasses.dataclass
class PersonForm:
    """One person's inputs as the page sends them (upload paths, strings)."""

    refs: Sequence[str] = ()
    box: str = ""
    expression: str = KEEP
    orientation: str = KEEP
    face_text: str = ""
    target_landmarks: Optional[str] = None
    mask: Optional[str] = None  # an uploaded mask of the person's region, instead of the box

    @property
    def edits(self) -> bool:
        return bool(self.face_text.strip()) or self.expression != KEEP or self.orientation != KEEP or bool(
            self.target_landmarks)


def check_upload(path, upload_root: pathlib.Path, kinds: Sequence[str] = IMAGE_SUFFIXES) -> pathlib.Path:
    """An uploaded file's path, refused unless it lies under `upload_root`, has one of the
    suffixes `kinds` and is at most MAX_UPLOAD_BYTES."""
    path = pathlib.Path(str(path))
    name = path.name
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InputError(f"upload {name} not found")
    if upload_root.resolve() not in resolved.parents:
        raise InputError(f"{name} is not an upload of this app: files must be uploaded, server paths are never opened")
    if resolved.suffix.lower() not in kinds:
        raise InputError(f"{name}: only {', '.join(kinds)} files are accepted")
    if resolved.stat().st_size > MAX_UPLOAD_BYTES:
        raise InputError(f"{name} is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
    return resolved


def format_box(box: Optional[Sequence[float]]) -> str:
    """A box (or a time-id pair) as its text field shows it: "0,0.5,1,1"; None: blank."""
    return "" if box is None else ",".join(f"{v:g}" for v in box)


def compose_face_prompt(expression: str, orientation: str, source_emotion: str, pose) -> str:
    """The face prompt of an expression/orientation choice in the release's source form
    ("in a {emotion} expression, [facing up, |facing down, ]in {front|side} view"); "keep"
    takes that part from the reference face (its classified emotion, its pose bins)."""
    if expression not in EXPRESSION_CHOICES:
        raise InputError(f"expression {expression!r}: choose one of {', '.join(EXPRESSION_CHOICES)}")
    if orientation not in ORIENTATION_CHOICES:
        raise InputError(f"orientation {orientation!r}: choose one of {', '.join(ORIENTATION_CHOICES)}")
    vertical, view = pose_bins(pose)
    emotion = source_emotion if expression == KEEP else expression
    if orientation in ("front", "side"):
        vertical, view = None, orientation
    elif orientation in ("facing up", "facing down"):
        vertical = orientation.split()[1]
    facing = {None: "", "up": "facing up, ", "down": "facing down, "}[vertical]
    return f"in a {emotion} expression, {facing}in {view} view"


def form_label(name: str) -> str:
    """How the page's errors name a setting: as its field is labelled."""
    return name


def build_request(people: Sequence[PersonForm], settings: dict, upload_root: pathlib.Path, describe,
                  defaults: Optional[dict] = None, negative_embeddings: Optional[Sequence[str]] = None,
                  identity_branch: bool = True) -> SampleRequest:
    """Form values -> SampleRequest. People without reference uploads are left out (their
    other fields must then be blank). identity_branch False (a base model without DynamicID
    weights, plain text-to-image): no person at all. describe(path) -> (emotion, pose) of the reference's
    largest face, used to compose a face prompt from the expression/orientation choices.
    settings: form values by field name (None = not given: `defaults`, the page's settings).
    negative_embeddings: the operator's files the client chose (paths from the catalog)."""
    identities = []
    for k, person in enumerate(people, start=1):
        if not person.refs:
            if person.box.strip() or person.mask or person.edits:
                raise InputError(f"person {k} has a box, a mask or an edit but no reference photo")
            continue
        refs = [str(check_upload(p, upload_root)) for p in person.refs]
        target = str(check_upload(person.target_landmarks, upload_root)) if person.target_landmarks else None
        mask = str(check_upload(person.mask, upload_root)) if person.mask else None
        face_prompt = person.face_text.strip() or None
        if face_prompt is None and (person.expression != KEEP or person.orientation != KEEP):
            emotion, pose = describe(refs[0])
            face_prompt = compose_face_prompt(person.expression, person.orientation, emotion, pose)
        identities.append(dict(refs=refs, box=parse_box(person.box, f"person {k} box"), face_prompt=face_prompt,
                               target_landmarks=target, mask=mask))
    if identities and not identity_branch:
        raise InputError(f"{PLAIN_NOTICE}: remove the reference photos")
    if not identities and identity_branch:
        raise InputError("no reference photo: upload at least one photo for person 1")
    if len(identities) > MAX_PEOPLE:
        raise InputError(f"at most {MAX_PEOPLE} people")
    data = dict(request_settings(settings), identities=identities)
    if negative_embeddings is not None:
        data["negative_embeddings"] = list(negative_embeddings)
    return parse_request(data, defaults=defaults, text=True, label=form_label)


def drawn_mask(editor_value) -> np.ndarray:
    """The page's brush drawing (gradio ImageEditor value: {"background", "layers", "composite"},
    numpy RGBA) -> the mask it draws, (H, W, 3) uint8: white wherever any layer is painted
    (opacity > 0, whatever the brush colour), black elsewhere; the canvas' size, so the
    layout canvas under the brush gives the picture's aspect ratio."""
    layers = [np.asarray(layer) for layer in (editor_value or {}).get("layers") or [] if layer is not None]
    painted = [layer[..., 3] > 0 for layer in layers if layer.ndim == 3 and layer.shape[-1] == 4]
    if not painted or not np.logical_or.reduce(painted).any():
        raise InputError("nothing drawn: paint the region with the brush on the canvas first")
    region = np.logical_or.reduce(painted)
    return np.repeat((region * 255).astype(np.uint8)[..., None], 3, axis=-1)


def lora_choice(names, scale, loras) -> tuple[tuple[str, float], ...]:
    """The page's style LoRA picks -> ((name, scale), ...) in the order picked, each name one
    the catalog `loras` offers; scale (one for all, blank: 1) a finite number."""
    names = list(names or [])
    for name in names:
        loras.path(name)
    try:
        scale = 1.0 if scale in (None, "") else float(scale)
    except (TypeError, ValueError):
        raise InputError(f"LoRA scale {scale!r}: expected a number") from None
    if not math.isfinite(scale):
        raise InputError(f"LoRA scale {scale!r}: expected a finite number")
    return tuple((name, scale) for name in names)


def validate_settings(request: SampleRequest, pipeline) -> None:
    """The sampler's checks plus the app's limits on size and image count."""
    validate_request(request, pipeline.modules.vae_scale_factor, label=form_label,
                     identity_branch=pipeline.modules.identity_branch, family=pipeline.modules.family)
    for name in ("height", "width"):
        if getattr(request, name) > MAX_SIDE:
            raise InputError(f"{name} {getattr(request, name)} is above this app's limit of {MAX_SIDE}")
    if request.num_images > MAX_IMAGES:
        raise InputError(f"num_images {request.num_images} is above this app's limit of {MAX_IMAGES}")


def request_settings(settings: dict) -> dict:
    """The form's settings with their names checked: the fields of a SampleRequest but the
    identities and the embedding files (a client names neither server paths nor files)."""
    unknown = sorted(set(settings) - set(SETTING_FIELDS))
    if unknown:
        raise InputError(f"unknown setting {unknown[0]!r}")
    return dict(settings)


def read_sidecar(path, upload_root: pathlib.Path) -> tuple[dict, list]:
    """An uploaded sidecar -> (its request dict, as `SampleRequest.to_json`; the style LoRAs
    the page chose for it, [(name, scale)])."""
    resolved = check_upload(path, upload_root, SIDECAR_SUFFIXES)
    try:
        data = json.loads(resolved.read_text())
        # Parsed into a request and back: unknown fields refused, missing ones take the
        # defaults; nothing it names is opened.
        request = parse_request(data.get("request", data)).to_json()
        loras = [(r["name"], r["scale"]) for r in data.get("weights", {}).get(PAGE_LORAS, [])]
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise InputError(f"sidecar {resolved.name} is not a DynamicID sidecar: {e}") from e
    return request, loras


def sidecar_request(sidecar: dict, refs: Sequence[Sequence[str]], upload_root: pathlib.Path,
                    embeddings=None) -> SampleRequest:
    """The sidecar's request with each person's references replaced by this request's
    uploads. A person without uploads is refused: a sidecar's refs name files of whoever
    wrote it and are never opened here. Its negative embeddings must be names `embeddings`
    (the app's catalog) offers."""
    request = parse_request(sidecar)
    if request.identities and any(i.target_landmarks for i in request.identities):
        raise InputError("sidecar names target-landmark photos: they are never opened on the server; "
                         "use the form with an uploaded landmark photo")
    if request.identities and any(i.mask for i in request.identities):
        raise InputError("sidecar names mask files: they are never opened on the server; "
                         "use the form with the masks uploaded")
    if request.negative_embeddings:
        offered = embeddings.names if embeddings is not None else []
        if not all(name in offered for name in request.negative_embeddings):
            raise InputError("sidecar names textual-inversion files: they are never opened on the server "
                             "(choose the app's embeddings by name, or use launch/sample.py --from_json)")
        request.negative_embeddings = embeddings.paths(request.negative_embeddings)
    people = [list(r or []) for r in refs]
    if len(people) < len(request.identities):
        people += [[] for _ in range(len(request.identities) - len(people))]
    for k, (ident, uploads) in enumerate(zip(request.identities, people), start=1):
        if not uploads:
            names = ", ".join(pathlib.PurePath(r).name for r in ident.refs)
            raise InputError(f"sidecar person {k} refs ({names}) are not opened on the server: "
                             "upload that person's reference photo(s)")
        ident.refs = [str(check_upload(p, upload_root)) for p in uploads]
    extra = [k for k, uploads in enumerate(people, start=1) if uploads and k > len(request.identities)]
    if extra:
        raise InputError(f"the sidecar has {len(request.identities)} people but person {extra[0]} has uploads")
    return request


def public_copy(request: SampleRequest, details: dict) -> tuple[SampleRequest, dict]:
    """The request and details with server paths replaced by file names, for sidecars the
    client downloads (paths of this server are none of its business)."""
    request = parse_request(json.loads(json.dumps(request.to_json())))
    for ident in request.identities:
        ident.refs = [public_name(r) for r in ident.refs]
        if ident.target_landmarks:
            ident.target_landmarks = public_name(ident.target_landmarks)
        if ident.mask:
            ident.mask = public_name(ident.mask)
    request.negative_embeddings = [public_name(p) for p in request.negative_embeddings]
    details = json.loads(json.dumps(details))
    for used in details.get("identities_used", []):
        used["refs"] = [public_name(r) for r in used.get("refs", [])]
    for record in details.get("negative_embeddings", []) + details.get("masks", []) + details.get("input_files", []):
        record["file"] = public_name(record["file"])
    return request, details
