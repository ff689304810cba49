"""`launch/sample.py --requests FILE.jsonl --out DIR`: every request of a file, on every device
of every process, resumable.

Writes into DIR (shared by all processes):
  lineNNNNN-SEED-K.png + .json   picture K of the request on line NNNNN (`outputs.save_image`)
  rejects.jsonl                  {"line", "error", "text"} per unusable line, in line order
  summary.json                   counts, devices, processes, time (written by process 0)
Rerunning the same command skips finished pictures and computes the rest.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any, Callable, Mapping, Optional

from dynamicid_jax import outputs
from dynamicid_jax.generation.engine import BatchSampler, Job, gather_totals, jobs_of, run_jobs
from dynamicid_jax.generation.requests import Reject, read_requests
from dynamicid_jax.request import InputError

REJECTS, SUMMARY = "rejects.jsonl", "summary.json"


def request_jobs(requests, out_dir: str | pathlib.Path) -> list[Job]:
    """One Job per picture of each (line, request)."""
    return [job for line, request in requests for job in jobs_of(request, out_dir, f"line{line:05d}", line)]


def per_process_batch(batch_size: Optional[int], process_count: int) -> Optional[int]:
    """--batch_size counts images per step over all processes; each computes its part."""
    return None if batch_size is None else max(1, -(-batch_size // process_count))


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    outputs.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def run_requests_file(
    pipeline,
    requests_path: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    *,
    defaults: Mapping[str, Any],
    batch_size: Optional[int] = None,
    fsdp: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict:
    """Generate every request of `requests_path` into `out_dir`; returns the summary dict.

    batch_size: images per denoising step over all processes (default: one per device).
    """
    import jax

    from dynamicid_jax.faces import NoFaceError

    index, count = jax.process_index(), jax.process_count()
    out_dir = pathlib.Path(out_dir)
    requests, rejects = read_requests(requests_path, defaults, pipeline.modules.vae_scale_factor,
                                       pipeline.modules.identity_branch, pipeline.modules.family,
                                       pipeline.modules.family.embedding_widths(pipeline.modules))
    if index == 0:
        for r in rejects:
            log(f"{requests_path}: line {r.line}: {r.error} (skipped, see {out_dir / REJECTS})")
    jobs = request_jobs(requests, out_dir)
    sampler = BatchSampler(pipeline, per_process_batch(batch_size, count), fsdp=fsdp)
    lines = pathlib.Path(requests_path).read_text().splitlines()

    def on_reject(job: Job, error: Exception) -> None:
        log(f"{requests_path}: line {job.line}: {' | '.join(str(error).splitlines())} (skipped)")

    stats = run_jobs(jobs, sampler, provenance=pipeline.provenance, process_index=index, process_count=count,
                     progress=progress, on_reject=on_reject, user_errors=(InputError, NoFaceError))
    # Rejects found while generating (no face, ...) go through one file per process, merged
    # by process 0 once every process is done (gather_totals is the barrier).
    mine = out_dir / f".rejects.process-{index}.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(mine, [Reject(r["line"], r["error"], lines[r["line"] - 1]).to_json() for r in stats.rejected])
    totals = gather_totals(stats)
    summary = {
        "requests_file": str(requests_path), "requests": len(requests), "rejected_lines": None, "images": len(jobs),
        "generated": int(totals[:, 0].sum()), "reused": int(totals[:, 1].sum()),
        "rejected_images": int(totals[:, 2].sum()), "images_per_process": totals.sum(axis=1).tolist(), "processes": count,
        "devices": jax.device_count(), "batch_size_per_process": sampler.batch_size,
        "seconds_process0": round(stats.seconds, 3),
    }
    if index == 0:
        rows = [r.to_json() for r in rejects]
        for i in range(count):
            part = out_dir / f".rejects.process-{i}.jsonl"
            rows += [json.loads(t) for t in part.read_text().splitlines() if t.strip()]
            part.unlink()
        rows.sort(key=lambda r: r["line"])
        _write_jsonl(out_dir / REJECTS, rows)
        summary["rejected_lines"] = [r["line"] for r in rows]
        outputs.atomic_write_text(out_dir / SUMMARY, json.dumps(summary, indent=1))
    return summary
