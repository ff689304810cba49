"""The two training stages, one object each (`anchor.Anchor`, `reconfig.Reconfig`).

A stage says everything that differs between them: the components its step reads and which
of their parameters train (`components`, `role`), where its starting parameters come from
(`initial_params`), the features its shards hold and the batches read from them
(`feature_specs`, `dataset`, `batch_shapes`, `check_manifest`), its per-run constants
(`constants`, `abstract_constants`), its random draws and its loss (`loss`), how many
images one example holds (`images_per_example`), and what precompute writes for it (its input
units, rejects, record features and null inputs: `input_units` ... `text_features`). The
trainer, the update step, `data`, `init`, `partition` and `data/precompute.py` take a stage
object and branch on no stage name.

    stage = stages.get(config.stage)     # "anchor" (stage 1) or "reconfig" (stage 2)
"""

from __future__ import annotations

from dynamicid_jax.training.stages.anchor import Anchor
from dynamicid_jax.training.stages.reconfig import Reconfig

STAGES = {stage.name: stage for stage in (Anchor(), Reconfig())}


def get(name: str):
    """The stage called `name`; ValueError naming the known ones."""
    if name not in STAGES:
        raise ValueError(f"stage must be one of {tuple(STAGES)}, got {name!r}")
    return STAGES[name]
