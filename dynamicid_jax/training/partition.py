"""Which parameters each stage trains, and the split of the params dict into disjoint trees.

The params dict is modeling.py's: {component: tree}, keypoint_encoder = {"params",
"batch_stats"}. A stage splits the components it needs into
  trainable    gets gradients and optimizer state,
  frozen       read by the step, never updated (no optimizer state),
  model_state  updated by the step without gradients (BatchNorm running statistics),
each a nested dict holding only its own leaves, so `merge(trainable, frozen, model_state)`
gives back the original tree.

  anchor   trainable: face_projection, every LoRA leaf (lora_down/lora_up) and to_k_ip/to_v_ip
           of the UNet; frozen: the rest of the UNet, text_encoder.
  reconfig trainable: imr, keypoint_encoder params; model_state: keypoint_encoder
           batch_stats; frozen: the whole UNet and face_projection (all of stage 1).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flax import traverse_util

STAGES = ("anchor", "reconfig")
Path = tuple[str, ...]

# The components each stage's step reads (the rest, e.g. vae and vision_encoder, stay on disk).
STAGE_COMPONENTS = {
    "anchor": ("unet", "text_encoder", "face_projection"),
    "reconfig": ("unet", "face_projection", "imr", "keypoint_encoder"),
}


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return stage


def is_anchor_trainable(path: Path) -> bool:
    """Face projection, LoRA and the identity projections of every SAA layer."""
    if path[0] == "face_projection":
        return True
    return path[0] == "unet" and (path[-1] in ("lora_down", "lora_up") or path[-2] in ("to_k_ip", "to_v_ip"))


def is_reconfig_trainable(path: Path) -> bool:
    return path[0] == "imr" or path[:2] == ("keypoint_encoder", "params")


def is_reconfig_model_state(path: Path) -> bool:
    return path[:2] == ("keypoint_encoder", "batch_stats")


def role_fn(stage: str) -> Callable[[Path], str]:
    """path -> "trainable" | "frozen" | "model_state" for `stage`."""
    check_stage(stage)

    def role(path: Path) -> str:
        if stage == "anchor":
            return "trainable" if is_anchor_trainable(path) else "frozen"
        if is_reconfig_trainable(path):
            return "trainable"
        return "model_state" if is_reconfig_model_state(path) else "frozen"

    return role


def split_params(params: Mapping[str, Any], stage: str) -> tuple[dict, dict, dict]:
    """params dict -> (trainable, frozen, model_state) for the components `stage` uses.

    A needed component that is missing is an error naming it (never a silent fresh init).
    """
    missing = [c for c in STAGE_COMPONENTS[check_stage(stage)] if c not in params]
    if missing:
        raise ValueError(f"stage {stage!r} needs parameters of {missing}; got only {sorted(params)}")
    role = role_fn(stage)
    parts: dict[str, dict] = {"trainable": {}, "frozen": {}, "model_state": {}}
    flat = traverse_util.flatten_dict({c: params[c] for c in STAGE_COMPONENTS[stage]})
    for path, value in flat.items():
        parts[role(path)][path] = value
    if not parts["trainable"]:
        raise ValueError(f"stage {stage!r}: no trainable parameters found")
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
