"""FaceSim, Expr and Pose of the people in one generated image.

Every face in the image is detected; faces are paired with the requested subjects by an
optimal assignment on identity similarity (Hungarian, scipy's `linear_sum_assignment`), so
the score does not depend on where in the picture each person ended up. A subject left
without a face (fewer faces than subjects) is a failure: FaceSim 0, Expr 0, Pose miss. It is
never skipped, or a model that drops people would look better than one that keeps them.

Metric definitions (paper, section 4.1):
  FaceSim: cosine of identity embeddings, reference vs. generated face; with several
           reference photos, the mean cosine over them.
  Expr:    the expression classifier's probability of the requested expression (and
           whether it is the classifier's top-1, for accuracy).
  Pose:    whether the generated face's category (up/down by pitch, else front/side by
           yaw; `pose_category`) equals the requested one.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from dynamicid_jax.faces import Face, pose_bins
from dynamicid_jax.faces.expression import EMOTIONS

POSE_CATEGORIES = ("front", "side", "up", "down")


def pose_category(pose) -> str:
    """(pitch, yaw, roll) degrees -> one of POSE_CATEGORIES: "up"/"down" when the pitch is past
    the threshold (it dominates the look of a face), else "front"/"side" by the yaw."""
    vertical, view = pose_bins(pose)
    return vertical or view


@dataclasses.dataclass(frozen=True)
class SubjectTarget:
    """One requested person. references: (R, D) unit identity vectors of the reference photos;
    expression: one of EMOTIONS; orientation: one of POSE_CATEGORIES."""

    name: str
    references: np.ndarray
    expression: str
    orientation: str

    def __post_init__(self):
        if self.expression not in EMOTIONS:
            raise ValueError(f"subject {self.name}: expression {self.expression!r} is not one of {EMOTIONS}")
        if self.orientation not in POSE_CATEGORIES:
            raise ValueError(f"subject {self.name}: orientation {self.orientation!r} is not one of {POSE_CATEGORIES}")
        if np.ndim(self.references) != 2 or len(self.references) == 0:
            raise ValueError(f"subject {self.name}: references must be (R >= 1, D), got {np.shape(self.references)}")


@dataclasses.dataclass(frozen=True)
class SubjectScore:
    """Metrics of one subject in one image. Without a face: face_sim = expr_prob = 0,
    expr_correct = pose_hit = False and the face fields None."""

    subject: str
    face_found: bool
    face_sim: float
    expr_prob: float
    expr_correct: bool
    pose_hit: bool
    expr_top: Optional[str] = None
    pose_category: Optional[str] = None
    pose: Optional[tuple[float, float, float]] = None
    face_box: Optional[tuple[float, float, float, float]] = None


def identity_similarity(targets: Sequence[SubjectTarget], faces: Sequence[Face]) -> np.ndarray:
    """(S subjects, F faces) mean cosine between each subject's references and each face."""
    if not faces:
        return np.zeros((len(targets), 0), np.float32)
    embeddings = np.stack([f.embedding for f in faces]).astype(np.float64)  # (F, D)
    rows = []
    for t in targets:
        if t.references.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"subject {t.name}: reference embeddings are {t.references.shape[1]}-d, generated faces "
                f"{embeddings.shape[1]}-d (use one face model set for both)"
            )
        rows.append((np.asarray(t.references, np.float64) @ embeddings.T).mean(axis=0))
    return np.stack(rows).astype(np.float32)


def match_faces(similarity: np.ndarray) -> list[Optional[int]]:
    """Optimal one-to-one pairing maximising total similarity. (S, F) -> per subject the face
    index, or None for subjects left over when F < S."""
    matched: list[Optional[int]] = [None] * similarity.shape[0]
    if similarity.size:
        rows, cols = linear_sum_assignment(similarity, maximize=True)
        for r, c in zip(rows, cols):
            matched[int(r)] = int(c)
    return matched


def missing_face(subject: str) -> SubjectScore:
    return SubjectScore(subject, face_found=False, face_sim=0.0, expr_prob=0.0, expr_correct=False, pose_hit=False)


def score_faces(
    image_rgb: np.ndarray, faces: Sequence[Face], targets: Sequence[SubjectTarget], expressions
) -> list[SubjectScore]:
    """Scores of every target, in target order, given the faces detected in `image_rgb`.

    expressions: an ExpressionClassifier (`predict(image, face) -> {emotion: p}`).
    """
    similarity = identity_similarity(targets, faces)
    scores = []
    for row, (target, index) in enumerate(zip(targets, match_faces(similarity))):
        if index is None:
            scores.append(missing_face(target.name))
            continue
        face = faces[index]
        probs = expressions.predict(image_rgb, face)
        top = max(probs, key=probs.get)
        category = pose_category(face.pose)
        scores.append(
            SubjectScore(
                subject=target.name,
                face_found=True,
                face_sim=float(similarity[row, index]),
                expr_prob=float(probs[target.expression]),
                expr_correct=top == target.expression,
                pose_hit=category == target.orientation,
                expr_top=top,
                pose_category=category,
                pose=tuple(float(v) for v in face.pose),
                face_box=tuple(float(v) for v in face.bbox),
            )
        )
    return scores


def score_image(image_rgb: np.ndarray, targets: Sequence[SubjectTarget], analyzer, expressions) -> list[SubjectScore]:
    """Detect every face with `analyzer` (a FaceAnalyzer) and score each target (`score_faces`)."""
    return score_faces(image_rgb, analyzer.analyze(image_rgb), targets, expressions)


def reference_embeddings(analyzer, images: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
    """(R, D) unit identity vectors: the largest face of each reference photo.

    A reference photo without a face raises NoFaceError naming it (never a zero vector).
    """
    return np.stack([analyzer.largest_face(image, str(name)).embedding for image, name in zip(images, names)])
