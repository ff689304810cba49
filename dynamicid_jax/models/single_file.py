"""Original single-file checkpoints (SD1.5 and SDXL, community fine-tunes) -> diffusers-named
state dicts.

A single `.safetensors`/`.ckpt` file holds the models under the CompVis/LDM names (SD1.5) or
Stability's SGM names (SDXL), told apart by their keys (`detect_family`), never the file name:

    model.diffusion_model.*                 UNet (input_blocks / middle_block / output_blocks;
                                            SDXL adds label_emb.0.0/.0.2 = add_embedding)
    first_stage_model.*                     VAE (encoder.down.i.block.j, mid.attn_1, decoder.up.i ...)
    cond_stage_model.transformer.*          SD1.5's CLIP text encoder (already transformers names)
    conditioner.embedders.0.transformer.*   SDXL's CLIP-L (already transformers names)
    conditioner.embedders.1.model.*         SDXL's OpenCLIP bigG in OpenCLIP names (`convert_open_clip`)

`extract_component` renames one of them to the diffusers/transformers key names that
`load_unet`, `load_vae` and `load_text_encoder` import, so every loader has one import path.
The block structure (levels, resnets per level) is read off the keys, not assumed. Keys of a
component that fit no rule are an error, never dropped. Torch-free for `.safetensors`.
Non-EMA weights are used (`model.diffusion_model.*`), as diffusers does by default. The
architecture an SDXL file does not state is inferred from its shapes (`single_file_configs.py`).
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

SD15, SDXL = "sd15", "sdxl"
COMPONENT_PREFIXES = {
    SD15: {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.transformer.",
    },
    SDXL: {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
}
# SDXL: the OpenCLIP bigG tower (diffusers tests `...resblocks.9.mlp.c_proj.bias`, which
# presumes 10 layers; any resblock is the same layout and also finds tiny test files) or, in a
# UNet-only file, the micro-conditioning embedding. SD2.x: OpenCLIP-H under cond_stage_model.
_SDXL_MARKERS = ("conditioner.embedders.1.model.transformer.resblocks.", "model.diffusion_model.label_emb.")
_SD2_MARKER = "cond_stage_model.model.transformer.resblocks."

_UNET_DIRECT = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",  # SDXL's text_time embedding
    "label_emb.0.2": "add_embedding.linear_2",
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
_OPEN_CLIP_DIRECT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_LAYER_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                          "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}


def _header_keys(path: pathlib.Path) -> list[str]:
    """Tensor names of a checkpoint: the safetensors header alone, or a pickle's keys."""
    if path.suffix == ".safetensors":
        return list(torch_import.safetensors_header(path)[0])  # checked against the file; no __metadata__
    return list(torch_import.read_state_dict(path))


def detect_family(path: str | os.PathLike) -> str:
    """SD15 or SDXL, from the keys of a single-file checkpoint (never its name).

    SD2.x files (OpenCLIP-H under `cond_stage_model.model.`) are an error naming the file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"single-file checkpoint not found: {path}")
    keys = _header_keys(path)
    if any(k.startswith(_SDXL_MARKERS) for k in keys):
        return SDXL
    if any(k.startswith(_SD2_MARKER) for k in keys):
        raise torch_import.WeightImportError(
            f"{path}: a Stable Diffusion 2.x single file (OpenCLIP-H text encoder); only SD1.5 and SDXL are supported")
    return SD15


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


def convert_open_clip(ldm: Mapping[str, np.ndarray]) -> StateDict:
    """SDXL's `conditioner.embedders.1.model.*` (OpenCLIP bigG, prefix stripped) -> transformers
    CLIPTextModelWithProjection keys.

    The fused attention input `attn.in_proj_weight/bias` (3D, D) splits in thirds into q/k/v;
    `text_projection` (D, P), applied as x @ P in OpenCLIP, is transposed into the Linear
    weight (P, D); `logit_scale` (the contrastive temperature) is no text-encoder weight.
    """
    out: StateDict = {}
    prefix = COMPONENT_PREFIXES[SDXL]["text_encoder_2"]
    for key, value in ldm.items():
        if key in _OPEN_CLIP_DIRECT:
            out[_OPEN_CLIP_DIRECT[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = np.ascontiguousarray(value.T)
        elif key == "logit_scale":
            continue
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.(.*)$", key):
            stem = f"text_model.encoder.layers.{m[1]}"
            if fused := re.fullmatch(r"attn\.in_proj_(weight|bias)", m[2]):
                for name, third in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                    out[f"{stem}.self_attn.{name}.{fused[1]}"] = third
            else:
                out[f"{stem}.{_rename_part(m[2], _OPEN_CLIP_LAYER_PARTS, prefix + key)}"] = value
        else:
            raise torch_import.WeightImportError(f"single-file text_encoder_2: key fits no OpenCLIP rule: {prefix}{key}")
    return out


def convert_text_encoder(ldm: Mapping[str, np.ndarray]) -> StateDict:
    """`cond_stage_model.transformer.*` keys (prefix stripped) -> transformers CLIPTextModel keys.

    Older files omit the `text_model.` level; it is added so one naming reaches the importer.
    """
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in ldm.items()}


_CONVERTERS = {"unet": convert_unet, "vae": convert_vae, "text_encoder": convert_text_encoder,
               "text_encoder_2": convert_open_clip}


def _check_all_consumed(ldm: Mapping[str, np.ndarray], consumed: set[str], component: str) -> None:
    left = sorted(set(ldm) - consumed)
    if left:
        shown = ", ".join(COMPONENT_PREFIXES[SD15][component] + k for k in left[:20])
        raise torch_import.WeightImportError(
            f"single-file {component}: {len(left)} keys fit no known layout rule: {shown}"
        )


def extract_component(path: str | os.PathLike, component: str, family: str | None = None) -> StateDict:
    """Read one component of a single-file SD1.5 or SDXL checkpoint under diffusers/transformers names.

    path: `.safetensors` (read without torch) or `.ckpt`/`.pt`/`.bin` (torch pickle).
    component: "unet", "vae", "text_encoder", or (SDXL) "text_encoder_2".
    family: SD15 or SDXL; None = `detect_family(path)`.
    Returns {diffusers key: numpy array}; raises WeightImportError when the file has no
    weights for the component (e.g. a UNet-only file asked for its VAE).
    """
    known = sorted(COMPONENT_PREFIXES[SDXL])
    if component not in known:
        raise ValueError(f"component must be one of {known}, got {component!r}")
    path = pathlib.Path(path)
    family = family or detect_family(path)
    if component not in COMPONENT_PREFIXES[family]:
        raise torch_import.WeightImportError(f"{path}: an {family} single file has no {component}")
    prefix = COMPONENT_PREFIXES[family][component]
    ldm = _read_component(path, prefix)
    if not ldm:
        raise torch_import.WeightImportError(
            f"{path}: no {component} weights in this single-file checkpoint (no key starts with {prefix!r})"
        )
    return _CONVERTERS[component](ldm)
