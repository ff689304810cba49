"""What the app's page calls: one `DynamicIDPipeline`, one generation at a time.

AppService.run(request) goes through the engine of `launch/sample.py` (`generation.run_request`:
the same sampler, so the same request gives the same PNG bytes; atomic PNG + sidecar writes)
into a fresh subfolder of the app's output folder per run (no client picks a path), and
reports steps to a progress callback; `cancel()` stops the running generation between two
denoising steps. A request of a program not yet compiled (`batching.program_key`, the image
count, activation maps) is logged before and after its compile.

Style LoRAs a client picks (by name, `catalog.py`) are merged into the base weights once per
choice and kept (at most MAX_LORA_SETS choices, least recently used dropped); each choice has
its own text-state cache, since a LoRA may change the text encoder.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import pathlib
import secrets
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np

from dynamicid_jax import batching
from dynamicid_jax.app import forms, previews
from dynamicid_jax.app.catalog import Catalog, embedding_catalog, lora_catalog, public_name
from dynamicid_jax.errors import UserError
from dynamicid_jax.faces import NoFaceError
from dynamicid_jax.generation import RequestSampler, run_request
from dynamicid_jax.outputs import output_path
from dynamicid_jax.pipeline import DynamicIDPipeline
from dynamicid_jax.request import IdentityRequest, InputError, SampleRequest, read_image
from dynamicid_jax.request_parsing import setting_defaults

MAX_SEED = 2**31 - 1
# Merged LoRA choices kept besides the base weights: each is a copy of the UNet and the text
# encoder (SD1.5: ~4 GB in float32), so few; a choice dropped is merged again when picked.
MAX_LORA_SETS = 2


class Cancelled(Exception):
    """The user cancelled the running generation."""


@dataclasses.dataclass
class RunResult:
    images: list[pathlib.Path]  # PNGs
    sidecars: list[pathlib.Path]  # their JSON sidecars, same order
    maps: list[tuple[np.ndarray, str]]  # activation overlays (RGB uint8) with captions
    request: SampleRequest  # as run (server paths); the sidecars hold the public copy
    seconds: float
    # the maps the overlays draw, {0-based step: (N, n_people, h, w) float32} (`activation_steps`;
    # empty without activation maps), for API users and tests that measure where people went
    activation: dict = dataclasses.field(default_factory=dict)


def activation_steps(steps: int) -> list[int]:
    """The few 0-based steps whose activation maps are shown: first, thirds, last."""
    return sorted({0, steps // 3, (2 * steps) // 3, steps - 1})


def program_of(request: SampleRequest, maps: bool) -> tuple:
    """What selects the app's compiled program: `batching.program_key`, the image count (the
    app computes a request alone, unpadded) and whether activation maps are captured."""
    return batching.program_key(request), request.num_images, maps


def describe_program(request: SampleRequest, maps: bool) -> str:
    extras = [x for x, on in (("boxes", batching.uses_boxes(request)), ("no gating", not request.gating),
                               ("mixing", request.mix is not None), ("activation maps", maps)) if on]
    return (f"{request.width}x{request.height}, {request.num_images} image(s), {len(request.identities)} people"
            + (f", {', '.join(extras)}" if extras else ""))


class AppService:
    """pipeline: a loaded DynamicIDPipeline; defaults: the config's sampling section; out_dir:
    where runs are written; upload_root: the folder uploads land in (the only place input files
    are read from). loras, embeddings: the operator's files offered by name (`catalog.py`);
    settings: page defaults overriding `defaults` (e.g. the operator's --scheduler)."""

    def __init__(self, pipeline: DynamicIDPipeline, defaults, out_dir, upload_root, log: Callable[[str], None] = print,
                 *, loras: Optional[Catalog] = None, embeddings: Optional[Catalog] = None,
                 settings: Optional[dict] = None, lora_skip_unknown: bool = False):
        self.pipeline = pipeline
        self.defaults = defaults
        self.settings = dict(setting_defaults(defaults), **(settings or {}))  # every setting's page default
        self.loras = loras if loras is not None else lora_catalog()
        self.embeddings = embeddings if embeddings is not None else embedding_catalog()
        self.lora_skip_unknown = lora_skip_unknown
        self._base = (pipeline.params, pipeline.conditioning)
        self._lora_sets: collections.OrderedDict = collections.OrderedDict()  # choice -> (params, cache, records)
        self.out_dir = pathlib.Path(out_dir).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.upload_root = pathlib.Path(upload_root).resolve()
        self.upload_root.mkdir(parents=True, exist_ok=True)
        self.log = log
        self._device = threading.Lock()  # one generation at a time on the device
        self._cancel = threading.Event()
        self._compiled: set[tuple] = set()
        self._runs = itertools.count()
        self.progress = (0, 0)  # (done, total) steps of the running generation

    # -- start-up -------------------------------------------------------------------------

    def default_request(self, n_people: int) -> SampleRequest:
        """The page's default settings for `n_people` (no photo, no embedding: nothing is read)."""
        settings = {k: v for k, v in self.settings.items() if k not in ("prompt", "negative_embeddings")}
        return SampleRequest(identities=[IdentityRequest(refs=["(warm-up)"]) for _ in range(n_people)], prompt="",
                             **settings)

    def warm_up(self, people=(1, 2)) -> None:
        """Compile the default size for these people counts and the identity programs (any
        photo size, face edits) now, so a first click does not wait for XLA. A base model
        without the identity branch has neither: its one plain text-to-image program."""
        if not self.pipeline.modules.identity_branch:
            people = (0,)
        else:
            start = time.time()
            with self._device:
                count = self.pipeline.warm_up_identity()
            self.log(f"compiled {count} identity program(s) (reference photos of any size, face edits) in "
                     f"{time.time() - start:.1f}s (start-up)")
        for n in people:
            request = self.default_request(n)
            self.log(f"compiling the sampling program for {describe_program(request, False)} (start-up) ...")
            start = time.time()
            with self._device:
                self.pipeline.warm_up(request, report_steps=True)  # requests report progress per step
            self._compiled.add(program_of(request, False))
            self.log(f"compiled {describe_program(request, False)} in {time.time() - start:.1f}s")

    # -- faces ----------------------------------------------------------------------------

    def _face(self, path: pathlib.Path):
        image = read_image(path)
        return image, self.pipeline.faces.largest_face(image, path.name)

    def describe(self, path) -> tuple[str, np.ndarray]:
        """(emotion, pose) of a reference's largest face, for composing a face prompt."""
        path = pathlib.Path(path)
        image, face = self._face(path)
        if self.pipeline.expressions is None:
            raise InputError("an expression/orientation choice needs the reference face described: start the app "
                             "with --expression_model, or type the face prompt")
        probs = self.pipeline.expressions.predict(image, face)
        return max(probs, key=probs.get), face.pose

    def analyse(self, path, person: int) -> tuple[np.ndarray, str]:
        """An uploaded reference -> (face crop with its box, the automatic source description)."""
        path = forms.check_upload(path, self.upload_root)
        try:
            image, face = self._face(path)
        except InputError as e:  # e.g. an unreadable file: named, without the server's path
            raise InputError(_without_paths(str(e), [path])) from None
        colour = previews.COLOURS[(person - 1) % len(previews.COLOURS)]
        description = self.pipeline.describe_face(image, face) if self.pipeline.expressions is not None else \
            "(no expression model: automatic description unavailable)"
        return previews.face_preview(image, face.bbox, colour), f"{path.name}: {description}"

    # -- generation -----------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the running generation after its current step (no effect when idle)."""
        self._cancel.set()

    def run(self, request: SampleRequest, *, random_seed: bool = False, with_maps: bool = False,
            loras: Sequence[tuple[str, float]] = ()) -> RunResult:
        """Generate and write one request with the style LoRAs `loras` ((name, scale) of the
        catalog's files, merged in order); InputError/NoFaceError name the bad input (by file
        name, never a server path), Cancelled when cancel() came first."""
        if random_seed:
            request = dataclasses.replace(request, seed=secrets.randbelow(MAX_SEED))
        paths = [p for i in request.identities for p in i.refs + ([i.target_landmarks] if i.target_landmarks else [])]
        paths += request.negative_embeddings
        with self._device:
            self._cancel.clear()  # inside the lock: a cancel meant for the previous run stays with it
            try:
                return self._run_locked(request, with_maps, tuple((n, float(s)) for n, s in loras))
            except (InputError, NoFaceError) as e:
                raise type(e)(_without_paths(str(e), paths)) from None
            except UserError as e:  # an operator's LoRA or embedding file that cannot be used
                raise InputError(_without_paths(str(e), paths + self.loras.paths([n for n, _ in loras]))) from None
            except Exception:
                if self._cancel.is_set():
                    raise Cancelled(f"cancelled after step {self.progress[0]} of {self.progress[1]}") from None
                raise

    def _on_progress(self, total: int):
        self.progress = (0, total)

        def step():
            if self._cancel.is_set():  # raised inside the loop's host callback: aborts the loop
                raise Cancelled("cancelled")
            self.progress = (self.progress[0] + 1, total)

        return step

    def _lora_set(self, choice: tuple) -> tuple:
        """(params, text-state cache, public records) of a LoRA choice, merged once and kept."""
        if choice in self._lora_sets:
            self._lora_sets.move_to_end(choice)
            return self._lora_sets[choice]
        import jax

        from dynamicid_jax.loading import merge_style_loras

        base = self._base[0]
        files = [(self.loras.path(name), scale) for name, scale in choice]
        merged, records = merge_style_loras(dict(base), files, self.lora_skip_unknown, self.log)
        # The merge is float32 on the host; the weights keep the pipeline's dtype (--dtype).
        merged = jax.device_put(jax.tree.map(lambda m, b: np.asarray(m).astype(b.dtype), merged, base))
        public = [dict({k: v for k, v in r.items() if k != "path"}, name=public_name(r["path"])) for r in records]
        if len(self._lora_sets) >= MAX_LORA_SETS:
            self._lora_sets.popitem(last=False)
        self._lora_sets[choice] = (merged, batching.ConditioningCache(self.pipeline), public)
        return self._lora_sets[choice]

    @contextlib.contextmanager
    def _weights(self, choice: tuple):
        """The pipeline with the LoRA choice merged (and its own text states) for one run;
        yields the provenance its sidecars record (the choice by name, `forms.PAGE_LORAS`)."""
        if not choice:
            yield self.pipeline.provenance
            return
        params, cache, records = self._lora_set(choice)
        self.pipeline.params, self.pipeline.conditioning = params, cache
        try:
            yield dict(self.pipeline.provenance, **{forms.PAGE_LORAS: records})
        finally:
            self.pipeline.params, self.pipeline.conditioning = self._base

    def run_folder(self, seed: int) -> pathlib.Path:
        """A new, empty folder under out_dir for one run, `run-NNNNN-SEED`, created here: numbers
        an app before this one (a restart on the same --out) or beside it used are skipped, so a
        run never meets another run's pictures (which would refuse it as made with other settings)."""
        while True:
            folder = self.out_dir / f"run-{next(self._runs):05d}-{seed}"
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                continue

    def _run_locked(self, request: SampleRequest, with_maps: bool, loras: tuple) -> RunResult:
        forms.validate_settings(request, self.pipeline)
        if with_maps and not request.identities:
            raise InputError("activation maps show where people are injected: a picture without people has none")
        key = program_of(request, with_maps)
        new_shape = key not in self._compiled
        if new_shape:
            self.log(f"new shape {describe_program(request, with_maps)}: compiling once ...")
        maps: Optional[dict] = {} if with_maps else None
        sampler = RequestSampler(self.pipeline, request, self._on_progress, maps,
                                 activation_steps(request.steps) if with_maps else ())
        folder = self.run_folder(request.seed)
        start = time.time()
        try:
            with self._weights(loras) as provenance:
                run_request(self.pipeline, request, folder, sampler=sampler, provenance=provenance,
                            public=forms.public_copy)
        except BaseException:  # a bad input or a cancel: no empty run folder left behind
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
            raise
        seconds = time.time() - start
        if new_shape:
            self._compiled.add(key)
            self.log(f"compiled and ran {describe_program(request, with_maps)} in {seconds:.1f}s")
        pngs = [output_path(folder, request, k) for k in range(request.num_images)]
        overlays = activation_overlays(sampler.images, maps or {}, request.steps)
        return RunResult(pngs, [p.with_suffix(".json") for p in pngs], overlays, request, seconds, maps or {})


def activation_overlays(images: np.ndarray, maps: dict, steps: int) -> list[tuple[np.ndarray, str]]:
    """images (N, H, W, 3) uint8; maps {0-based step: (N, n, h, w)} -> one overlay per image,
    step and person (in that order), captioned "image i, person k, step s/steps"."""
    overlays = []
    for i, image in enumerate(images):
        for step in sorted(maps):
            for k in range(maps[step].shape[1]):
                colour = previews.COLOURS[k % len(previews.COLOURS)]
                overlays.append((previews.activation_overlay(image, maps[step][i, k], colour),
                                 f"image {i + 1}, person {k + 1}, step {step + 1}/{steps}"))
    return overlays


def _without_paths(message: str, paths) -> str:
    for p in sorted({str(p) for p in paths} | {str(pathlib.Path(p).resolve()) for p in paths}, key=len, reverse=True):
        message = message.replace(p, pathlib.PurePath(p).name)
    return message


def create_service(*, demo: bool, out_dir, log: Callable[[str], None] = print, lora_dirs: Sequence[str] = (),
                   embedding_dirs: Sequence[str] = (), negative_embeddings: Sequence[str] = (),
                   settings: Optional[dict] = None, **weights) -> tuple[AppService, str]:
    """Load the pipeline once (`loading.load_pipeline`; weights: its keyword arguments, the
    start-up LoRAs included) and wrap it. lora_dirs/embedding_dirs: the operator's folders the
    page offers files of; negative_embeddings: files offered too and chosen by default.
    Returns (service, the notice the page shows: the demo warning, that of a training run on
    the tiny random base, the plain text-to-image notice of a base model without DynamicID
    weights, or "")."""
    from gradio.utils import get_upload_folder

    from dynamicid_jax.loading import DEMO_NOTICE, TINY_NOTICE, load_pipeline, run_base, training_run_config

    loras, embeddings = lora_catalog(lora_dirs), embedding_catalog(embedding_dirs, negative_embeddings)
    config, pipeline = load_pipeline(demo=demo, log=log, **weights)
    run = training_run_config(weights.get("dynamicid"))
    if not pipeline.modules.identity_branch:
        notice = forms.PLAIN_NOTICE
    elif demo:
        notice = DEMO_NOTICE
    else:  # a test run on the tiny random base draws noise too: the page says why
        notice = TINY_NOTICE if run is not None and run_base(run)[0] else ""
    settings = dict(settings or {}, negative_embeddings=[public_name(p) for p in negative_embeddings])
    service = AppService(pipeline, config.sampling, out_dir, get_upload_folder(), log=log, loras=loras,
                         embeddings=embeddings, settings=settings,
                         lora_skip_unknown=weights.get("lora_skip_unknown", False))
    return service, notice
