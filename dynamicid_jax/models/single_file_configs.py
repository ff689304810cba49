"""The architecture of an SDXL single file, read from its tensors' shapes (as ComfyUI's model
detection does), so fine-tunes of other sizes load without a config.

Input: one component's state dict already under diffusers/transformers names
(`single_file.extract_component`). What shapes state is read from them: widths, levels,
resnets per level, which levels attend, transformer blocks per attention, the context
width, linear or 1x1-conv projections, the add_embedding input, vocabulary, layers, MLP and
projection widths. What no shape states follows SDXL's own conventions: attention heads of
64 channels (UNet, CLIP-L and bigG alike), GroupNorm of 32 groups, time ids embedded 256
wide, CLIP-L's quick_gelu and bigG's gelu. A shape these conventions cannot fit (a width not
a multiple of 64, say) is an error naming the tensor; `config=` then states the architecture.
The VAE's fields are returned as a dict (`models/vae.py` builds its config: no import cycle).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from dynamicid_jax.models.clip import CLIPTextConfig
from dynamicid_jax.models.torch_import import WeightImportError
from dynamicid_jax.models.unet_config import (
    CROSS_ATTN_DOWN, CROSS_ATTN_UP, PLAIN_DOWN, PLAIN_UP, TEXT_TIME, UNetConfig,
)

StateDict = Mapping[str, np.ndarray]

HEAD_SIZE = 64  # SDXL's UNet heads (5, 10, 20 over 320, 640, 1280) and both CLIP towers
GROUPS = 32  # every GroupNorm of SD/SDXL's UNet and VAE
TIME_ID_WIDTH = 256  # SDXL's addition_time_embed_dim
SDXL_VAE_SCALING_FACTOR = 0.13025  # diffusers falls back to SD1.5's 0.18215 here: wrong for SDXL


def _indices(sd: StateDict, stem: str) -> list[int]:
    """Sorted n of the keys `stem.n.` (stem a plain dotted prefix)."""
    pattern = re.compile(re.escape(stem) + r"\.(\d+)\.")
    return sorted({int(m[1]) for k in sd if (m := pattern.match(k))})


def _shape(sd: StateDict, key: str, where: str) -> tuple[int, ...]:
    if key not in sd:
        raise WeightImportError(f"{where}: tensor {key} missing; cannot infer the architecture")
    return tuple(sd[key].shape)


def _divides(size: int, by: int, key: str, what: str, where: str) -> int:
    if size % by:
        raise WeightImportError(
            f"{where}: {key} has width {size}, not a multiple of SDXL's {what} {by}; pass config= for this model")
    return size


def infer_unet_config(sd: StateDict, where: str) -> UNetConfig:
    """UNetConfig of a diffusers-named SDXL UNet state dict (where: the file, for errors)."""
    levels = _indices(sd, "down_blocks")
    if not levels:
        raise WeightImportError(f"{where}: no UNet down_blocks tensors")
    width_keys = [f"down_blocks.{i}.resnets.0.conv1.weight" for i in levels]
    widths = tuple(_shape(sd, k, where)[0] for k in width_keys)
    for key, width in zip(width_keys, widths):
        _divides(width, HEAD_SIZE, key, "head size", where)
        _divides(width, GROUPS, key, "GroupNorm groups", where)
    layers = len(_indices(sd, "down_blocks.0.resnets"))

    def attends(stem: str) -> bool:
        return any(k.startswith(stem + ".attentions.") for k in sd)

    def blocks(stem: str) -> int:
        return len(_indices(sd, stem + ".transformer_blocks"))

    down = [attends(f"down_blocks.{i}") for i in levels]
    up = [attends(f"up_blocks.{i}") for i in levels]
    down_counts = [tuple(blocks(f"down_blocks.{i}.attentions.{j}") for j in range(layers)) if down[i] else (1,) * layers
                   for i in levels]
    up_counts = [tuple(blocks(f"up_blocks.{i}.attentions.{j}") for j in range(layers + 1)) if up[i]
                 else (1,) * (layers + 1) for i in levels]
    mid = blocks("mid_block.attentions.0")
    per_level = [c[0] for c in down_counts]
    compact = (all(len(set(c)) == 1 for c in down_counts) and mid == per_level[-1]
               and all(up_counts[i] == (per_level[::-1][i],) * (layers + 1) for i in levels))
    if not compact and mid != down_counts[-1][0]:
        raise WeightImportError(f"{where}: mid_block has {mid} transformer blocks, the last level's first attention "
                                f"{down_counts[-1][0]}; diffusers' UNet ties them")
    context_key = next((k for k in sorted(sd) if k.endswith("attn2.to_k.weight")), None)
    proj_key = next((k for k in sorted(sd) if k.endswith("proj_in.weight")), None)
    if context_key is None or proj_key is None:
        raise WeightImportError(f"{where}: no cross-attention tensors (attn2.to_k, proj_in): not an SDXL UNet")
    addition: dict[str, Any] = {}
    if "add_embedding.linear_1.weight" in sd:
        adm = _shape(sd, "add_embedding.linear_1.weight", where)[1]
        if adm <= 6 * TIME_ID_WIDTH:
            raise WeightImportError(f"{where}: add_embedding.linear_1.weight takes {adm} inputs, not a pooled "
                                    f"text vector plus 6 time ids x {TIME_ID_WIDTH}; pass config=")
        addition = dict(addition_embed_type=TEXT_TIME, addition_time_embed_dim=TIME_ID_WIDTH,
                        projection_class_embeddings_input_dim=adm)
    return UNetConfig(
        in_channels=_shape(sd, "conv_in.weight", where)[1],
        out_channels=_shape(sd, "conv_out.weight", where)[0],
        block_out_channels=widths,
        layers_per_block=layers,
        down_block_types=tuple(CROSS_ATTN_DOWN if a else PLAIN_DOWN for a in down),
        up_block_types=tuple(CROSS_ATTN_UP if a else PLAIN_UP for a in up),
        num_attention_heads=tuple(w // HEAD_SIZE for w in widths),
        cross_attention_dim=sd[context_key].shape[1],
        norm_num_groups=GROUPS,
        sample_size=128,
        use_linear_projection=sd[proj_key].ndim == 2,
        transformer_layers_per_block=tuple(per_level) if compact else tuple(down_counts),
        reverse_transformer_layers_per_block=None if compact else tuple(up_counts),
        **addition,
    )


def infer_text_config(sd: StateDict, component: str, where: str) -> CLIPTextConfig:
    """CLIPTextConfig of a transformers-named SDXL text encoder: component "text_encoder"
    (CLIP-L, quick_gelu) or "text_encoder_2" (OpenCLIP bigG, gelu, with its projection)."""
    vocab, hidden = _shape(sd, "text_model.embeddings.token_embedding.weight", where)
    _divides(hidden, HEAD_SIZE, "text_model.embeddings.token_embedding.weight", "head size", where)
    projection = sd.get("text_projection.weight")
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_shape(sd, "text_model.encoder.layers.0.mlp.fc1.weight", where)[0],
        num_layers=len(_indices(sd, "text_model.encoder.layers")),
        num_heads=hidden // HEAD_SIZE,
        max_positions=_shape(sd, "text_model.embeddings.position_embedding.weight", where)[0],
        activation="gelu" if component == "text_encoder_2" else "quick_gelu",
        projection_dim=None if projection is None else projection.shape[0],
    )


def infer_vae_fields(sd: StateDict, where: str) -> dict[str, Any]:
    """VAEConfig fields of a diffusers-named SDXL VAE state dict (SD1.5's architecture, any size)."""
    levels = _indices(sd, "encoder.down_blocks")
    keys = [f"encoder.down_blocks.{i}.resnets.0.conv1.weight" for i in levels]
    widths = tuple(_shape(sd, k, where)[0] for k in keys)
    for key, width in zip(keys, widths):
        _divides(width, GROUPS, key, "GroupNorm groups", where)
    return dict(
        in_channels=_shape(sd, "encoder.conv_in.weight", where)[1],
        out_channels=_shape(sd, "decoder.conv_out.weight", where)[0],
        block_out_channels=widths,
        layers_per_block=len(_indices(sd, "encoder.down_blocks.0.resnets")),
        latent_channels=_shape(sd, "encoder.conv_out.weight", where)[0] // 2,  # mean and log-variance
        norm_num_groups=GROUPS,
        scaling_factor=SDXL_VAE_SCALING_FACTOR,
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in sd,
    )
