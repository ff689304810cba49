"""Many images over every local device and every process: shares, batches, resume, progress.

    sampler = BatchSampler(pipeline, batch_size=16)        # a mesh over this process's devices
    stats = run_jobs(jobs, sampler, provenance=pipeline.provenance)
    stats = run_request(pipeline, request, out_dir)         # one request: launch/sample.py, the app

A Job is one picture (a request and the index of the picture in it) and its PNG path. The
plan is deterministic and computed alike by every process from the whole job list:
  1. jobs are grouped by `batching.shape_key` (first appearance order);
  2. process p of P takes every P-th job of each group (disjoint, together complete);
  3. its share is cut into batches of `sampler.batch_size` (the last one padded).
Finished images (a complete PNG + sidecar whose request and weights equal the job's,
`outputs.reusable`) are skipped; a batch with anything missing is computed whole, so its
composition, and therefore every pixel, is the same as in an uninterrupted run. Images are
written as each batch finishes (atomically), so a killed run loses at most its batch in flight.
One request (`run_request`: `launch/sample.py` without --requests, the app) is the same plan
with one job per picture and one batch: `RequestSampler` runs `pipeline.generate`, the request
alone on the default device with per-step progress.

Generation is embarrassingly parallel: a process computes on its own devices only (a
`data` mesh over `jax.local_devices()`, parameters replicated, or split over `fsdp` by
sharding.py's rules); processes meet once at the end (`gather_totals`), for the summary.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from dynamicid_jax import batching, outputs
from dynamicid_jax.batching import ImageItem


@dataclasses.dataclass(frozen=True)
class Job:
    """Picture `item` goes to `path` (+ sidecar); `line` names its request in rejects (or None)."""

    item: ImageItem
    path: pathlib.Path
    line: Optional[int] = None


@dataclasses.dataclass
class RunStats:
    """What one process did: images generated, reused (already finished), dropped with their
    rejected request, the rejected requests as {"line", "error"} (only with an `on_reject`),
    and the paths written."""

    generated: int = 0
    reused: int = 0
    rejected_images: int = 0
    rejected: list = dataclasses.field(default_factory=list)
    written: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def process_share(jobs: Sequence[Job], process_index: int, process_count: int) -> list[list[Job]]:
    """Jobs of process `process_index`, grouped by shape key: every P-th job of each group."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(batching.shape_key(job.item.request), []).append(job)
    return [group[process_index::process_count] for group in groups.values()]


def plan_batches(jobs: Sequence[Job], batch_size: int, process_index: int = 0, process_count: int = 1) -> list[list[Job]]:
    """The batches process `process_index` computes, in order (see the module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = []
    for share in process_share(jobs, process_index, process_count):
        batches += [share[i:i + batch_size] for i in range(0, len(share), batch_size)]
    return batches


class BatchSampler:
    """A DynamicIDPipeline's batched sampler on this process's devices.

    batch_size: images per denoising call in this process, rounded up to a multiple of the
    mesh size; every call computes exactly this many rows (short batches are padded).
    fsdp: parameters split over this many devices (sharding.py rules) when one copy per
    device does not fit; the rest of the local devices form the `data` axis.
    Callable as sampler(items) -> (images uint8 (len(items), H, W, 3), details per item).
    """

    def __init__(self, pipeline, batch_size: Optional[int] = None, fsdp: int = 1, devices=None):
        import jax

        from dynamicid_jax import sharding

        devices = list(jax.local_devices() if devices is None else devices)
        self.pipeline = pipeline
        try:
            self.mesh = sharding.make_mesh(-1, fsdp, devices)
        except ValueError as e:
            from dynamicid_jax.request import InputError

            raise InputError(f"--fsdp {fsdp} does not fit {len(devices)} local devices: {e}") from None
        size = self.mesh.size
        self.batch_size = size * max(1, -(-(batch_size or size) // size))

    def prepare(self, request) -> None:
        """Face analysis and tokens of `request` (cached); raises its user errors now."""
        self.pipeline.conditioning.prepare(request)

    def __call__(self, items: Sequence[ImageItem]):
        return self.pipeline.generate_items(items, mesh=self.mesh, pad_to=self.batch_size)


class RequestSampler:
    """The pictures of one request in one `pipeline.generate` call (the default device; per-step
    progress, cancel and activation maps as `generate` takes them): `launch/sample.py` and the
    app. batch_size is the request's picture count, so its plan is one batch.
    images: the last call's pictures (uint8 (N, H, W, 3)), e.g. for the app's overlays."""

    def __init__(self, pipeline, request, progress: Optional[Callable[[int], Any]] = None,
                 activation_maps: Optional[dict] = None, activation_steps: Sequence[int] = ()):
        self.pipeline = pipeline
        self.request = request
        self.batch_size = request.num_images
        self.progress = progress
        self.activation_maps = activation_maps
        self.activation_steps = activation_steps
        self.images = None

    def prepare(self, request) -> None:
        self.pipeline.conditioning.prepare(request)

    def __call__(self, items: Sequence[ImageItem]):
        if [(i.request, i.index) for i in items] != [(self.request, k) for k in range(self.request.num_images)]:
            raise ValueError("a RequestSampler computes every picture of its own request, in order")
        self.images, details = self.pipeline.generate(self.request, progress=self.progress,
                                                      activation_maps=self.activation_maps,
                                                      activation_steps=self.activation_steps)
        return self.images, [details] * len(items)


def jobs_of(request, out_dir: str | pathlib.Path, stem: str = "dynamicid", line: Optional[int] = None) -> list[Job]:
    """One Job per picture of one request: OUT/stem-SEED-K.png (`outputs.output_path`)."""
    return [Job(ImageItem(request, k), outputs.output_path(out_dir, request, k, stem), line)
            for k in range(request.num_images)]


def run_request(pipeline, request, out_dir: str | pathlib.Path, *, sampler: Optional[RequestSampler] = None,
                stem: str = "dynamicid", provenance: Optional[dict] = None, public=None) -> RunStats:
    """Every picture of one request into `out_dir` (finished ones reused) in this process;
    sampler: a RequestSampler of `request` (default: silent). provenance: default the
    pipeline's. public: as run_jobs'. A request without a size gets the base model's
    (`pipeline.complete`) before its finished pictures are looked for."""
    pipeline.complete(request)
    sampler = RequestSampler(pipeline, request) if sampler is None else sampler
    return run_jobs(jobs_of(request, out_dir, stem), sampler, process_index=0, process_count=1, progress=False,
                    provenance=pipeline.provenance if provenance is None else provenance, public=public)


def _check_images(images, n: int) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] != n or images.dtype != np.uint8:
        raise ValueError(f"sampler returned {images.dtype} {images.shape}; expected uint8 ({n}, H, W, 3)")
    return images


def run_jobs(
    jobs: Sequence[Job],
    sampler: Callable[[Sequence[ImageItem]], tuple[Any, list]],
    *,
    provenance: dict,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    progress: bool = True,
    on_reject: Optional[Callable[[Job, Exception], None]] = None,
    user_errors: tuple = (),
    public: Optional[Callable[[Any, dict], tuple[Any, dict]]] = None,
) -> RunStats:
    """Generate this process's share of `jobs` that is not finished yet (see the module docstring).

    sampler: a BatchSampler, or any callable items -> (images, details) with an optional
      `batch_size` (default 1) and `prepare(request)`. process_index/count default to jax's.
    on_reject: called once per request whose preparation raises one of `user_errors` (no
      face, ...); its images are dropped and the rest continue. None: such errors propagate.
    public: (request, details) -> what the sidecar records instead (the app: file names for
      its server paths); finished images are compared with that record.
    Raises outputs.StaleImageError (before computing anything) when an image exists with
    other settings.
    """
    import jax
    from tqdm import tqdm

    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    batch_size = getattr(sampler, "batch_size", 1)
    prepare = getattr(sampler, "prepare", None)
    batches = plan_batches(jobs, batch_size, index, count)
    record = public or (lambda request, details: (request, details))
    finished = {job.path for batch in batches for job in batch
                if outputs.reusable(job.path, record(job.item.request, {})[0], provenance, job.item.request)}
    stats = RunStats(reused=len(finished))
    total = sum(len(b) for b in batches)
    desc = "images" if count == 1 else f"images p{index}"
    rejected: set[int] = set()  # id() of rejected requests
    start = time.perf_counter()
    with tqdm(total=total, initial=len(finished), desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            if all(job.path in finished for job in batch):
                continue
            if prepare is not None:
                batch = _prepared(batch, prepare, rejected, stats, on_reject, user_errors)
                if not batch:
                    continue
            images, details = sampler([job.item for job in batch])
            images = _check_images(images, len(batch))
            for job, image, detail in zip(batch, images, details):
                if job.path in finished:
                    continue
                detail = dict(detail, input_files=outputs.input_records(job.item.request))  # outputs.reusable's
                outputs.save_image(job.path, image, *record(job.item.request, detail), provenance, job.item.index)
                stats.generated += 1
                stats.written.append(job.path)
                bar.update(1)
    stats.seconds = time.perf_counter() - start
    return stats


def _prepared(batch, prepare, rejected, stats, on_reject, user_errors) -> list[Job]:
    """The batch without the jobs of requests that cannot be prepared (each reported once)."""
    kept = []
    for job in batch:
        request = job.item.request
        if id(request) in rejected:
            stats.rejected_images += 1
            continue
        try:
            prepare(request)
        except user_errors as e:
            if on_reject is None:
                raise
            rejected.add(id(request))
            stats.rejected_images += 1
            stats.rejected.append({"line": job.line, "error": " | ".join(str(e).splitlines())})
            on_reject(job, e)
            continue
        kept.append(job)
    return kept


# Processes reach the end at different times (uneven shares, resumed work), far apart for a
# collective (gloo gives up after 30 s): they meet at a coordination-service barrier instead.
BARRIER_TIMEOUT_S = 7 * 24 * 3600
_gathers = [0]  # calls so far: every process makes the same calls, so keys agree


def gather_totals(stats: RunStats) -> np.ndarray:
    """(process_count, 3) [generated, reused, rejected images] of every process; with several
    processes this is also the barrier after which every image of the run is written."""
    import jax

    mine = [stats.generated, stats.reused, stats.rejected_images]
    if jax.process_count() == 1:
        return np.asarray([mine], np.int64)
    from jax._src import distributed as jax_distributed  # the coordination service's client (as orbax uses it)

    client = jax_distributed.global_state.client
    _gathers[0] += 1
    prefix = f"dynamicid_jax/generation/{_gathers[0]}"
    client.key_value_set(f"{prefix}/{jax.process_index()}", ",".join(map(str, mine)))
    client.wait_at_barrier(f"{prefix}/done", timeout_in_ms=BARRIER_TIMEOUT_S * 1000)
    rows = [client.blocking_key_value_get(f"{prefix}/{i}", 60_000) for i in range(jax.process_count())]
    return np.asarray([[int(v) for v in row.split(",")] for row in rows], np.int64)
