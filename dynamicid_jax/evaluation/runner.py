"""Run an evaluation: generate what is missing, score what is unscored, write CSV, tables, grids.

    result = evaluate(protocol, out_dir="eval_out", mode="single", ablation=Ablation(),
                      sampling=resolve_sampling(config.sampling, protocol),
                      generate=BatchSampler(pipeline, batch_size=16), provenance=pipeline.provenance,
                      metrics=MetricModels(analyzer, expressions, clip_scorer))

Images are made by the batch generation engine (`dynamicid_jax.generation`): every case is
a one-picture request, batched over this process's devices, and with several processes
(jax.distributed) each makes its share; process 0 then scores and reports, the others stop
after generating. Resumable at every step: images are reused when their sidecar matches the
request (`outputs.reusable`), metric rows when they were computed by the same face models (and CLIP model, when
one is given) for an image not regenerated since. Output folder layout:

    images/<mode>/<ablation>/<group>__<prompt>__<edits>__seed<k>.png (+ .json sidecar)
    grids/<mode>/<ablation>/<group>__<prompt>.png
    metrics.csv      one row per image x subject, all modes and ablations run into this folder
    report.md        the tables over every row of metrics.csv
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Mapping, Optional

import numpy as np
from tqdm import tqdm

from dynamicid_jax import outputs
from dynamicid_jax.batching import ImageItem
from dynamicid_jax.evaluation import grids, records
from dynamicid_jax.evaluation.face_metrics import SubjectTarget, reference_embeddings, score_image
from dynamicid_jax.evaluation.protocol import SAMPLING_KEYS, Ablation, EvalCase, Protocol, expand_cases
from dynamicid_jax.evaluation.report import markdown_report
from dynamicid_jax.generation.engine import Job, run_jobs
from dynamicid_jax.request import read_image

# generate(items) -> (images uint8 (len(items), H, W, 3), details per item): a
# generation.BatchSampler, or any callable with that signature (optional `batch_size`).
Generator = Callable[[list[ImageItem]], tuple[np.ndarray, list]]
CSV_NAME, REPORT_NAME = "metrics.csv", "report.md"


@dataclasses.dataclass(frozen=True)
class MetricModels:
    """analyzer: FaceAnalyzer (FaceSim, detection, pose); expressions: ExpressionClassifier;
    clip: CLIPScorer, or None for CLIP-T "not measured"."""

    analyzer: Any
    expressions: Any
    clip: Any = None


@dataclasses.dataclass(frozen=True)
class EvalResult:
    cases: int
    generated: int
    reused: int
    scored: int
    kept: int
    missing_images: int
    csv_path: pathlib.Path
    report_path: pathlib.Path
    grids: tuple[pathlib.Path, ...]


def resolve_sampling(defaults: Mapping[str, Any], protocol: Protocol) -> dict:
    """The sampler settings of every case: config defaults, then the protocol's overrides."""
    settings = {k: defaults[k] for k in SAMPLING_KEYS if k in defaults}
    settings.update(protocol.sampling)
    missing = [k for k in SAMPLING_KEYS if k not in settings]
    if missing:
        raise ValueError(f"sampling settings missing: {missing}")
    return settings


def _generate_missing(cases, out_dir, sampling, generate, provenance, progress) -> tuple[int, int, set[str], bool]:
    """(generated, reused, paths made now, whether this process scores): through the engine."""
    import jax

    jobs = [Job(ImageItem(case.sample_request(sampling), 0), out_dir / case.relative_path) for case in cases]
    stats = run_jobs(jobs, generate, provenance=provenance, progress=progress)
    fresh = {str(pathlib.PurePosixPath(p.relative_to(out_dir))) for p in stats.written}
    if jax.process_count() > 1:
        from dynamicid_jax.generation.engine import gather_totals

        totals = gather_totals(stats)  # every process's images are written after this
        return int(totals[:, 0].sum()), int(totals[:, 1].sum()), fresh, jax.process_index() == 0
    return stats.generated, stats.reused, fresh, True


def _rows_current(rows: list[Optional[records.Row]], metrics: MetricModels) -> bool:
    if any(r is None for r in rows):
        return False
    if any(r["face_models"] != metrics.analyzer.name for r in rows):
        return False
    return metrics.clip is None or all(r["clip_model"] == metrics.clip.name for r in rows)


def _score_missing(cases, out_dir, metrics: MetricModels, fresh: set[str], progress) -> tuple[int, int, int]:
    csv_path = out_dir / CSV_NAME
    rows = records.read_rows(csv_path)
    by_key = {records.row_key(r): r for r in rows}
    references: dict[str, np.ndarray] = {}
    scored = kept = missing = 0
    for case in tqdm(cases, desc="metrics", unit="img", disable=not progress):
        image = outputs.read_generated(out_dir / case.relative_path)
        if image is None:
            missing += 1
            continue
        image_key = str(case.relative_path)
        existing = [by_key.get((image_key, str(i))) for i in range(len(case.subjects))]
        if image_key not in fresh and _rows_current(existing, metrics):
            kept += 1
            continue
        targets = []
        for s in case.subjects:
            if s.identity.name not in references:
                refs = s.identity.refs
                references[s.identity.name] = reference_embeddings(metrics.analyzer, [read_image(p) for p in refs], refs)
            targets.append(SubjectTarget(s.identity.name, references[s.identity.name], s.edit.expression,
                                         s.edit.orientation))
        scores = score_image(image, targets, metrics.analyzer, metrics.expressions)
        clip_t = float(metrics.clip.score(image[None], [case.prompt_text()])[0]) if metrics.clip else None
        new = records.case_rows(case, scores, clip_t, metrics.clip.name if metrics.clip else None,
                                metrics.analyzer.name)
        rows = records.merge_rows(rows, new)
        by_key.update({records.row_key(r): r for r in new})
        records.write_rows(csv_path, rows)  # after every image: an interruption loses at most one
        scored += 1
    return scored, kept, missing


def evaluate(
    protocol: Protocol,
    *,
    out_dir: str | pathlib.Path,
    mode: str,
    ablation: Ablation,
    sampling: Mapping[str, Any],
    seeds: Optional[tuple[int, ...]] = None,
    generate: Optional[Generator] = None,
    provenance: Optional[dict] = None,
    metrics: Optional[MetricModels] = None,
    arch: str,
    progress: bool = True,
) -> EvalResult:
    """Evaluate one mode and ablation of `protocol` into `out_dir` (resumable).

    generate: None skips generation (metrics only: images not yet generated are counted in
      `missing_images`, not scored). provenance: the weights' description stored in sidecars
      (pipeline.provenance). metrics: None skips scoring (images only). arch: the table's
      "Arch." cell.
    """
    out_dir = pathlib.Path(out_dir)
    cases: list[EvalCase] = expand_cases(protocol, mode, ablation, seeds)
    generated = reused = 0
    fresh: set[str] = set()
    if generate is not None:
        generated, reused, fresh, scores = _generate_missing(cases, out_dir, sampling, generate,
                                                             dict(provenance or {}), progress)
        if not scores:  # another process scores (it alone writes metrics.csv and report.md)
            return EvalResult(len(cases), generated, reused, 0, 0, 0, out_dir / CSV_NAME, out_dir / REPORT_NAME, ())
    scored = kept = 0
    missing = sum(not outputs.is_complete(out_dir / c.relative_path) for c in cases) if metrics is None else 0
    if metrics is not None:
        scored, kept, missing = _score_missing(cases, out_dir, metrics, fresh, progress)
    sheets = grids.write_contact_sheets(out_dir, cases, lambda c: outputs.read_generated(out_dir / c.relative_path), read_image)
    notes = [f"Test set: {protocol.name} ({len(cases)} images in this mode/ablation; {missing} not generated yet)."]
    if metrics is not None:
        notes.append(f"Face models: {metrics.analyzer.name}. CLIP model: "
                     f"{metrics.clip.name if metrics.clip else 'none (CLIP-T not measured)'}.")
    report_path = out_dir / REPORT_NAME
    rows = records.read_rows(out_dir / CSV_NAME)
    outputs.atomic_write_text(report_path, markdown_report(rows, title=f"DynamicID evaluation: {protocol.name}",
                                                         arch=arch, notes=notes))
    return EvalResult(len(cases), generated, reused, scored, kept, missing, out_dir / CSV_NAME, report_path,
                      tuple(sheets))
