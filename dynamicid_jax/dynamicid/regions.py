"""Regions of any shape: a mask's cells on an attention grid, by one rule (`mask_cells`).

A person's region is a box or a mask. SAA needs, at each attention resolution (h, w), the
set of grid cells the region covers (B, n, h*w) bool; the layout boost, the gating and the
token routing then treat a box's cells and a mask's cells alike (saa.region_cells).

The mask rule, stated once (`mask_cells`): cell (r, c) of an (h, w) grid covers the
picture's [r/h, (r+1)/h) x [c/w, (c+1)/w); it belongs to the region when the mask's mean
over that area (its area average, white = 1) is at least one half. A mask travels as its
area average on the latent grid (the finest attention grid), (h_lat, w_lat) float32 in
[0, 1] (`area_average` of the file's pixels, masks.py); coarser grids area-average that.
When the latent grid's cells nest in the coarser grid's (each side divides, e.g. SD1.5 at
multiples of 64 px), this equals the area average of the mask itself.

A box keeps the release's cut (saa.box_masks: rows floor(y_min*h) <= r < floor(y_max*h)),
so that no existing picture changes. The two rules agree on a box whose edges lie on every
grid's cell boundaries (then each cell is wholly in or out), and on a half-covered cell
when the box ends at the grid's far edge; they differ on a cell the box covers in part
(the floor cut keeps a cell that the box starts inside of, and drops one it ends inside of,
whatever the covered share). tests/test_masks.py checks both statements.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Average coverage at or above this puts a cell in the region. The tolerance keeps an exact
# half (two of four cells) in whatever order float32 sums it; no real share is that close.
HALF = 0.5 - 1e-6


@functools.lru_cache(maxsize=64)
def area_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) float32: entry [r, i] is the share of destination cell r's length that
    source cell i covers, both spanning [0, 1) in equal cells; each row sums to 1.
    Computed in integers (cells of length 1/(src*dst)), so nested grids give exact powers of two."""
    start = np.arange(src)[None, :] * dst
    first = np.arange(dst)[:, None] * src
    overlap = np.clip(np.minimum(start + dst, first + src) - np.maximum(start, first), 0, None)
    return (overlap / src).astype(np.float32)


def area_average(values, grid: Sequence[int]):
    """values (..., H, W) -> (..., h, w): each grid cell's mean of `values` over its area.
    numpy in, numpy out (host); jax in, jax out (traced; the weights are constants)."""
    h, w = grid
    wy, wx = area_weights(values.shape[-2], h), area_weights(values.shape[-1], w)
    xp = jnp if isinstance(values, jax.Array) else np
    return xp.einsum("rh,...hw,cw->...rc", wy, values.astype(xp.float32), wx)


def mask_cells(coverage, grid: Sequence[int]):
    """THE mask rule: coverage (..., H, W) in [0, 1] (a mask, or its latent-grid average)
    -> (..., h*w) bool, row-major: the cells of the (h, w) grid whose area average is >= 1/2."""
    h, w = grid
    inside = area_average(coverage, grid) >= HALF
    return inside.reshape(inside.shape[:-2] + (h * w,))
