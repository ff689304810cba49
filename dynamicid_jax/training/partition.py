"""Which parameters each stage trains, and the split of the params dict into disjoint trees.

The params dict is modeling.py's: {component: tree}, keypoint_encoder = {"params",
"batch_stats"}. A stage splits the components it needs into
  trainable    gets gradients and optimizer state,
  frozen       read by the step, never updated (no optimizer state),
  model_state  updated by the step without gradients (BatchNorm running statistics),
each a nested dict holding only its own leaves, so `merge(trainable, frozen, model_state)`
gives back the original tree. Which leaf goes where is the stage's `role`
(`training.stages`).
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import traverse_util

Path = tuple[str, ...]


def split_params(params: Mapping[str, Any], stage) -> tuple[dict, dict, dict]:
    """params dict -> (trainable, frozen, model_state) for the components `stage` (a
    `training.stages` object) uses, each leaf where `stage.role(path)` puts it.

    A needed component that is missing is an error naming it (never a silent fresh init).
    """
    missing = [c for c in stage.components if c not in params]
    if missing:
        raise ValueError(f"stage {stage.name!r} needs parameters of {missing}; got only {sorted(params)}")
    parts: dict[str, dict] = {"trainable": {}, "frozen": {}, "model_state": {}}
    # A base model's further components the stage reads when present (SDXL's text_encoder_2).
    components = stage.components + tuple(c for c in stage.optional_components if c in params)
    flat = traverse_util.flatten_dict({c: params[c] for c in components})
    for path, value in flat.items():
        parts[stage.role(path)][path] = value
    if not parts["trainable"]:
        raise ValueError(f"stage {stage.name!r}: no trainable parameters found")
    return tuple(traverse_util.unflatten_dict(parts[k]) for k in ("trainable", "frozen", "model_state"))


def merge(*trees: Mapping[str, Any]) -> dict:
    """Union of disjoint nested dicts (the inverse of `split_params`); overlap is an error."""
    out: dict = {}
    for tree in trees:
        for path, value in traverse_util.flatten_dict(dict(tree)).items():
            if path in out:
                raise ValueError(f"parameter {'/'.join(path)} appears in two parts")
            out[path] = value
    return traverse_util.unflatten_dict(out)
