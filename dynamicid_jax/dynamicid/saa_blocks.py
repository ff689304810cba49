"""Which cross-attentions carry SAA's identity branch: all (the default) or a subset by pattern.

DynamicID puts SAA on every attn2 (16 on SD1.5, 70 on SDXL). For ablations a config may
restrict it (`model.saa_blocks`, a list of patterns): the attn2 layers no pattern selects
stay plain cross-attentions (with their stage-1 LoRA; no to_k_ip/to_v_ip), every attn1
keeps its LoRA either way.

Names are diffusers' module paths of the attn2 layers, which are also what papers and
the processor numbering of the exported weights use:

    down_blocks.1.attentions.0.transformer_blocks.0.attn2
    mid_block.attentions.0.transformer_blocks.9.attn2
    up_blocks.0.attentions.1.transformer_blocks.3.attn2

A pattern is a shell glob (`fnmatch`, case-sensitive, `*` crosses dots) matched against the
whole name, or against a prefix ending at a dot: `up_blocks.0.attentions.1` selects its ten
transformer blocks on SDXL, `mid_block` the mid block, `down_blocks.*` every down block. A
pattern that selects nothing in this UNet is a ConfigError (a typo must not silently
train or sample without the identity branch where it was meant to be).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Sequence

from dynamicid_jax.errors import ConfigError
from dynamicid_jax.models.unet_config import CROSS_ATTN_DOWN, CROSS_ATTN_UP, UNetConfig

# Our linen path of an attn2 (models/unet_blocks.py's names), as its trailing components.
_LINEN_PATH = re.compile(
    r"(down_blocks|up_blocks)_(\d+)/attentions_(\d+)/transformer_blocks_(\d+)/attn2$"
    r"|mid_block/attentions_(\d+)/transformer_blocks_(\d+)/attn2$"
)


def attn2_names(config: UNetConfig) -> list[str]:
    """Every cross-attention of a UNet, diffusers' names, in diffusers' `attn_processors`
    order (down blocks, up blocks, mid block; transformer blocks in order)."""
    names = []

    def level(kind: str, index: int, counts: Sequence[int]):
        for j, n in enumerate(counts):
            names.extend(f"{kind}.{index}.attentions.{j}.transformer_blocks.{k}.attn2" for k in range(n))

    for i, block in enumerate(config.down_block_types):
        if block == CROSS_ATTN_DOWN:
            level("down_blocks", i, config.down_transformer_layers(i))
    for i, block in enumerate(config.up_block_types):
        if block == CROSS_ATTN_UP:
            level("up_blocks", i, config.up_transformer_layers(i))
    names.extend(f"mid_block.attentions.0.transformer_blocks.{k}.attn2" for k in range(config.mid_transformer_layers))
    return names


def matches(pattern: str, name: str) -> bool:
    """Whether `pattern` selects the attn2 called `name` (whole name, or a dotted prefix)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def selected_names(patterns: Sequence[str], config: UNetConfig) -> list[str]:
    """The attn2 names the patterns select (empty patterns: all). ConfigError naming the first
    pattern that selects nothing, or a pattern that is not a non-empty string."""
    names = attn2_names(config)
    if not patterns:
        return names
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ConfigError(f"model.saa_blocks: {pattern!r} is not a pattern (a non-empty string)")
        if not any(matches(pattern, n) for n in names):
            raise ConfigError(
                f"model.saa_blocks: pattern {pattern!r} selects none of this UNet's {len(names)} cross-attentions "
                f"(names like {names[0]!r}, {names[-1]!r})")
    return [n for n in names if any(matches(p, n) for p in patterns)]


def diffusers_name(path: Sequence[str]) -> str:
    """Our linen path of an attn2 (tuple of names, possibly under a parent module) -> its
    diffusers name. ValueError when the path is not an attn2 of the SD UNet layout."""
    joined = "/".join(path)
    match = _LINEN_PATH.search(joined)
    if match is None:
        raise ValueError(f"{joined} is not a cross-attention of the SD UNet layout: saa_blocks cannot place it")
    kind, block, attention, transformer, mid_attention, mid_transformer = match.groups()
    if kind is None:
        return f"mid_block.attentions.{mid_attention}.transformer_blocks.{mid_transformer}.attn2"
    return f"{kind}.{block}.attentions.{attention}.transformer_blocks.{transformer}.attn2"


def carries_identity(patterns: Sequence[str], path: Sequence[str]) -> bool:
    """Whether the attn2 at linen `path` carries the identity branch (no patterns: every one)."""
    if not patterns:
        return True
    name = diffusers_name(path)
    return any(matches(p, name) for p in patterns)
