"""The evaluation protocol: a test-set file expanded into deterministic generation cases.

A test set (JSON, or YAML with a .yaml/.yml suffix) names identities and their reference
photos, prompt templates of three kinds (context, action, style), the requested edits
(expression + orientation) and seeds. Example: `configs/eval/tiny.json`.

    {
      "name": "tiny",
      "identities": {"obama": {"refs": ["obama.jpg"], "noun": "man"}, ...},   # + "mask": "left.png"
      "groups": [["obama", "biden"]],                  # multi-ID mode: who appears together
      "prompts": [{"name": "cafe", "kind": "context",
                   "template": "a photo of {subjects} sitting in a cafe"}, ...],
      "edits": [{"expression": "happy", "orientation": "front"}, ...],
      "seeds": [0, 1],
      "sampling": {"steps": 50}                        # optional overrides of the sampler defaults
    }

Reference paths are relative to the test-set file's folder; `$VARS` are expanded first.
An identity may name a "mask" (its region in every picture it is in, white = region;
masks.py), relative to the file like a request line's: in a group, every person or none.
The mask file must be readable here; `launch/evaluate.py` checks the rest (not empty, the
pictures' aspect ratio, a latent cell covered) per group before any model loads.
Each subject is written into the prompt with explicit descriptors ("a happy man in front
view"); with IMR on, the identity also gets the face prompt "the expression is happy, the
face is front view". The requested expression/orientation labels are what Expr/Pose score.

Multi-ID mode: for edit k, the i-th person of a group gets edit (k + i) mod E, so people in
one picture are asked for different expressions/orientations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Mapping, Optional

from dynamicid_jax import masks
from dynamicid_jax.errors import MissingFileError, UserError
from dynamicid_jax.images import ImageError, check_image
from dynamicid_jax.input_files import read_text
from dynamicid_jax.evaluation.face_metrics import POSE_CATEGORIES
from dynamicid_jax.faces.expression import EMOTIONS
from dynamicid_jax.request import IdentityRequest, InputError, SampleRequest
from dynamicid_jax.request_parsing import parse_identity

MODES = ("single", "multi")
IDENTITY_KEYS = ("refs", "noun", "mask")
PROMPT_KINDS = ("context", "action", "style")
# The words DynamicID's training prompts use for the classifier's labels (KDEF-style prompts).
EXPRESSION_WORDS = {
    "happy": "happy", "surprise": "surprised", "sad": "sad", "anger": "angry", "disgust": "disgusted",
    "fear": "afraid", "neutral": "neutral",
}
# Orientation -> (phrase in the main prompt, phrase in the face prompt).
ORIENTATION_WORDS = {
    "front": ("in front view", "front view"),
    "side": ("in side view", "side view"),
    "up": ("facing up", "facing up"),
    "down": ("facing down", "facing down"),
}
FACE_PROMPT = "the expression is {expression}, the face is {orientation}"
SUBJECT_PHRASE = "{article} {expression} {noun} {orientation}"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class ProtocolError(UserError, ValueError):
    """A test-set file that cannot be used; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Identity:
    name: str
    refs: tuple[str, ...]  # absolute paths
    noun: str = "person"
    mask: Optional[str] = None  # the person's region in every picture (a mask file), else none given


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    name: str
    kind: str  # one of PROMPT_KINDS
    template: str  # contains "{subjects}"


@dataclasses.dataclass(frozen=True)
class Edit:
    expression: str  # one of EMOTIONS
    orientation: str  # one of POSE_CATEGORIES

    @property
    def tag(self) -> str:
        return f"{self.expression}-{self.orientation}"


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    identities: Mapping[str, Identity]
    prompts: tuple[PromptTemplate, ...]
    edits: tuple[Edit, ...]
    seeds: tuple[int, ...]
    groups: tuple[tuple[str, ...], ...] = ()
    sampling: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Ablation:
    """gating=False: SAA without its activation map (plain decoupled cross-attention);
    imr=False: no face prompt and no landmark edit, tokens straight from the projection."""

    gating: bool = True
    imr: bool = True

    @property
    def tag(self) -> str:
        parts = [p for p, on in (("nogating", self.gating), ("noimr", self.imr)) if not on]
        return "-".join(parts) or "full"

    @property
    def label(self) -> str:
        """The paper's Table 3 wording ("w/o SAA" is its name for the gating ablation)."""
        parts = [p for p, on in (("w/o SAA", self.gating), ("w/o IMR", self.imr)) if not on]
        return "DynamicID" + (" " + ", ".join(parts) if parts else "")


@dataclasses.dataclass(frozen=True)
class SubjectCase:
    identity: Identity
    edit: Edit

    def face_prompt(self) -> str:
        return FACE_PROMPT.format(expression=EXPRESSION_WORDS[self.edit.expression],
                                  orientation=ORIENTATION_WORDS[self.edit.orientation][1])

    def phrase(self) -> str:
        word = EXPRESSION_WORDS[self.edit.expression]
        return SUBJECT_PHRASE.format(article="an" if word[0] in "aeiou" else "a", expression=word,
                                     noun=self.identity.noun, orientation=ORIENTATION_WORDS[self.edit.orientation][0])


@dataclasses.dataclass(frozen=True)
class EvalCase:
    """One generated image: who, which prompt and edits, which seed, which ablation."""

    mode: str
    subjects: tuple[SubjectCase, ...]
    prompt: PromptTemplate
    seed: int
    ablation: Ablation

    @property
    def group(self) -> str:
        return "+".join(s.identity.name for s in self.subjects)

    @property
    def edit_tag(self) -> str:
        return "+".join(s.edit.tag for s in self.subjects)

    @property
    def stem(self) -> str:
        """Deterministic file stem, unique within one mode and ablation."""
        return f"{self.group}__{self.prompt.name}__{self.edit_tag}__seed{self.seed}"

    @property
    def relative_path(self) -> pathlib.PurePosixPath:
        """Where the image lives under the output folder."""
        return pathlib.PurePosixPath("images", self.mode, self.ablation.tag, f"{self.stem}.png")

    def prompt_text(self) -> str:
        return self.prompt.template.format(subjects=" and ".join(s.phrase() for s in self.subjects))

    def sample_request(self, sampling: Mapping[str, Any]) -> SampleRequest:
        """The sampler request. sampling: steps, guidance, height, width, alpha, beta, id_scale,
        negative_prompt (the config's defaults with the protocol's overrides)."""
        identities = [
            IdentityRequest(refs=list(s.identity.refs), face_prompt=s.face_prompt() if self.ablation.imr else None,
                            mask=s.identity.mask)
            for s in self.subjects
        ]
        return SampleRequest(
            identities=identities, prompt=self.prompt_text(), negative_prompt=sampling["negative_prompt"],
            seed=self.seed, steps=int(sampling["steps"]), guidance=float(sampling["guidance"]),
            height=int(sampling["height"]), width=int(sampling["width"]), num_images=1, alpha=sampling["alpha"],
            beta=float(sampling["beta"]), id_scale=float(sampling["id_scale"]), gating=self.ablation.gating,
            scheduler=str(sampling.get("scheduler", "ddim")),
            negative_embeddings=list(sampling.get("negative_embeddings", ())),
        )


SAMPLING_KEYS = ("steps", "guidance", "height", "width", "alpha", "beta", "id_scale", "negative_prompt", "scheduler")
_SAMPLING_TYPES = {"steps": int, "height": int, "width": int, "guidance": (int, float), "beta": (int, float),
                   "id_scale": (int, float), "alpha": (int, float), "negative_prompt": str, "scheduler": str}
_SAMPLING_TYPE_NAMES = {k: "an integer" if v is int else "text" if v is str else "a number"
                        for k, v in _SAMPLING_TYPES.items()}


def expand_cases(
    protocol: Protocol, mode: str, ablation: Ablation, seeds: Optional[tuple[int, ...]] = None
) -> list[EvalCase]:
    """Every image of the protocol in a fixed order: group, prompt, edit, seed.

    single: each identity alone. multi: each of `protocol.groups` (edits rotated per person).
    seeds: override the protocol's seeds.
    """
    if mode not in MODES:
        raise ProtocolError(f"mode must be one of {MODES}, got {mode!r}")
    seeds = tuple(protocol.seeds if seeds is None else seeds)
    if not seeds:
        raise ProtocolError("no seeds to evaluate")
    if mode == "single":
        groups = [(name,) for name in protocol.identities]
    else:
        if not protocol.groups:
            raise ProtocolError(f"test set {protocol.name!r} has no 'groups': multi-ID mode needs them")
        groups = list(protocol.groups)
    cases = []
    for group in groups:
        for prompt in protocol.prompts:
            for k in range(len(protocol.edits)):
                subjects = tuple(
                    SubjectCase(protocol.identities[name], protocol.edits[(k + i) % len(protocol.edits)])
                    for i, name in enumerate(group)
                )
                cases.extend(EvalCase(mode, subjects, prompt, seed, ablation) for seed in seeds)
    return cases


# ----------------------------------------------------------------------------- reading


def _read_file(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise MissingFileError(f"test set not found: {path}")
    text = read_text(path, "test set")  # size-bounded, UTF-8
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json and yaml raise their own types
        raise ProtocolError(f"{path}: cannot parse: {e}") from e
    if not isinstance(data, dict):
        raise ProtocolError(f"{path}: the top level must be a mapping")
    return data


def _check_name(path, field: str, name) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ProtocolError(f"{path}: {field} {name!r} must be letters, digits, '_', '.' or '-' (it names files)")
    return name


def _shaped(path, field: str, value, kind: type, items: Optional[type] = None):
    """`value` when it is a `kind` whose items (a mapping's values) are `items`; ProtocolError
    naming the field otherwise."""
    names = {dict: ("a mapping", "mappings"), list: ("a list", "lists"), str: ("text", "texts")}
    members = value.values() if isinstance(value, dict) else value
    if not isinstance(value, kind) or (items is not None and not all(isinstance(v, items) for v in members)):
        inner = f" of {names[items][1]}" if items is not None else ""
        raise ProtocolError(f"{path}: '{field}' must be {names[kind][0]}{inner}, got {value!r:.60}")
    return value


def _mask(path: pathlib.Path, name: str, mask, refs: list) -> Optional[str]:
    """Identity `name`'s "mask", resolved by the request parser (relative to the test-set
    file, as in a request line) and readable; None when not given."""
    if mask is None:
        return None
    if not _shaped(path, f"identities.{name}.mask", mask, str).strip():
        raise ProtocolError(f"{path}: identity {name!r}: 'mask' is blank; name a mask file or leave the key out")
    try:
        mask = parse_identity({"refs": refs, "mask": os.path.expandvars(mask)}, 0, base=path.parent.resolve()).mask
        masks.read_mask(mask)
    except (InputError, masks.MaskError) as e:
        raise ProtocolError(f"{path}: identity {name!r}: {e}") from None
    return mask


def load_protocol(path: str | os.PathLike) -> Protocol:
    """Read and validate a test-set file (see the module docstring). Reference photos must exist."""
    path = pathlib.Path(path)
    data = _read_file(path)
    known = {"name", "description", "identities", "groups", "prompts", "edits", "seeds", "sampling"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProtocolError(f"{path}: unknown field(s) {unknown}; known: {sorted(known)}")
    for field in ("identities", "prompts", "edits", "seeds"):
        if not data.get(field):
            raise ProtocolError(f"{path}: '{field}' is missing or empty")
    # The shapes before any walk over them (a list where a mapping belongs is one line, not a traceback).
    _shaped(path, "identities", data["identities"], dict)
    _shaped(path, "prompts", data["prompts"], list, dict)
    _shaped(path, "edits", data["edits"], list, dict)
    _shaped(path, "seeds", data["seeds"], list)
    _shaped(path, "groups", data.get("groups", []), list, list)
    _shaped(path, "sampling", data.get("sampling", {}), dict)
    _shaped(path, "name", data.get("name", path.stem), str)

    identities = {}
    for name, spec in data["identities"].items():
        _check_name(path, "identity", name)
        refs = spec.get("refs") if isinstance(spec, dict) else None
        if not refs or not isinstance(refs, list):
            raise ProtocolError(f"{path}: identity {name!r} needs a non-empty 'refs' list")
        _shaped(path, f"identities.{name}.refs", refs, list, str)
        _shaped(path, f"identities.{name}.noun", spec.get("noun", "person"), str)
        unknown = sorted(set(spec) - set(IDENTITY_KEYS))
        if unknown:  # a misspelt "mask" must not be ignored
            raise ProtocolError(f"{path}: identity {name!r}: unknown field(s) {unknown}; known: {list(IDENTITY_KEYS)}")
        resolved = []
        for ref in refs:
            ref_path = pathlib.Path(os.path.expandvars(str(ref)))
            ref_path = (ref_path if ref_path.is_absolute() else path.parent / ref_path).resolve()
            if not ref_path.is_file():
                raise ProtocolError(f"{path}: identity {name!r}: reference photo not found: {ref_path}")
            try:
                check_image(ref_path)
            except ImageError as e:
                raise ProtocolError(f"{path}: identity {name!r}: {e}") from None
            resolved.append(str(ref_path))
        identities[name] = Identity(name, tuple(resolved), str(spec.get("noun", "person")),
                                    _mask(path, name, spec.get("mask"), resolved))

    prompts, seen = [], set()
    for i, spec in enumerate(data["prompts"]):
        name = _check_name(path, f"prompts[{i}].name", spec.get("name"))
        kind, template = spec.get("kind"), spec.get("template")
        if kind not in PROMPT_KINDS:
            raise ProtocolError(f"{path}: prompt {name!r}: kind {kind!r} is not one of {PROMPT_KINDS}")
        if not isinstance(template, str) or "{subjects}" not in template:
            raise ProtocolError(f"{path}: prompt {name!r}: template must contain '{{subjects}}'")
        if name in seen:
            raise ProtocolError(f"{path}: prompt name {name!r} used twice")
        seen.add(name)
        prompts.append(PromptTemplate(name, kind, template))

    edits = []
    for i, spec in enumerate(data["edits"]):
        expression, orientation = spec.get("expression"), spec.get("orientation")
        if expression not in EMOTIONS:
            raise ProtocolError(f"{path}: edits[{i}]: expression {expression!r} is not one of {EMOTIONS}")
        if orientation not in POSE_CATEGORIES:
            raise ProtocolError(f"{path}: edits[{i}]: orientation {orientation!r} is not one of {POSE_CATEGORIES}")
        edits.append(Edit(expression, orientation))
    if len(set(edits)) != len(edits):
        raise ProtocolError(f"{path}: 'edits' lists the same expression/orientation twice")

    seeds = data["seeds"]
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ProtocolError(f"{path}: 'seeds' must be distinct integers in [0, 2**63), got {seeds}")

    groups = []
    for i, group in enumerate(data.get("groups", [])):
        _shaped(path, f"groups[{i}]", group, list, str)
        missing = [n for n in group if n not in identities]
        if missing or len(group) < 2 or len(set(group)) != len(group):
            raise ProtocolError(f"{path}: group {group}: needs 2+ distinct known identities (unknown: {missing})")
        with_mask = [n for n in group if identities[n].mask]
        if with_mask and len(with_mask) != len(group):
            raise ProtocolError(f"{path}: group {group}: only {with_mask} have a 'mask': give every person of "
                                "a group a mask, or none")
        groups.append(tuple(group))

    sampling = dict(data.get("sampling", {}))
    bad = sorted(set(sampling) - set(SAMPLING_KEYS))
    if bad:
        raise ProtocolError(f"{path}: sampling field(s) {bad} unknown; known: {list(SAMPLING_KEYS)}")
    for key, value in sampling.items():  # types here; ranges by validate_request, before any model loads
        if not isinstance(value, _SAMPLING_TYPES[key]) or isinstance(value, bool):
            raise ProtocolError(f"{path}: sampling.{key} {value!r:.80} must be {_SAMPLING_TYPE_NAMES[key]}")
    return Protocol(
        name=str(data.get("name", path.stem)), identities=identities, prompts=tuple(prompts), edits=tuple(edits),
        seeds=tuple(seeds), groups=tuple(groups), sampling=sampling,
    )
