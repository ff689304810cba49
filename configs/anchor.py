"""Stage 1 (anchoring) of DynamicID: face projection + all LoRA + to_k_ip/to_v_ip on SD1.5 or SDXL.

Trains on precomputed anchor shards (`data_pipelines/precompute.py --stage=anchor`) with the
epsilon-MSE diffusion loss and the exclusive 5% / 5% / 5% face / text / both drops.

  python launch/train.py --stage=anchor --config=configs/anchor.py --data=SHARDS --workdir=runs/anchor \
      --config.init.base_model=PATH_TO_SD15

Tiny random model (tests, laptops; shards precomputed with the tiny model):

  python launch/train.py --stage=anchor --config=configs/anchor.py:tiny --data=SHARDS --workdir=runs/tiny_anchor

SDXL (`:sdxl`: 1024 px, bfloat16 compute, remat per transformer block; shards precomputed
with an SDXL --base_model; memory per device: benchmarks/sdxl_train_memory.md). One host
with 8 accelerators, fsdp over all of them:

  python launch/train.py --stage=anchor --config=configs/anchor.py:sdxl --data=SDXL_SHARDS \
      --workdir=runs/anchor_sdxl --config.init.base_model=PATH_TO_SDXL --config.data.global_batch_size=8

A pod: the same command on every host after `jax.distributed.initialize` (launch/train.py
does it), e.g. --config.mesh.data=4 --config.mesh.fsdp=8 on 32 chips. `:tiny_sdxl` is the
tiny SDXL of tests and the tiny run.

Shards made with aspect-ratio buckets (precompute --buckets=...) train with the same set named,
e.g. --config.data.buckets=1024x1024,1152x896,896x1152 (each batch one bucket; README).

Any field below can be overridden, e.g. `--config.optimizer.lr=1e-5 --config.mesh.fsdp=8`.
"""

import ml_collections

from dynamicid_jax.training.defaults import common_config


def get_config(arg=None) -> ml_collections.ConfigDict:
    config = common_config(arg)
    config.stage = "anchor"
    config.loss = ml_collections.ConfigDict()
    config.loss.face_drop = 0.05  # zero ID vector + null CLIP image features
    config.loss.text_drop = 0.05  # empty caption
    config.loss.both_drop = 0.05  # both at once (mutually exclusive draws)
    return config
