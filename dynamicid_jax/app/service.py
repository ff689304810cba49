"""What the app's page calls: one `DynamicIDPipeline`, one generation at a time.

AppService.run(request) generates with the pipeline (the sampler of `launch/sample.py`, so
the same request gives the same PNG bytes), writes PNG + sidecar under the app's output
folder (a fresh subfolder per run; no client picks a path), and reports steps to a
progress callback; `cancel()` stops the running generation between two denoising steps.
A request of a shape not yet compiled (size, images, people, boxes, gating, mixing, maps)
is logged before and after its compile.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
import secrets
import threading
import time
from typing import Callable, Optional

import numpy as np

from dynamicid_jax.app import forms, previews
from dynamicid_jax.faces import NoFaceError
from dynamicid_jax.outputs import save_outputs
from dynamicid_jax.pipeline import DynamicIDPipeline
from dynamicid_jax.request import IdentityRequest, InputError, SampleRequest, read_image

MAX_SEED = 2**31 - 1


class Cancelled(Exception):
    """The user cancelled the running generation."""


@dataclasses.dataclass
class RunResult:
    images: list[pathlib.Path]  # PNGs
    sidecars: list[pathlib.Path]  # their JSON sidecars, same order
    maps: list[tuple[np.ndarray, str]]  # activation overlays (RGB uint8) with captions
    request: SampleRequest  # as run (server paths); the sidecars hold the public copy
    seconds: float


def activation_steps(steps: int) -> list[int]:
    """The few 0-based steps whose activation maps are shown: first, thirds, last."""
    return sorted({0, steps // 3, (2 * steps) // 3, steps - 1})


def shape_key(request: SampleRequest, maps: bool) -> tuple:
    """What selects a compiled denoising program (everything else is traced)."""
    n = len(request.identities)
    return (request.height, request.width, request.num_images, n, n > 1 or request.identities[0].box is not None,
            request.gating, request.mix is not None, maps)


def describe_shape(key: tuple) -> str:
    h, w, images, n, boxes, gating, mix, maps = key
    extras = [x for x, on in (("boxes", boxes), ("no gating", not gating), ("mixing", mix),
                               ("activation maps", maps)) if on]
    return f"{w}x{h}, {images} image(s), {n} people" + (f", {', '.join(extras)}" if extras else "")


class AppService:
    """pipeline: a loaded DynamicIDPipeline; out_dir: where runs are written; upload_root:
    the folder uploads land in (the only place input files are read from)."""

    def __init__(self, pipeline: DynamicIDPipeline, defaults, out_dir, upload_root, log: Callable[[str], None] = print):
        self.pipeline = pipeline
        self.defaults = defaults
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
        d = self.defaults
        return SampleRequest(
            identities=[IdentityRequest(refs=["(warm-up)"]) for _ in range(n_people)], prompt="",
            negative_prompt=d.negative_prompt, steps=d.steps, guidance=d.guidance, height=d.height, width=d.width,
            alpha=d.alpha, beta=d.beta, id_scale=d.id_scale,
        )

    def warm_up(self, people=(1, 2)) -> None:
        """Compile the default size for these people counts and the identity programs (any
        photo size, face edits) now, so a first click does not wait for XLA."""
        start = time.time()
        with self._device:
            count = self.pipeline.warm_up_identity()
        self.log(f"compiled {count} identity program(s) (reference photos of any size, face edits) in "
                 f"{time.time() - start:.1f}s (start-up)")
        for n in people:
            request = self.default_request(n)
            key = shape_key(request, False)
            self.log(f"compiling the sampling program for {describe_shape(key)} (start-up) ...")
            start = time.time()
            with self._device:
                self.pipeline.warm_up(request, report_steps=True)  # requests report progress per step
            self._compiled.add(key)
            self.log(f"compiled {describe_shape(key)} in {time.time() - start:.1f}s")

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

    def run(self, request: SampleRequest, *, random_seed: bool = False, with_maps: bool = False) -> RunResult:
        """Generate and write one request; InputError/NoFaceError name the bad input (by file
        name, never a server path), Cancelled when cancel() came first."""
        if random_seed:
            request = dataclasses.replace(request, seed=secrets.randbelow(MAX_SEED))
        paths = [p for i in request.identities for p in i.refs + ([i.target_landmarks] if i.target_landmarks else [])]
        with self._device:
            self._cancel.clear()  # inside the lock: a cancel meant for the previous run stays with it
            try:
                return self._run_locked(request, with_maps)
            except (InputError, NoFaceError) as e:
                raise type(e)(_without_paths(str(e), paths)) from None
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

    def _run_locked(self, request: SampleRequest, with_maps: bool) -> RunResult:
        forms.validate_settings(request, self.pipeline)
        key = shape_key(request, with_maps)
        new_shape = key not in self._compiled
        if new_shape:
            self.log(f"new shape {describe_shape(key)}: compiling once ...")
        maps: Optional[dict] = {} if with_maps else None
        start = time.time()
        images, details = self.pipeline.generate(
            request, progress=self._on_progress, activation_maps=maps,
            activation_steps=activation_steps(request.steps) if with_maps else (),
        )
        seconds = time.time() - start
        if new_shape:
            self._compiled.add(key)
            self.log(f"compiled and ran {describe_shape(key)} in {seconds:.1f}s")
        folder = self.out_dir / f"run-{next(self._runs):05d}-{request.seed}"
        public, public_details = forms.public_copy(request, details)
        pngs = save_outputs(folder, images, public, public_details, self.pipeline.provenance)
        overlays = activation_overlays(images, maps or {}, request.steps)
        return RunResult(pngs, [p.with_suffix(".json") for p in pngs], overlays, request, seconds)


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


def create_service(*, demo: bool, out_dir, log: Callable[[str], None] = print, **weights) -> tuple[AppService, str]:
    """Load the pipeline once (`loading.load_pipeline`; weights: its keyword arguments) and
    wrap it. Returns (service, the notice the page shows: the demo warning or "")."""
    from gradio.utils import get_upload_folder

    from dynamicid_jax.loading import DEMO_NOTICE, load_pipeline

    config, pipeline = load_pipeline(demo=demo, log=log, **weights)
    service = AppService(pipeline, config.sampling, out_dir, get_upload_folder(), log=log)
    return service, DEMO_NOTICE if demo else ""
