"""Aggregating metric rows into the paper's tables (Tables 1-3: CLIP-T, FaceSim, Expr, Pose).

FaceSim, Expr and Pose are means over subject rows (every requested person in every image,
missing faces included as failures); CLIP-T is a mean over images. CLIP-T appears only when
every image of a row has been scored; otherwise the cell says so (never a made-up number).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Iterable, Optional, Sequence

from dynamicid_jax.evaluation.protocol import Ablation
from dynamicid_jax.evaluation.records import Row

# The paper's reported numbers (DynamicID, ICCV 2025), shown beside ours for reference.
PAPER_ROWS = {
    "single": {"DynamicID": (0.239, 0.671, 0.456, 0.878), "DynamicID w/o SAA": (0.224, 0.682, 0.422, 0.862),
               "DynamicID w/o IMR": (0.228, 0.712, 0.161, 0.253)},
    "multi": {"DynamicID": (0.237, 0.664, 0.431, 0.867)},
}
TABLE_TITLES = {"single": "Table 1 layout: single-ID personalisation", "multi": "Table 2 layout: multi-ID personalisation"}
NOT_MEASURED = "not measured"


@dataclasses.dataclass(frozen=True)
class Summary:
    """Aggregates of one set of rows. clip_t is None unless every image has a CLIP-T."""

    n_images: int
    n_subjects: int
    clip_t: Optional[float]
    clip_measured: int
    face_sim: float
    expr: float
    expr_accuracy: float
    pose: float
    faces_found: float


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(rows: Sequence[Row]) -> Summary:
    """Aggregate rows (one per image x subject) into the table's numbers."""
    clip_by_image = {r["image"]: r["clip_t"] for r in rows}
    measured = [float(v) for v in clip_by_image.values() if v != ""]
    return Summary(
        n_images=len(clip_by_image),
        n_subjects=len(rows),
        clip_t=_mean(measured) if measured and len(measured) == len(clip_by_image) else None,
        clip_measured=len(measured),
        face_sim=_mean([float(r["face_sim"]) for r in rows]),
        expr=_mean([float(r["expr_prob"]) for r in rows]),
        expr_accuracy=_mean([float(r["expr_correct"]) for r in rows]),
        pose=_mean([float(r["pose_hit"]) for r in rows]),
        faces_found=_mean([float(r["face_found"]) for r in rows]),
    )


def group_rows(rows: Iterable[Row], *fields: str) -> dict[tuple[str, ...], list[Row]]:
    out: dict[tuple[str, ...], list[Row]] = defaultdict(list)
    for r in rows:
        out[tuple(r[f] for f in fields)].append(r)
    return dict(out)


def _ablation_label(tag: str) -> str:
    parts = set(tag.split("-"))
    return Ablation(gating="nogating" not in parts, imr="noimr" not in parts).label


def _clip_cell(s: Summary) -> str:
    if s.clip_t is not None:
        return f"{s.clip_t:.3f}"
    if s.clip_measured == 0:
        return NOT_MEASURED
    return f"incomplete ({s.clip_measured}/{s.n_images} images)"


def markdown_report(rows: Sequence[Row], *, title: str, arch: str, notes: Sequence[str] = ()) -> str:
    """The tables as markdown: per mode the Table 1/2 layout (every ablation present, then the
    paper's reported rows), then details (counts, Expr accuracy, faces found) and per-subject means."""
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["- CLIP-T: CLIP text-image cosine (prompt vs. image). FaceSim: identity cosine, reference vs. "
              "generated face. Expr: classifier probability of the requested expression. Pose: fraction of "
              "faces in the requested front/side/up/down bin. A missing face counts as FaceSim 0, Expr 0, "
              "Pose miss.", ""]
    by_mode = group_rows(rows, "mode")
    if not by_mode:
        lines += ["No metric rows yet.", ""]
    for mode in ("single", "multi"):
        mode_rows = by_mode.get((mode,))
        if not mode_rows:
            continue
        by_ablation = group_rows(mode_rows, "ablation")
        summaries = {tag: summarize(rs) for (tag,), rs in sorted(by_ablation.items())}
        lines += [f"## {TABLE_TITLES[mode]}", "", "| Method | Arch. | CLIP-T ↑ | FaceSim ↑ | Expr ↑ | Pose ↑ |",
                  "|---|---|---|---|---|---|"]
        for tag, s in summaries.items():
            lines.append(f"| {_ablation_label(tag)} (this run) | {arch} | {_clip_cell(s)} | {s.face_sim:.3f} | "
                         f"{s.expr:.3f} | {s.pose:.3f} |")
        for label, values in PAPER_ROWS[mode].items():
            lines.append(f"| {label} (paper, reported) | SD1.5 | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        if any(s.clip_t is None for s in summaries.values()):
            lines += ["", f"CLIP-T {NOT_MEASURED}/incomplete: rerun with `--clip_model PATH` (a transformers CLIPModel "
                          "folder of OpenAI CLIP ViT-L/14); no number is reported without it."]
        lines += ["", "| Method | images | subject rows | faces found | Expr accuracy | CLIP-T scored |",
                  "|---|---|---|---|---|---|"]
        for tag, s in summaries.items():
            lines.append(f"| {_ablation_label(tag)} | {s.n_images} | {s.n_subjects} | {s.faces_found:.3f} | "
                         f"{s.expr_accuracy:.3f} | {s.clip_measured}/{s.n_images} |")
        lines += ["", "Per subject:", "", "| Method | Subject | rows | FaceSim | Expr | Pose | faces found |",
                  "|---|---|---|---|---|---|---|"]
        for (tag, subject), rs in sorted(group_rows(mode_rows, "ablation", "subject").items()):
            s = summarize(rs)
            lines.append(f"| {_ablation_label(tag)} | {subject} | {s.n_subjects} | {s.face_sim:.3f} | {s.expr:.3f} | "
                         f"{s.pose:.3f} | {s.faces_found:.3f} |")
        lines.append("")
    return "\n".join(lines)
