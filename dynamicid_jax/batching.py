"""Rows of one denoising batch: images of (possibly different) requests -> per-image arrays.

A batch holds N images. Image i is row i of every per-image array, and its classifier-free
guidance pair stays inside that row ([negative, positive] on a second axis), so splitting
the image axis over devices never separates a pair:

    noise      (N, h, w, C)         row i = image `index` of the seed's draw (N_req, h, w, C)
    conditioning                    a `base_models.TextConditioning` of [negative prompt, prompt]
                                    (the negative as `family.negative_conditioning` says):
                                    context (N, 2, L, D) and the family's extras (N, 2, ...)
    id_tokens  (N, 2, n, T, D)      [unconditional tokens, identity tokens] of the n people
    boxes      (N, n, 4)            normalised boxes (the default strips when none are given);
                                    both absent for requests without identities (plain
                                    text-to-image on a base model without the identity branch)
    masks      (N, n, h, w)         only when a request has a mask (`uses_masks`): each person's
    mask_used  (N, n) bool          mask on the latent grid (masks.py; 0 for a box) and which are masks
    guidance, beta, id_scale, mix (N,) float32; alpha_count (N,) int32
    step_key   (N, 2) uint32        the image's key of the ancestral samplers' per-step noise

Every value that changes only numbers is a row; everything that changes the program or the
shared loop is in `shape_key`, the one place that decides which requests may share a batch.
Text states and identity tokens are computed once per distinct text / identity
(`ConditioningCache`), each with batch 1, so a row's inputs do not depend on its batch.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np

from dynamicid_jax import masks
from dynamicid_jax.base_models import conditioning as text_conditioning
from dynamicid_jax.base_models.conditioning import TextConditioning
from dynamicid_jax.dynamicid.saa import alpha_steps, default_boxes
from dynamicid_jax.request import time_ids


@dataclasses.dataclass(frozen=True)
class ImageItem:
    """Picture `index` (0 <= index < request.num_images) of a SampleRequest."""

    request: Any
    index: int


def uses_boxes(request) -> bool:
    """Layout control and routing are on for several people, or one person with a box or mask
    (never without identities: plain text-to-image)."""
    return len(request.identities) > 1 or (bool(request.identities) and (
        request.identities[0].box is not None or uses_masks(request)))


def uses_masks(request) -> bool:
    """Some person's region is a mask: the rows carry masks (another program than boxes only)."""
    return any(ident.mask is not None for ident in request.identities)


def program_key(request) -> tuple:
    """Requests with equal keys run one compiled denoising program (batch size aside): image
    size and identity count fix the shapes; gating, box use and mixing are static switches of
    SAA. Steps, sampler and every number of the request are traced."""
    return request.height, request.width, len(request.identities), bool(request.gating), uses_boxes(request), \
        request.mix is not None, uses_masks(request)


def shape_key(request) -> tuple:
    """Requests with equal keys share one compiled denoising program and one loop: the
    `program_key`, and the steps and the sampler that fix the loop's schedule and trip count
    (shared by the batch)."""
    return program_key(request) + (request.steps, request.scheduler)


def request_boxes(request) -> np.ndarray:
    """(n, 4) float32: the given boxes (zeros for a person whose region is a mask), or n vertical strips."""
    if any(ident.box is not None or ident.mask is not None for ident in request.identities):
        return np.asarray([ident.box if ident.mask is None else [0.0] * 4 for ident in request.identities], np.float32)
    return default_boxes(len(request.identities)).astype(np.float32)


def identity_key(ident) -> str:
    """What an identity's tokens depend on (not its region)."""
    data = dataclasses.asdict(ident)
    data.pop("box", None)
    data.pop("mask", None)
    return json.dumps(data, sort_keys=True)


class ConditioningCache:
    """Text states per distinct text and identity tokens per distinct identity of a pipeline.

    pipeline: a DynamicIDPipeline (`text_features`, `identity_tokens`, `unconditional_tokens`).
    Every text is encoded alone (batch 1) so its states are the same in any batch. Sizes are
    small (one text's context, T tokens per identity); `max_entries` bounds each table
    for runs over very many prompts (oldest dropped first).
    """

    def __init__(self, pipeline, max_entries: int = 8192):
        self.pipeline = pipeline
        self.max_entries = max_entries
        self._texts: dict[tuple[str, int, tuple], TextConditioning] = {}
        self._identities: dict[str, tuple[np.ndarray, dict]] = {}
        self._uncond = None

    def _remember(self, table: dict, key, value):
        if len(table) >= self.max_entries:
            table.pop(next(iter(table)))
        table[key] = value
        return value

    def text(self, text: str, clip_skip: int = 0, embeddings=()) -> TextConditioning:
        """The text's conditioning, context (L, D) (`clip_skip` layers before the last;
        `embeddings` the textual-inversion files whose names the text may use)."""
        key = (text, clip_skip, tuple(embeddings))
        if key not in self._texts:
            conditioning, _ = self.pipeline.text_features([text], clip_skip, embeddings)
            self._remember(self._texts, key, jax.tree.map(lambda a: np.asarray(a[0]), conditioning))
        return self._texts[key]

    def identity(self, ident) -> tuple[np.ndarray, dict]:
        """((T, D) tokens, what was used); raises the pipeline's user errors (no face, ...)."""
        key = identity_key(ident)
        if key not in self._identities:
            tokens, info = self.pipeline.identity_tokens(ident)
            self._remember(self._identities, key, (np.asarray(tokens), info))
        return self._identities[key]

    def unconditional(self) -> np.ndarray:
        """(T, D) tokens of no identity."""
        if self._uncond is None:
            self._uncond = np.asarray(self.pipeline.unconditional_tokens())
        return self._uncond

    def prepare(self, request) -> None:
        """Compute (and cache) everything `request` needs; raises its user errors now. The
        request is completed by its pipeline first (a negative prompt left None: the family's)."""
        self.pipeline.complete(request)
        self.text(request.negative_prompt, request.clip_skip, request.negative_embeddings)
        self.text(request.prompt, request.clip_skip, request.negative_embeddings)
        for ident in request.identities:
            self.identity(ident)


def request_details(request, cache: ConditioningCache) -> dict:
    """The sidecar's `resolved` section: boxes, identities' prompts, alpha as a step count, the
    family's per-picture extras (SDXL: the six time ids) and, when used, each
    textual-inversion file's name, sha256 and vector count and each mask's sha256 (the engine
    adds every input file's: `outputs.input_records`)."""
    details = {
        "boxes_used": request_boxes(request).tolist() if uses_boxes(request) else None,
        "identities_used": [cache.identity(ident)[1] for ident in request.identities],
        "alpha_steps": alpha_steps(request.alpha, request.steps),
    }
    if uses_masks(request):
        details["boxes_used"] = [None if ident.mask else box for ident, box in zip(request.identities,
                                                                                 details["boxes_used"])]
        details["masks"] = [masks.record(ident.mask) for ident in request.identities if ident.mask is not None]
    family = cache.pipeline.modules.family  # the family's per-picture extras as used (SDXL: time_ids)
    details.update({k: v.tolist() for k, v in family.request_extras(request.height, request.width,
                                                                    **time_ids(request)).items()})
    if request.negative_embeddings:
        details["negative_embeddings"] = [cache.pipeline.embedding(p).record() for p in request.negative_embeddings]
    return details


def mask_rows(requests, latent_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """{"masks": (N, n, H, W) bool, "mask_used": (N, n) bool}: each person's region on the
    picture's pixels (`masks.picture_region`, the rule of dynamicid/regions.py; False where
    the region is a box)."""
    regions = [[masks.picture_region(ident.mask, (r.height, r.width), latent_hw) if ident.mask is not None
                else np.zeros((r.height, r.width), bool) for ident in r.identities] for r in requests]
    used = [[ident.mask is not None for ident in r.identities] for r in requests]
    return {"masks": np.asarray(regions, bool), "mask_used": np.asarray(used, bool)}


def noise_rows(items: list[ImageItem], latent_hwc: tuple[int, int, int]) -> np.ndarray:
    """(N, h, w, C) float32: row i is image `index` of normal(PRNGKey(seed), (num_images, h, w, C)),
    the same draw a request alone makes, so an image's noise does not depend on its batch."""
    draws: dict[tuple[int, int], np.ndarray] = {}
    rows = []
    for item in items:
        key = (item.request.seed, item.request.num_images)
        if key not in draws:
            draws[key] = np.asarray(jax.random.normal(jax.random.PRNGKey(key[0]), (key[1],) + tuple(latent_hwc)))
        rows.append(draws[key][item.index])
    return np.stack(rows).astype(np.float32)


def step_keys(seeds_and_indices) -> np.ndarray:
    """(N, 2) uint32: image k of seed s draws its per-step noise (Euler ancestral, LCM) from
    its own key (`schedulers.step_noise_key(s, k)`), so it depends on its request only, never
    on the batch around it. seeds_and_indices: (seed, image index) per row."""
    from dynamicid_jax.schedulers import step_noise_key

    return np.stack([step_noise_key(s, k) for s, k in seeds_and_indices]).astype(np.uint32)


def assemble(items: list[ImageItem], cache: ConditioningCache, latent_hwc: tuple[int, int, int],
             pad_to: int | None = None) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Per-image arrays of `items` (equal `shape_key`; see the module docstring) and each
    item's sidecar details. pad_to: repeat the last row up to this many rows, so a short last
    batch reuses the full batch's program (padding rows are computed and dropped)."""
    keys = {shape_key(item.request) for item in items}
    if len(keys) != 1:
        raise ValueError(f"a batch needs one shape_key, got {sorted(keys)}")
    rows = list(items) + [items[-1]] * max(0, (pad_to or 0) - len(items))
    with_identities = bool(items[0].request.identities)  # equal over the batch (shape_key)
    uncond = cache.unconditional() if with_identities else None
    family = cache.pipeline.modules.family
    conditioning, tokens, boxes = [], [], []
    for item in rows:
        r = item.request
        negative = family.negative_conditioning(cache.text(r.negative_prompt, r.clip_skip, r.negative_embeddings),
                                                r.negative_prompt)
        pair = text_conditioning.stack([negative, cache.text(r.prompt, r.clip_skip, r.negative_embeddings)])
        size_extras = {k: np.stack([v, v]) for k, v in family.request_extras(r.height, r.width, **time_ids(r)).items()}
        conditioning.append(pair.replace(extras={**pair.extras, **size_extras}))
        if with_identities:
            ids = np.stack([cache.identity(ident)[0] for ident in r.identities])  # (n, T, D)
            tokens.append(np.stack([np.broadcast_to(uncond, ids.shape), ids]))
            boxes.append(request_boxes(r))
    per_row = lambda f, dtype: np.asarray([f(item.request) for item in rows], dtype)  # noqa: E731
    arrays = {
        "noise": noise_rows(rows, latent_hwc),
        "step_key": step_keys([(item.request.seed, item.index) for item in rows]),
        "conditioning": text_conditioning.stack(conditioning),
        "guidance": per_row(lambda r: r.guidance, np.float32),
        "alpha_count": per_row(lambda r: alpha_steps(r.alpha, r.steps), np.int32),
        "beta": per_row(lambda r: r.beta, np.float32),
        "id_scale": per_row(lambda r: r.id_scale, np.float32),
        "mix": per_row(lambda r: 0.0 if r.mix is None else r.mix, np.float32),
    }
    if with_identities:  # absent in plain text-to-image (a base model without the identity branch)
        arrays.update(id_tokens=np.stack(tokens), boxes=np.stack(boxes))
    if uses_masks(items[0].request):
        arrays.update(mask_rows([item.request for item in rows], latent_hwc[:2]))
    details = {}
    for item in items:
        if id(item.request) not in details:
            details[id(item.request)] = request_details(item.request, cache)
    return arrays, [details[id(item.request)] for item in items]
