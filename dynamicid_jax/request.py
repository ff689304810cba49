"""A sampling request: `SampleRequest` (every setting of one call, the sidecar's `request`),
`IdentityRequest` (one person), the one set of defaults and the one validation.

Every entry point (the CLI's flags, request-file lines, sidecars, the app's form) builds its
`SampleRequest` through `request_parsing.parse_request` and checks it with `validate_request`
(every field's type and range, one rule each) before any model runs.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Optional, Sequence

import numpy as np

from dynamicid_jax import images, masks, schedulers
from dynamicid_jax.dynamicid.saa import validate_boxes
from dynamicid_jax.errors import UserError
from dynamicid_jax.models import textual_inversion

IMAGE_SUFFIXES = images.IMAGE_SUFFIXES


class InputError(UserError, ValueError):
    """A user input that cannot be used (names the input); the CLI exits 2 on it."""


@dataclasses.dataclass
class IdentityRequest:
    """One person in the picture.

    refs: reference photo paths of this person (several are averaged in token space).
    box: normalised [y_min, x_min, y_max, x_max] where this person should appear.
    mask: or a mask file of that region (white = region; masks.py), instead of a box.
    face_prompt: target face prompt for IMR, e.g. "a very surprised expression, front view".
    target_landmarks: a photo whose largest face gives the target landmarks (head pose).
    source_prompt: the reference face's own description; automatic when None.
    """

    refs: list[str]
    box: Optional[list[float]] = None
    mask: Optional[str] = None
    face_prompt: Optional[str] = None
    target_landmarks: Optional[str] = None
    source_prompt: Optional[str] = None

    @property
    def edits(self) -> bool:
        return self.face_prompt is not None or self.target_landmarks is not None


# The one set of sampling defaults (the paper's release settings): SampleRequest's fields
# below, and the CLI's through configs/base.py (`sampling_defaults()`), so a library caller
# and a `launch/sample.py` user asking for the same thing get the same picture.
DEFAULT_PROMPT = "a photo of a person"
# The negative prompt's default is the base-model family's (`family.default_negative_prompt`):
# into the config's sampling section by `base_models.default_config`, and into a SampleRequest
# built without one (None) by the pipeline that draws it (`DynamicIDPipeline.complete`), as
# its size. This is DynamicID's release setting, SD1.5's (sd15.py names it); SDXL's is "".
DEFAULT_NEGATIVE_PROMPT = "lowres, bad anatomy, worst quality, low quality, blurry, deformed"
DEFAULT_KEYS = ("steps", "guidance", "height", "width", "alpha", "beta", "id_scale", "negative_prompt", "scheduler")

# SDXL's micro-conditioning, per request (`family.request_extras`): the size the training
# pictures were before resizing, the crop's top-left corner and the target size, each (y, x)
# pixels; None: diffusers' defaults (height, width), (0, 0), (height, width). A family without
# time ids (SD1.5) refuses them.
TIME_ID_FIELDS = ("original_size", "crops_coords_top_left", "target_size")
MAX_TIME_ID = 16384  # px: beyond any photo a training set resized (the embedding takes any number)

# Largest request accepted (checked before any model is loaded; see validate_request).
MAX_IMAGE_SIDE = 2048  # px: SD1.5 latents 256 x 256, 65,536 tokens in the first level's self-attention
MAX_BATCH_PIXELS = 8 * 1024 * 1024  # num_images x height x width: eight 1024 px or two 2048 px pictures


@dataclasses.dataclass
class SampleRequest:
    """Every setting of one sampling call; `to_json` makes the sidecar's `request`, which
    `request_parsing.parse_request` reads back (as every other form of a request)."""

    identities: list[IdentityRequest]
    prompt: str = DEFAULT_PROMPT
    # None: the base model family's (`family.default_negative_prompt`), filled in with the size
    # by `DynamicIDPipeline.complete`, so a request built in code gets its model's default.
    negative_prompt: Optional[str] = None
    seed: int = 0
    steps: int = 50
    guidance: float = 5.0
    # None: the base model's native size, filled in by the pipeline that draws the request
    # (`DynamicIDPipeline.complete`), so the sidecar records the size drawn.
    height: Optional[int] = None
    width: Optional[int] = None
    num_images: int = 1
    alpha: float | int = 3
    beta: float = 4.0
    id_scale: float = 1.0
    mix: Optional[float] = None
    gating: bool = True
    scheduler: str = "ddim"  # one of schedulers.SCHEDULERS
    clip_skip: int = 0  # text states this many layers before the last (1 = penultimate)
    # Textual-inversion files (`models.textual_inversion`): each file's stem, written in either
    # prompt, stands for its vectors; a stem the negative prompt does not mention is appended
    # to it here (", stem"), so the stored request is what was encoded.
    negative_embeddings: list[str] = dataclasses.field(default_factory=list)
    original_size: Optional[list[int]] = None  # [h, w] (TIME_ID_FIELDS)
    crops_coords_top_left: Optional[list[int]] = None  # [y, x]
    target_size: Optional[list[int]] = None  # [h, w]

    def __post_init__(self):
        self._name_embeddings()

    def _name_embeddings(self) -> None:
        """Append each textual-inversion file's stem the negative prompt does not mention (a
        None prompt waits for `complete_negative_prompt`)."""
        if self.negative_embeddings and isinstance(self.negative_prompt, str) and isinstance(
                self.negative_embeddings, list) and all(isinstance(p, str) for p in self.negative_embeddings):
            self.negative_prompt = textual_inversion.with_names(
                self.negative_prompt, [pathlib.Path(p).stem for p in self.negative_embeddings])

    def complete_negative_prompt(self, family_default: str) -> None:
        """A negative prompt left None becomes `family_default` (the base model family's
        `default_negative_prompt`), with the embedding names appended; in place, so the sidecar
        records what was encoded. Called by `DynamicIDPipeline.complete` only."""
        if self.negative_prompt is None:
            self.negative_prompt = family_default
            self._name_embeddings()

    def input_files(self) -> list[str]:
        """Every file the picture is made from, in a fixed order: each identity's reference
        photos, target-landmark photo and mask, then the textual-inversion files. (Their
        bytes are recorded in the sidecar: `outputs.input_records`.)"""
        files = []
        for ident in self.identities:
            files += list(ident.refs) + [p for p in (ident.target_landmarks, ident.mask) if p]
        return files + list(self.negative_embeddings)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if not data["negative_embeddings"]:  # so sidecars from before this field still match (outputs.reusable)
            del data["negative_embeddings"]
        for name in TIME_ID_FIELDS:  # likewise for the time ids left at their defaults
            if data[name] is None:
                del data[name]
        for ident in data["identities"]:  # likewise for the mask
            if ident.get("mask") is None:
                ident.pop("mask", None)
        return data


def time_ids(request: SampleRequest) -> dict:
    """{name: [a, b] or None} of the request's TIME_ID_FIELDS (`family.request_extras`' keywords)."""
    return {name: getattr(request, name) for name in TIME_ID_FIELDS}


def sampling_defaults() -> dict:
    """{field: default} of the sampling settings a config may override (configs/base.py)."""
    fields = {f.name: f.default for f in dataclasses.fields(SampleRequest)}
    return {k: fields[k] for k in DEFAULT_KEYS}


def flag_label(name: str) -> str:
    """How the CLI and validation errors name a field: its flag."""
    return f"--{name}"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return _is_int(value) or (isinstance(value, (float, np.floating)))


def _finite(label: str, value, *, above: Optional[float] = None) -> None:
    if not _is_number(value) or not math.isfinite(value):
        raise InputError(f"{label} must be a finite number, got {value!r}")
    if above is not None and not value > above:
        raise InputError(f"{label} must be > {above:g}, got {value!r}")


def _optional_text(label: str, value) -> None:
    if value is not None and not isinstance(value, str):
        raise InputError(f"{label} must be text or absent, got {value!r}")


def _check_identity(label, i: int, ident: IdentityRequest) -> None:
    """Each IdentityRequest field's type: refs a non-empty list of paths, texts or None."""
    if not ident.refs:
        raise InputError(f"identity {i} has no reference image")
    if not isinstance(ident.refs, list) or not all(isinstance(r, str) and r for r in ident.refs):
        raise InputError(f"identity {i}: {label('refs')} must be a non-empty list of photo paths, got {ident.refs!r}")
    box = ident.box
    if box is not None and (not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box)):
        raise InputError(f"identity {i}: {label('box')} must be 4 numbers [y_min, x_min, y_max, x_max], got {box!r}")
    for name in ("face_prompt", "source_prompt", "target_landmarks", "mask"):
        _optional_text(f"identity {i}: {label(name)}", getattr(ident, name))
    if ident.mask is not None and ident.box is not None:
        raise InputError(f"identity {i}: give {label('box')} or {label('mask')}, not both")


def _check_time_ids(request: SampleRequest, label, family) -> None:
    """Each time id None or 2 integers (sizes >= 1, crop corner >= 0, at most MAX_TIME_ID);
    the family refuses them when it has none (`family.request_extras`)."""
    for name in TIME_ID_FIELDS:
        value = getattr(request, name)
        if value is None:
            continue
        low = 0 if name == "crops_coords_top_left" else 1
        if (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_int(v) for v in value)
                or not all(low <= v <= MAX_TIME_ID for v in value)):
            raise InputError(f"{label(name)} must be 2 integers y,x in [{low}, {MAX_TIME_ID}], got {value!r}")
    given = [name for name in TIME_ID_FIELDS if getattr(request, name) is not None]
    if family is not None and given:
        try:
            family.request_extras(request.height, request.width, **time_ids(request))
        except InputError as e:
            raise InputError(f"{', '.join(label(n) for n in given)}: {e}") from None


def validate_request(request: SampleRequest, vae_factor: int, label=flag_label, identity_branch: bool = True,
                     family=None) -> None:
    """Raise InputError naming the first unusable setting (before any model runs); the one
    type check and range rule of every field. label(field) names a field in the error
    (default its flag, `--steps`; a requests file says `'steps'`).

    Rules: at least one identity, each with a reference (identity_branch False, a base model
    without DynamicID weights: no identity at all); a region (a box or a mask) for all
    identities or none, boxes inside [0, 1] with min < max, masks usable (`check_masks`);
    prompt text, negative prompt text or None (the family's, filled in by the pipeline);
    guidance, id_scale and mix finite (mix in [0, 1]); beta
    finite and > -1 (the layout divides by beta + 1); alpha an int step count >= 0 or a
    float fraction of the steps in (0, 1]; steps in [1, 1000]; height and width positive
    multiples of `vae_factor`, each at most MAX_IMAGE_SIDE px, and num_images x height x
    width at most MAX_BATCH_PIXELS (larger latents would not fit a device's memory), or both
    None (the base model's native size: checked again once the pipeline has filled it in); time
    ids 2 integers each, and given only to a family that has them (`family`: the base model's
    `base_models` family; None skips that question, which the sampler's
    `family.request_extras` then answers).
    """
    if not isinstance(request.identities, list) or not all(isinstance(i, IdentityRequest) for i in request.identities):
        raise InputError(f"{label('identities')} must be a list of identities, got {request.identities!r}")
    n = len(request.identities)
    if n and not identity_branch:
        raise InputError("--ref needs DynamicID weights (--dynamicid): a base model alone makes plain "
                         "text-to-image pictures (drop --ref)")
    if n == 0 and identity_branch:
        raise InputError("at least one identity (--ref) is required")
    for i, ident in enumerate(request.identities):
        _check_identity(label, i, ident)
    if not isinstance(request.prompt, str):
        raise InputError(f"{label('prompt')} must be text, got {request.prompt!r}")
    _optional_text(label("negative_prompt"), request.negative_prompt)  # None: the family's, filled in later
    given = [ident.box is not None or ident.mask is not None for ident in request.identities]
    if any(given) and not all(given):
        raise InputError(f"boxes and identities differ in count: {sum(given)} boxes or masks for {n} identities")
    boxes = [ident.box for ident in request.identities if ident.box is not None]
    if boxes:
        try:
            validate_boxes(np.asarray(boxes, np.float32))
        except (TypeError, ValueError) as e:
            raise InputError(f"{label('box')}: {e}") from e
    _finite(label("guidance"), request.guidance)
    _finite(label("id_scale"), request.id_scale)
    _finite(label("beta"), request.beta, above=-1.0)
    if request.mix is not None:
        _finite(label("mix"), request.mix)
        if not 0.0 <= request.mix <= 1.0:
            raise InputError(f"{label('mix')} must be in [0, 1], got {request.mix}")
    if not isinstance(request.gating, (bool, np.bool_)):
        raise InputError(f"{label('gating')} must be true or false, got {request.gating!r}")
    sized = request.height is not None and request.width is not None  # else the pipeline fills both
    for name in ("seed", "steps", "num_images", "clip_skip") + (("height", "width") if sized else ()):
        if not _is_int(getattr(request, name)):
            raise InputError(f"{label(name)} must be an integer, got {getattr(request, name)!r}")
    if (request.height is None) != (request.width is None):
        raise InputError(f"{label('height')} and {label('width')} come together (or neither: the base model's "
                         f"native size), got {request.height!r} and {request.width!r}")
    for name in ("height", "width") if sized else ():
        value = getattr(request, name)
        if value <= 0 or value % vae_factor:
            raise InputError(f"{label(name)} must be a positive multiple of {vae_factor}, got {value}")
        if value > MAX_IMAGE_SIDE:
            raise InputError(f"{label(name)} {value} exceeds the {MAX_IMAGE_SIDE} px limit (its latents would not fit)")
    if not isinstance(request.scheduler, str) or request.scheduler not in schedulers.SCHEDULERS:
        raise InputError(f"{label('scheduler')} {request.scheduler!r} is unknown; choose one of "
                         f"{', '.join(schedulers.SCHEDULERS)}")
    # LCM picks its steps from a 50-step distillation schedule.
    limit = schedulers.samplers.LCM_ORIGINAL_STEPS if request.scheduler == "lcm" else 1000
    if not 1 <= request.steps <= limit:
        raise InputError(f"{label('steps')} must be in [1, {limit}] for {label('scheduler')} {request.scheduler}, "
                         f"got {request.steps}")
    if request.clip_skip < 0:
        raise InputError(f"{label('clip_skip')} must be >= 0, got {request.clip_skip}")
    embeddings = request.negative_embeddings
    if not isinstance(embeddings, list) or not all(isinstance(p, str) and p for p in embeddings):
        raise InputError(f"{label('negative_embeddings')} must be a list of embedding file paths, got {embeddings!r}")
    if request.num_images < 1:
        raise InputError(f"{label('num_images')} must be >= 1, got {request.num_images}")
    pixels = request.num_images * request.height * request.width if sized else 0
    if pixels > MAX_BATCH_PIXELS:
        raise InputError(
            f"{label('num_images')} {request.num_images} x {label('height')} {request.height} x {label('width')} "
            f"{request.width} = {pixels} pixels exceeds the {MAX_BATCH_PIXELS} per call (the latents would not fit): "
            "make fewer images per call"
        )
    check_masks(request, vae_factor)
    _check_time_ids(request, label, family)
    alpha = request.alpha
    if _is_int(alpha):
        if alpha < 0:
            raise InputError(f"{label('alpha')} as a step count must be >= 0, got {alpha}")
    elif isinstance(alpha, (float, np.floating)):
        if not (math.isfinite(alpha) and 0.0 < alpha <= 1.0):
            raise InputError(f"{label('alpha')} as a fraction must be in (0, 1], got {alpha}")
    else:
        raise InputError(f"{label('alpha')} must be a step count (e.g. 12) or a fraction in (0, 1] (e.g. 0.24), "
                         f"got {alpha!r}")


def check_masks(request: SampleRequest, vae_factor: int) -> None:
    """Read every mask file of the request once (masks.picture_region: readable, the picture's
    aspect ratio, not empty, covering a latent cell); InputError naming the file otherwise.
    A request without a size yet is checked when the pipeline has filled it in."""
    if request.height is None:
        return
    picture = (request.height, request.width)
    for i, ident in enumerate(request.identities):
        if ident.mask is not None:
            try:
                masks.picture_region(ident.mask, picture, (request.height // vae_factor, request.width // vae_factor))
            except masks.MaskError as e:
                raise InputError(f"identity {i}: {e}") from None


def check_images_readable(request: SampleRequest) -> None:
    """Read every reference and target-landmark photo once, so a bad file fails before any
    model is loaded or compiled (InputError naming it)."""
    for ident in request.identities:
        for path in ident.refs + ([ident.target_landmarks] if ident.target_landmarks else []):
            read_image(path)


def check_embeddings_readable(request: SampleRequest, widths: Optional[Sequence[int]] = None) -> None:
    """Read every textual-inversion file of the request once (`widths`: the text encoders',
    `family.embedding_widths`), so a bad or mis-sized file fails before any model loads."""
    loaded = [textual_inversion.read_embedding(p, widths) for p in request.negative_embeddings]
    textual_inversion.check_names(loaded)


def read_image(path: str | pathlib.Path) -> np.ndarray:
    """Upright RGB uint8 (H, W, 3) via the one reader (`dynamicid_jax.images.read_rgb`: EXIF
    orientation, every PIL mode); InputError naming the file when it cannot be read."""
    try:
        return images.read_rgb(path)
    except images.ImageError as e:
        raise InputError(str(e)) from None
