"""Regions of any shape: a mask's cells on an attention grid, by one rule (`mask_cells`).

A person's region is a box or a mask. SAA needs, at each attention resolution (h, w), the
set of grid cells the region covers (B, n, h*w) bool; the layout boost, the gating and the
token routing then treat a box's cells and a mask's cells alike (saa.region_cells).

THE mask rule (`mask_cells`): cell (r, c) of an (h, w) grid spans [r/h, (r+1)/h) x
[c/w, (c+1)/w) of the picture; it belongs to the region when the mask's pixel just before
the cell's far corner -- row ceil((r+1)*H/h) - 1 of a mask of H rows, column likewise -- is
white (grey level at least one half). Nearest-neighbour sampling at each cell's last pixel.

Why that pixel: a box keeps the release's cut (saa.box_masks: rows floor(y0*h) <= r <
floor(y1*h)), so that no existing picture changes. That cut keeps row r exactly when the
row's far edge lies in the box's half-open span, y0 < (r+1)/h <= y1. For a box drawn on a
mask's pixel grid (white rows Y0 <= p < Y1, y0 = Y0/H, y1 = Y1/H, integers Y0, Y1) this is
Y0 < e <= Y1 with e = (r+1)*H/h, and, Y0 and Y1 being integers, that is Y0 <= ceil(e) - 1
< Y1: the pixel just before the far edge is white. It holds for any real e, so for any
H/h, integer or not. So a box and the mask that draws it give the same cells on every
grid, for every box on the pixel grid (tests/test_masks.py, and the bytes on the demo model).
No rule that weighs a cell's covered area can do that: the cut keeps a cell a box enters
by one pixel before its far edge and drops one the box fills but for its last pixel row,
whatever the covered share; on a box the rule must be this sampling, and away from boxes
any other choice would be a second, unmotivated rule. A cell is in when its bottom-right
pixel is, so a region's cells may spill up to one cell above and left of the drawn area,
as a box's do, and never below or right of its extent.

Transport: a mask travels on the picture's pixels, (H, W) bool, `mask_cells(mask, (H, W))`
(each picture pixel takes the mask's pixel just before its far corner: the mask itself when
it has the picture's size), and each attention grid applies the rule to that. Not on the
latent grid: the UNet's grids halve rounding up (a 72 px picture: 9, 5, 3 cells), so a
coarse cell's last pixel is in general no latent cell's last pixel, while every grid's is
a picture pixel. The two steps are the rule on the mask itself when the mask's side divides
the picture's (nested ceilings: ceil(ceil(x)/k) = ceil(x/k)), or is a multiple of it and the
region is drawn on the picture's pixels; so a box on the picture's pixel grid and its drawn
mask at the picture's size, a divisor or a multiple of it, agree on every grid.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# A sampled pixel at or above this grey level (white = 1) is in the region.
HALF = 0.5


@functools.lru_cache(maxsize=64)
def last_pixel(src: int, dst: int) -> np.ndarray:
    """(dst,) int: for each of dst equal cells spanning [0, 1), the index of the last of src
    equal pixels that starts before the cell's far edge, ceil((r+1)*src/dst) - 1 (integers)."""
    return (np.arange(1, dst + 1) * src - 1) // dst


def mask_cells(values, grid: Sequence[int]):
    """THE mask rule: values (..., H, W) in [0, 1] or bool (a mask, or its picture-size
    cells) -> (..., h*w) bool, row-major: the cells of the (h, w) grid whose last pixel is
    white. numpy in, numpy out (host); jax in, jax out (traced; the indices are constants)."""
    h, w = grid
    rows, cols = last_pixel(values.shape[-2], h), last_pixel(values.shape[-1], w)
    xp = jnp if isinstance(values, jax.Array) else np
    picked = values[..., rows[:, None], cols[None, :]]  # (..., h, w)
    inside = xp.asarray(picked, xp.float32) >= HALF
    return inside.reshape(inside.shape[:-2] + (h * w,))
