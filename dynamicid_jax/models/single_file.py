"""Original single-file SD1.5 checkpoints (community fine-tunes) -> diffusers-named state dicts.

A single `.safetensors`/`.ckpt` file holds three models under the CompVis/LDM names:

    model.diffusion_model.*          UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*              VAE (encoder.down.i.block.j, mid.attn_1, decoder.up.i ...)
    cond_stage_model.transformer.*   CLIP text encoder (already transformers names)

`extract_component` renames one of them to the diffusers/transformers key names that
`load_unet`, `load_vae` and `load_text_encoder` import, so every loader has one import path.
The block structure (levels, resnets per level) is read off the keys, not assumed. Keys of a
component that fit no rule are an error, never dropped. Torch-free for `.safetensors`.
Non-EMA weights are used (`model.diffusion_model.*`), as diffusers does by default.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Mapping

import numpy as np

from dynamicid_jax.errors import MissingFileError
from dynamicid_jax.models import torch_import

StateDict = dict[str, np.ndarray]

COMPONENT_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}

_UNET_DIRECT = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_UNET_RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_DIRECT = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.norm_out": "encoder.conv_norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.norm_out": "decoder.conv_norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                     "nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _read_component(path: pathlib.Path, prefix: str) -> StateDict:
    """Tensors under `prefix` (prefix stripped), floating point widened to float32."""
    if path.suffix == ".safetensors":
        # Read only this component's tensors: a full SD1.5 file is 2-7 GB.
        return torch_import.read_safetensors(path, prefix)
    state_dict = torch_import.read_state_dict(path)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _split(key: str, stem: str) -> tuple[str, str] | None:
    """`stem.rest` -> (stem, rest); None if key is not under stem."""
    return (stem, key[len(stem) + 1:]) if key.startswith(stem + ".") else None


def _rename_part(rest: str, parts: Mapping[str, str], where: str) -> str:
    """Rename the leading sub-module of `rest` (e.g. `in_layers.0.weight` -> `norm1.weight`)."""
    for old, new in parts.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    raise torch_import.WeightImportError(f"unrecognised key {where}.{rest} in a single-file checkpoint")


def convert_unet(ldm: Mapping[str, np.ndarray]) -> StateDict:
    """LDM UNet keys (prefix stripped) -> diffusers UNet2DConditionModel keys."""
    out: StateDict = {}
    consumed: set[str] = set()

    def put(ldm_key: str, diffusers_key: str) -> None:
        out[diffusers_key] = ldm[ldm_key]
        consumed.add(ldm_key)

    def under(stem: str) -> list[tuple[str, str]]:
        return [(k, k[len(stem) + 1:]) for k in ldm if k.startswith(stem + ".")]

    for stem, new in _UNET_DIRECT.items():
        for key, rest in under(stem):
            put(key, f"{new}.{rest}")

    def block_index(name: str) -> set[int]:
        return {int(m.group(1)) for k in ldm if (m := re.match(rf"{name}\.(\d+)\.", k))}

    # input_blocks.0 is conv_in; then per level: resnet(+attention) blocks, then a downsampler block.
    level, layer, layers_per_block = 0, 0, None
    for n in sorted(block_index("input_blocks") - {0}):
        stem = f"input_blocks.{n}"
        if f"{stem}.0.op.weight" in ldm:
            for key, rest in under(f"{stem}.0.op"):
                put(key, f"down_blocks.{level}.downsamplers.0.conv.{rest}")
            layers_per_block = layers_per_block or layer
            level, layer = level + 1, 0
            continue
        for key, rest in under(f"{stem}.0"):
            put(key, f"down_blocks.{level}.resnets.{layer}.{_rename_part(rest, _UNET_RESNET_PARTS, stem + '.0')}")
        for key, rest in under(f"{stem}.1"):
            put(key, f"down_blocks.{level}.attentions.{layer}.{rest}")
        layer += 1
    layers_per_block = layers_per_block or layer
    if not layers_per_block:
        raise torch_import.WeightImportError("single-file UNet has no input_blocks resnets")

    for key, rest in under("middle_block.0"):
        put(key, f"mid_block.resnets.0.{_rename_part(rest, _UNET_RESNET_PARTS, 'middle_block.0')}")
    for key, rest in under("middle_block.1"):
        put(key, f"mid_block.attentions.0.{rest}")
    for key, rest in under("middle_block.2"):
        put(key, f"mid_block.resnets.1.{_rename_part(rest, _UNET_RESNET_PARTS, 'middle_block.2')}")

    # output_blocks: layers_per_block + 1 per level; `.1` is attention unless it is the upsampler.
    for n in sorted(block_index("output_blocks")):
        level, layer = divmod(n, layers_per_block + 1)
        stem = f"output_blocks.{n}"
        for key, rest in under(f"{stem}.0"):
            put(key, f"up_blocks.{level}.resnets.{layer}.{_rename_part(rest, _UNET_RESNET_PARTS, stem + '.0')}")
        for sub in (1, 2):
            if f"{stem}.{sub}.conv.weight" in ldm:
                for key, rest in under(f"{stem}.{sub}.conv"):
                    put(key, f"up_blocks.{level}.upsamplers.0.conv.{rest}")
            elif sub == 1:
                for key, rest in under(f"{stem}.1"):
                    put(key, f"up_blocks.{level}.attentions.{layer}.{rest}")
    _check_all_consumed(ldm, consumed, "unet")
    return out


def convert_vae(ldm: Mapping[str, np.ndarray]) -> StateDict:
    """LDM VAE keys (prefix stripped) -> diffusers AutoencoderKL keys.

    The mid attention's q/k/v/proj_out are 1x1 convs (out, in, 1, 1) in LDM files; diffusers
    stores them as Linear (out, in), so they are squeezed here.
    """
    out: StateDict = {}
    consumed: set[str] = set()
    up_levels = {int(m.group(1)) for k in ldm if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    num_up = max(up_levels) + 1 if up_levels else 0
    for key, value in ldm.items():
        new = None
        for stem, target in _VAE_DIRECT.items():
            if (parts := _split(key, stem)) and re.fullmatch(r"weight|bias", parts[1]):
                new = f"{target}.{parts[1]}"
        if m := re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.*)$", key):
            new = f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_rename_part(m[3], _VAE_RESNET_PARTS, key)}"
        elif m := re.match(r"encoder\.down\.(\d+)\.downsample\.conv\.(.*)$", key):
            new = f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
        elif m := re.match(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.*)$", key):
            # LDM numbers decoder levels from the lowest resolution upward; diffusers the reverse.
            new = (f"decoder.up_blocks.{num_up - 1 - int(m[1])}.resnets.{m[2]}."
                   f"{_rename_part(m[3], _VAE_RESNET_PARTS, key)}")
        elif m := re.match(r"decoder\.up\.(\d+)\.upsample\.conv\.(.*)$", key):
            new = f"decoder.up_blocks.{num_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid\.block_([12])\.(.*)$", key):
            new = f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_rename_part(m[3], _VAE_RESNET_PARTS, key)}"
        elif m := re.match(r"(encoder|decoder)\.mid\.attn_1\.(.*)$", key):
            new = f"{m[1]}.mid_block.attentions.0.{_rename_part(m[2], _VAE_ATTENTION_PARTS, key)}"
            if value.ndim == 4:
                value = value[:, :, 0, 0]
        if new is not None:
            out[new] = value
            consumed.add(key)
    _check_all_consumed(ldm, consumed, "vae")
    return out


def convert_text_encoder(ldm: Mapping[str, np.ndarray]) -> StateDict:
    """`cond_stage_model.transformer.*` keys (prefix stripped) -> transformers CLIPTextModel keys.

    Older files omit the `text_model.` level; it is added so one naming reaches the importer.
    """
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in ldm.items()}


_CONVERTERS = {"unet": convert_unet, "vae": convert_vae, "text_encoder": convert_text_encoder}


def _check_all_consumed(ldm: Mapping[str, np.ndarray], consumed: set[str], component: str) -> None:
    left = sorted(set(ldm) - consumed)
    if left:
        shown = ", ".join(COMPONENT_PREFIXES[component] + k for k in left[:20])
        raise torch_import.WeightImportError(
            f"single-file {component}: {len(left)} keys fit no known SD1.5 layout rule: {shown}"
        )


def extract_component(path: str | os.PathLike, component: str) -> StateDict:
    """Read one component of a single-file SD1.5 checkpoint under diffusers/transformers names.

    path: `.safetensors` (read without torch) or `.ckpt`/`.pt`/`.bin` (torch pickle).
    component: "unet", "vae" or "text_encoder".
    Returns {diffusers key: numpy array}; raises WeightImportError when the file has no
    weights for the component (e.g. a UNet-only file asked for its VAE).
    """
    if component not in COMPONENT_PREFIXES:
        raise ValueError(f"component must be one of {sorted(COMPONENT_PREFIXES)}, got {component!r}")
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"single-file checkpoint not found: {path}")
    prefix = COMPONENT_PREFIXES[component]
    ldm = _read_component(path, prefix)
    if not ldm:
        raise torch_import.WeightImportError(
            f"{path}: no {component} weights in this single-file checkpoint (no key starts with {prefix!r})"
        )
    return _CONVERTERS[component](ldm)
