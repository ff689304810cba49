"""Evaluation harness: CLIP-T, FaceSim, Expr and Pose of generated images (paper Tables 1-3).

    protocol = load_protocol("configs/eval/tiny.json")
    evaluate(protocol, out_dir=..., mode="single", ablation=Ablation(), sampling=...,
             generate=pipeline.generate, provenance=pipeline.provenance,
             metrics=MetricModels(analyzer, expressions, load_clip_scorer(path) or None))

Command line: `python launch/evaluate.py --help`.
"""

from dynamicid_jax.evaluation.clip_score import CLIPJointModel, CLIPScorer, import_clip_params, load_clip_scorer
from dynamicid_jax.evaluation.face_metrics import (POSE_CATEGORIES, SubjectScore, SubjectTarget, match_faces,
                                                   pose_category, score_faces, score_image)
from dynamicid_jax.evaluation.protocol import (Ablation, EvalCase, Protocol, ProtocolError, expand_cases,
                                               load_protocol)
from dynamicid_jax.evaluation.runner import EvalResult, MetricModels, evaluate, resolve_sampling
from dynamicid_jax.outputs import StaleImageError

__all__ = [
    "Ablation", "CLIPJointModel", "CLIPScorer", "EvalCase", "EvalResult", "MetricModels", "POSE_CATEGORIES",
    "Protocol", "ProtocolError", "StaleImageError", "SubjectScore", "SubjectTarget", "evaluate", "expand_cases",
    "import_clip_params", "load_clip_scorer", "load_protocol", "match_faces", "pose_category", "resolve_sampling",
    "score_faces", "score_image",
]
