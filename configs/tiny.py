"""Tiny random DynamicID for tests and `make demo`: every module, a few thousand times smaller.

SD1.5's VAE factor 8, 77 text tokens and 4 identity tokens on a 2-level UNet (one
cross-attention level, one plain), sized so that 2 CPU cores compile and run it in seconds. Identity embeddings are 128-d: the
offline SFace model set. Nothing here is trained: pictures are noise-like by design. The
values are the library's (`dynamicid_jax.base_models.sd15.tiny_model_config`), which
`--demo` uses too.

  python launch/sample.py --demo            # uses this config with random weights
"""

import ml_collections

from dynamicid_jax import base_models


def model_config() -> ml_collections.ConfigDict:
    return get_config().model


def get_config() -> ml_collections.ConfigDict:
    return base_models.default_config(tiny=True)
