"""`attend_blockwise` (online softmax over key blocks) equals the materialised `attend`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamicid_jax.models.layers import Attention, attend, attend_blockwise


@pytest.mark.parametrize("n,m,block", [(37, 53, 16), (64, 64, 64), (10, 300, 128)])
def test_blockwise_matches_attend(n, m, block):
    rng = np.random.default_rng(n + m)
    q = rng.standard_normal((2, n, 3, 8), dtype=np.float32) * 3  # peaked softmax
    k = rng.standard_normal((2, m, 3, 8), dtype=np.float32)
    v = rng.standard_normal((2, m, 3, 8), dtype=np.float32)
    ref = np.asarray(attend(q, k, v))
    out = np.asarray(attend_blockwise(q, k, v, query_block=block, key_block=block))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_attention_module_uses_blocks_only_without_mask():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 50, 16), dtype=np.float32)
    plain, blocked = Attention(num_heads=2, head_dim=8), Attention(num_heads=2, head_dim=8, key_block=16)
    params = plain.init(jax.random.key(0), x)
    np.testing.assert_allclose(blocked.apply(params, x), plain.apply(params, x), rtol=1e-5, atol=1e-5)
    mask = jnp.tril(jnp.ones((50, 50), bool))  # a mask forces the plain path, which honours it
    np.testing.assert_allclose(blocked.apply(params, x, mask=mask), plain.apply(params, x, mask=mask),
                               rtol=1e-6, atol=1e-6)
