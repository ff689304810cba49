"""One demo pipeline (configs/tiny.py, random weights) per test process, shared by modules.

Loading it costs a few seconds with warm caches (tens of seconds cold) and its sampling loop
compiles again in every process (an executable with host callbacks is not reused from the
persistent cache), so
test_sampling.py and test_app.py share one object: the second module's requests of the same
shape (64x64, two people with boxes) reuse the first one's compiled program. `lora_file`
writes a style LoRA for its UNet (test_sampling's LCM-LoRA, the app's offered LoRA).
"""

import functools
import re

import flax
import numpy as np


@functools.cache
def demo_pipeline(expression_model: str):
    """-> (config, DynamicIDPipeline), loaded once per process."""
    from dynamicid_jax.loading import load_pipeline

    return load_pipeline(demo=True, expression_model=expression_model)


# The UNet modules of the published LCM-LoRA for SD1.5 (latent-consistency/lcm-lora-sdv1-5,
# diffusers' train_lcm_distill_lora_sd.py targets), kohya-named in the file.
LCM_LORA_MODULES = re.compile(r"(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|conv1|conv2"
                              r"|conv_shortcut|downsamplers\.0\.conv|upsamplers\.0\.conv|time_emb_proj)$")


def lora_file(params, path, rank=4, seed=0):
    """A random LoRA for the demo UNet in LCM-LoRA's key layout (kohya names, .alpha per module)."""
    from safetensors.numpy import save_file

    from dynamicid_jax.models.lora_files import component_targets

    rng = np.random.default_rng(seed)
    flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params["unet"]).items()}
    out = {}
    for name, (leaf_path, _) in sorted(component_targets(params["unet"], None)["unet"].items()):
        if not LCM_LORA_MODULES.search(name):
            continue
        kernel = flat["/".join(leaf_path)]
        inner = kernel.shape[:-1]  # (in,) or (kh, kw, in)
        down_shape = (rank, inner[-1]) + tuple(inner[:-1])
        up_shape = (kernel.shape[-1], rank) + ((1, 1) if kernel.ndim == 4 else ())
        stem = "lora_unet_" + name.replace(".", "_")
        out[stem + ".lora_down.weight"] = (rng.standard_normal(down_shape) / np.sqrt(np.prod(down_shape[1:]))).astype(np.float32)
        out[stem + ".lora_up.weight"] = (0.2 * rng.standard_normal(up_shape)).astype(np.float32)
        out[stem + ".alpha"] = np.asarray(rank / 2, np.float32)
    save_file(out, str(path))
    return path
