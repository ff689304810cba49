"""Per-identity SAA activation maps (the paper's Fig. 7) from the UNet's sown intermediates.

Every SAA layer sows (see saa.py) `activation_weight` w (B, N), the gate of the identity
branch per query, and `identity_probs` (B, heads, N, n*T), the identity softmax after box
routing. The injection of identity k at a query is w times the probability mass that query
puts on k's T tokens (head-averaged); over k these sum to w. Layers of every resolution are
resized to the latent grid and averaged, so one map per identity covers the whole UNet.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _sown(tree, name: str) -> list[jax.Array]:
    """Every value sown under `name` in an intermediates tree, in a fixed (path) order."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if any(getattr(k, "key", None) == name for k in path):
            found.append(leaf)
    return found


def identity_activation_maps(intermediates, latent_hw: tuple[int, int], tokens_per_id: int) -> jax.Array:
    """intermediates: the "intermediates" collection of one SAA UNet call; latent_hw (h, w)
    of its input. Returns (B, n_ids, h, w) float32, identity k's injection averaged over layers.
    """
    weights = _sown(intermediates, "activation_weight")
    probs = _sown(intermediates, "identity_probs")
    if not weights or len(weights) != len(probs):
        raise ValueError("no SAA intermediates found: apply the UNet with mutable=['intermediates']")
    h, w = latent_hw
    total = None
    for weight, prob in zip(weights, probs):
        b, n_queries = weight.shape
        n_ids = prob.shape[-1] // tokens_per_id
        per_id = prob.astype(jnp.float32).mean(axis=1).reshape(b, n_queries, n_ids, tokens_per_id).sum(-1)
        injected = weight.astype(jnp.float32)[..., None] * per_id  # (B, N, n)
        stride = round(math.sqrt(h * w / n_queries))  # layer grid = latent grid / 2^k
        grid = injected.reshape(b, h // stride, w // stride, n_ids)
        full = jax.image.resize(grid, (b, h, w, n_ids), method="nearest")
        total = full if total is None else total + full
    return jnp.moveaxis(total / len(weights), -1, 1)
