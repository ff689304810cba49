"""Metric rows: one per generated image x subject, kept in one CSV.

Rows are keyed by (image, subject_index). New rows replace old ones with the same key and
the file is rewritten atomically, so an interrupted or repeated run never leaves duplicate
or half-written rows. Values are stored as text: numbers with full precision, booleans
as 1/0, "not measured" as an empty cell (CLIP-T without a CLIP model).
"""

from __future__ import annotations

import csv
import io
import pathlib
from typing import Iterable, Optional, Sequence

from dynamicid_jax.evaluation.face_metrics import SubjectScore
from dynamicid_jax.evaluation.protocol import EvalCase
from dynamicid_jax.outputs import atomic_write_text

CSV_FIELDS = (
    "image", "mode", "ablation", "group", "prompt_name", "prompt_kind", "prompt", "seed",
    "subject_index", "subject", "expression", "orientation",
    "face_found", "face_sim", "expr_prob", "expr_top", "expr_correct", "pose_category", "pose_hit",
    "pitch", "yaw", "roll", "face_box", "clip_t", "clip_model", "face_models",
)
Row = dict[str, str]


def row_key(row: Row) -> tuple[str, str]:
    return row["image"], row["subject_index"]


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return " ".join(_text(v) for v in value)
    return str(value)


def case_rows(
    case: EvalCase, scores: Sequence[SubjectScore], clip_t: Optional[float], clip_model: Optional[str],
    face_models: str,
) -> list[Row]:
    """The rows of one scored image, one per subject (scores in `case.subjects` order)."""
    if len(scores) != len(case.subjects):
        raise ValueError(f"{case.stem}: {len(scores)} scores for {len(case.subjects)} subjects")
    rows = []
    for i, (subject, score) in enumerate(zip(case.subjects, scores)):
        pose = score.pose or (None, None, None)
        values = dict(
            image=str(case.relative_path), mode=case.mode, ablation=case.ablation.tag, group=case.group,
            prompt_name=case.prompt.name, prompt_kind=case.prompt.kind, prompt=case.prompt_text(), seed=case.seed,
            subject_index=i, subject=subject.identity.name, expression=subject.edit.expression,
            orientation=subject.edit.orientation, face_found=score.face_found, face_sim=score.face_sim,
            expr_prob=score.expr_prob, expr_top=score.expr_top, expr_correct=score.expr_correct,
            pose_category=score.pose_category, pose_hit=score.pose_hit, pitch=pose[0], yaw=pose[1], roll=pose[2],
            face_box=score.face_box, clip_t=clip_t, clip_model=clip_model if clip_t is not None else None,
            face_models=face_models,
        )
        rows.append({k: _text(values[k]) for k in CSV_FIELDS})
    return rows


def merge_rows(old: Iterable[Row], new: Iterable[Row]) -> list[Row]:
    """Old rows in their order with same-key rows replaced by the new ones; new keys appended."""
    merged: dict[tuple[str, str], Row] = {row_key(r): r for r in old}
    for row in new:
        merged[row_key(row)] = row
    return list(merged.values())


def read_rows(path: pathlib.Path) -> list[Row]:
    """The rows of a metrics CSV (de-duplicated: the last row of a key wins); [] when absent."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_FIELDS:
            raise ValueError(f"{path}: columns {reader.fieldnames} differ from this version's {list(CSV_FIELDS)}")
        return merge_rows([], reader)


def write_rows(path: pathlib.Path, rows: Iterable[Row]) -> None:
    """Rewrite the CSV atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(pathlib.Path(path), buffer.getvalue())
