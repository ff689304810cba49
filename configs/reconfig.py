"""Stage 2 (reconfiguration) of DynamicID: IMR + KeyPointEncoder, everything of stage 1 frozen.

Per example one identity: a source image and T target images; loss = feature matching
MSE(IMR(source -> target motion), target tokens) + lambda * MSE of the frozen UNet's noise
predictions under the two token sets (gradients flow through the frozen UNet). A second,
KDEF-style source is mixed in with probability `data.kdef_probability`.

  python launch/train.py --stage=reconfig --config=configs/reconfig.py --data=SHARDS --workdir=runs/reconfig \
      --config.init.stage1=runs/anchor          # or a folder with the release's SAA.bin,
                                                # then also --config.init.base_model=PATH_TO_SD15

SDXL: `configs/reconfig.py:sdxl` with --config.init.stage1=runs/anchor_sdxl (the
consistency term runs through the SDXL UNet with each target's time ids and the prompt's
pooled embedding); `:tiny_sdxl` for the tiny SDXL.

Tiny random model:

  python launch/train.py --stage=reconfig --config=configs/reconfig.py:tiny --data=SHARDS \
      --workdir=runs/tiny_reconfig --config.init.stage1=runs/tiny_anchor

(a run on the tiny random base tokenizes its prompt with the tiny vocabulary; otherwise the
tokenizer is `init.tokenizer` or `<init.base_model>/tokenizer`).
"""

import ml_collections

from dynamicid_jax.training.defaults import common_config, parse_arg


def get_config(arg=None) -> ml_collections.ConfigDict:
    config = common_config(arg)
    small = parse_arg(arg)[0]
    config.stage = "reconfig"
    config.init.random = False  # stage 2 starts from a stage-1 result (config.init.stage1)
    config.data.global_batch_size = 8 if small else 1  # identities per update
    config.data.num_targets = 2 if small else 32  # target images per identity (release: 32)
    config.data.kdef_probability = 0.05  # probability an example comes from the KDEF-style source
    config.data.min_images = 2  # identities with fewer records are left out
    config.optimizer.lr = 1e-3 if small else 1e-4
    config.loss = ml_collections.ConfigDict()
    config.loss.consistency_weight = 1.0  # lambda of the latent-diffusion consistency term
    config.loss.prompt = "portrait, cinematic photo, film, professional, 4k, highly detailed"
    return config
