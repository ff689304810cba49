"""Community LoRA files (style LoRAs, LCM-LoRA) merged into SD1.5 or SDXL UNet and text-encoder weights.

SDXL files use `lora_te1_` (CLIP-L) and `lora_te2_` (bigG) for kohya, `text_encoder_2.` for
PEFT, and kohya SDXL UNet LoRAs SGM block names (`input_blocks_4_1_...`, `label_emb_0_0`),
mapped like SD1.5's LDM names with SDXL's layers_per_block.

Three layouts, as people download them:
  kohya / sd-scripts  `lora_unet_<module>` / `lora_te_<module>` (diffusers module names with
                      "." -> "_") + `.lora_down.weight`, `.lora_up.weight`, `.alpha`;
                      conv LoRA (LoCon) on resnet convs: down (r, in, kh, kw), up (out, r, 1, 1).
                      UNet modules may also be in the original LDM naming
                      (`lora_unet_input_blocks_4_1_proj_in`, `middle_block_*`, `output_blocks_*`,
                      `time_embed_0`): `ldm_module_name` maps them, as single_file.py maps
                      weights (input block n = level (n-1) // (L+1), slot (n-1) % (L+1), the
                      last slot the downsampler; output block n = divmod(n, L+1); sub-module 0
                      a resnet, 1 an attention or the upsampler; L resnets per down level).
  diffusers / PEFT    `unet.<module>` / `text_encoder.<module>` + `.lora_A.weight`,
                      `.lora_B.weight` (or the older `.lora.down.weight`, `.lora.up.weight`),
                      an optional `.alpha`. Without one, alpha comes from the adapter's
                      PEFT config when the file carries it (diffusers' `save_lora_weights`
                      writes it as safetensors metadata `lora_adapter_metadata`: "unet.lora_alpha",
                      "unet.alpha_pattern", "unet.use_rslora", ... per component; a PEFT
                      folder has `adapter_config.json` beside `adapter_model.safetensors`, whose
                      keys are `base_model.model.<module>.lora_A.weight` for the one model it
                      adapted, UNet or text encoder, told apart by the module names),
                      else alpha = rank. PEFT's rule: alpha_pattern's first key matching the
                      module name's end (`(.*[.])?(key)$`), else lora_alpha; scale alpha / r,
                      or alpha / sqrt(r) with use_rslora.
  diffusers, older    its training scripts before PEFT: `[unet.]<attn>.processor.to_q_lora.down.weight`
                      (to_q/k/v/out -> to_q/k/v/to_out.0; text encoder: q/k/v/out_proj) and
                      `<component>.<module>.lora_linear_layer.down.weight`; alpha = rank
                      (`modern_key` rewrites them to the form above).
Each pair is folded into the base weight once, before sampling (no per-step cost):
  W (out, in[, kh, kw]) += scale * alpha / r * up @ down
in PyTorch layout, then put into our layout by the same transform the weight import uses
(`unet_key_fn`, the CLIP key function), so the module names come from one mapping. DynamicID's
own LoRA leaves (`lora_down`/`lora_up` in our tree) are untouched: this changes base kernels.

A key that matches no module is an error listing every such key, unless `skip_unknown`, which
drops them and returns their names (the sampler's sidecar lists them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Callable, Mapping, Optional

import numpy as np
from flax import traverse_util

from dynamicid_jax.input_files import read_json

from . import torch_import
from .clip_weights import clip_key_fn as _clip_key_fn
from .unet import unet_key_fn

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # text_encoder_2: SDXL's bigG
_KOHYA = re.compile(r"^lora_(unet|te|te1|te2)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_KOHYA_COMPONENT = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_PEFT = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight"
                   r"|lora\.up\.weight|alpha)$")
# A PEFT `save_pretrained` folder's adapter_model.safetensors: one model's modules, no component.
_PEFT_FOLDER = re.compile(r"^base_model\.model\.(.+?)\.(lora_A\.weight|lora_B\.weight)$")
# diffusers' older layouts (its training scripts before PEFT, many downloaded SD1.5 LoRAs):
# attention processors `[unet.]<attn>.processor.to_q_lora.down.weight` (UNet; also without
# `unet.`, as `save_attn_procs` wrote them) or `text_encoder.<self_attn>[.processor].to_q_lora...`,
# and patched linears `<component>.<module>.lora_linear_layer.down.weight`.
_OLD_PROCESSOR = re.compile(r"^(?:(unet|text_encoder)\.)?(.+?)(?:\.processor)?"
                            r"\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
_OLD_LINEAR = re.compile(r"^(unet|text_encoder)\.(.+?)\.lora_linear_layer\.(down|up)\.weight$")
_OLD_PROJECTION = {"unet": {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
                   "text_encoder": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}}
_ROLE = {"lora_down.weight": "down", "lora_A.weight": "down", "lora.down.weight": "down",
         "lora_up.weight": "up", "lora_B.weight": "up", "lora.up.weight": "up", "alpha": "alpha"}


class LoraFileError(torch_import.WeightImportError):
    """A LoRA file that does not fit the model (names the file and the keys)."""


@dataclasses.dataclass
class LoraMergeReport:
    """What one file changed: merged module count per component and the keys dropped."""

    path: str
    scale: float
    merged: dict[str, int]
    dropped: list[str]


def _targets(params: Mapping, key_fn: Callable) -> dict[str, tuple[tuple[str, ...], Callable]]:
    """{PyTorch module name: (our kernel path, torch->ours transform)} of every kernel leaf."""
    out = {}
    for path in traverse_util.flatten_dict(params):
        if path[-1] != "kernel":
            continue
        mapped = key_fn(path)
        if mapped is not None and mapped[0].endswith(".weight"):
            out[mapped[0][: -len(".weight")]] = (path, mapped[1])
    return out


def component_targets(unet_params: Optional[Mapping], text_params: Optional[Mapping],
                      text_2_params: Optional[Mapping] = None) -> dict[str, dict]:
    """Module names a LoRA may address, per component ({} for a component not given;
    text_2_params: SDXL's second text encoder)."""
    # CLIP names with transformers' `text_model.` level, as kohya and PEFT files use.
    text = lambda params: _targets(params, _clip_key_fn("text_model.")) if params is not None else {}  # noqa: E731
    return {
        "unet": _targets(unet_params, unet_key_fn) if unet_params is not None else {},
        "text_encoder": text(text_params),
        "text_encoder_2": text(text_2_params),
    }


_LDM_DIRECT = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
               "input_blocks_0_0": "conv_in", "out_0": "conv_norm_out", "out_2": "conv_out",
               "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2"}  # SDXL's
_LDM_RESNET = {"in_layers_0": "norm1", "in_layers_2": "conv1", "emb_layers_1": "time_emb_proj",
               "out_layers_0": "norm2", "out_layers_3": "conv2", "skip_connection": "conv_shortcut"}


def ldm_module_name(name: str, layers_per_block: int) -> Optional[str]:
    """A kohya UNet module in LDM naming (underscored, without `lora_unet_`) -> the same module
    in diffusers naming, underscored (`input_blocks_1_1_proj_in` -> `down_blocks_0_attentions_0_proj_in`);
    None when it is not an LDM name."""
    if name in _LDM_DIRECT:
        return _LDM_DIRECT[name]
    slots = layers_per_block + 1
    resnet = lambda rest: _LDM_RESNET.get(rest)  # noqa: E731
    if m := re.fullmatch(r"input_blocks_(\d+)_([01])_(.+)", name):
        level, slot = divmod(int(m[1]) - 1, slots)
        if slot == layers_per_block:
            return f"down_blocks_{level}_downsamplers_0_conv" if m[3] == "op" else None
        if m[2] == "0":
            return resnet(m[3]) and f"down_blocks_{level}_resnets_{slot}_{resnet(m[3])}"
        return f"down_blocks_{level}_attentions_{slot}_{m[3]}"
    if m := re.fullmatch(r"middle_block_([012])_(.+)", name):
        if m[1] == "1":
            return f"mid_block_attentions_0_{m[2]}"
        return resnet(m[2]) and f"mid_block_resnets_{int(m[1]) // 2}_{resnet(m[2])}"
    if m := re.fullmatch(r"output_blocks_(\d+)_([012])_(.+)", name):
        level, slot = divmod(int(m[1]), slots)
        if m[2] == "0":
            return resnet(m[3]) and f"up_blocks_{level}_resnets_{slot}_{resnet(m[3])}"
        if m[3] == "conv":
            return f"up_blocks_{level}_upsamplers_0_conv"
        return f"up_blocks_{level}_attentions_{slot}_{m[3]}" if m[2] == "1" else None
    return None


def modern_key(key: str) -> str:
    """An older diffusers LoRA key (see `_OLD_PROCESSOR`, `_OLD_LINEAR`) in the PEFT form
    `<component>.<module>.lora_A|B.weight` (`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.
    to_out_lora.up.weight` -> `unet.down_blocks...attn1.to_out.0.lora_B.weight`); other keys unchanged."""
    peft_role = {"down": "lora_A.weight", "up": "lora_B.weight"}
    if match := _OLD_LINEAR.match(key):
        return f"{match[1]}.{match[2]}.{peft_role[match[3]]}"
    if match := _OLD_PROCESSOR.match(key):
        comp = match[1] or "unet"
        return f"{comp}.{match[2]}.{_OLD_PROJECTION[comp][match[3]]}.{peft_role[match[4]]}"
    return key


def _layers_per_block(unet_names) -> int:
    """Resnets per down level of the UNet whose module names these are."""
    return len({n.split(".")[3] for n in unet_names if n.startswith("down_blocks.0.resnets.")})


def parse_lora(state_dict: Mapping[str, np.ndarray], targets: dict[str, dict]):
    """Group a LoRA state dict per target module.

    Returns ({(component, module): {"down", "up"[, "alpha"]}}, [unmatched keys]).
    """
    kohya = {comp: {name.replace(".", "_"): name for name in names} for comp, names in targets.items()}
    layers_per_block = _layers_per_block(targets["unet"])
    pairs: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unknown = []
    for original, value in state_dict.items():
        key = modern_key(original)
        match = _KOHYA.match(key)
        if match:
            comp = _KOHYA_COMPONENT[match.group(1)]
            module = kohya[comp].get(match.group(2))
            if module is None and comp == "unet" and (ldm := ldm_module_name(match.group(2), layers_per_block)):
                module = kohya[comp].get(ldm)
            role = _ROLE[match.group(3)]
        else:
            if match := _PEFT_FOLDER.match(key):
                module, role = match.group(1), _ROLE[match.group(2)]
                comp = "unet" if module in targets["unet"] else "text_encoder"  # the names are disjoint
            else:
                match = _PEFT.match(key)
                comp, module, role = (match.group(1), match.group(2), _ROLE[match.group(3)]) if match else (None,) * 3
            if comp in ("text_encoder", "text_encoder_2") and not module.startswith("text_model."):
                module = "text_model." + module  # transformers 5 saves CLIPTextModel without that level
            if module is not None and module not in targets[comp]:
                module = None
        if module is None:
            unknown.append(original)
            continue
        pairs.setdefault((comp, module), {})[role] = np.asarray(value, np.float32)
    for (comp, module), parts in list(pairs.items()):
        if "down" not in parts or "up" not in parts:
            missing = "up" if "down" in parts else "down"
            raise LoraFileError(f"LoRA for {comp} {module} has no {missing} weight")
    return pairs, sorted(unknown)


def read_adapter_configs(path: str | os.PathLike) -> dict[str, dict]:
    """{component: PEFT LoraConfig dict} a LoRA file carries (see the module docstring); {} if none."""
    path = pathlib.Path(path)
    configs: dict[str, dict] = {}
    if path.suffix == ".safetensors":
        raw = torch_import.safetensors_header(path)[1].get("lora_adapter_metadata")
        if raw:
            try:
                flat = json.loads(raw)
            except json.JSONDecodeError as e:
                raise LoraFileError(f"{path}: unreadable lora_adapter_metadata: {e}") from None
            if not isinstance(flat, dict):
                raise LoraFileError(f"{path}: lora_adapter_metadata is not a JSON object")
            for key, value in flat.items():
                comp, _, field = key.partition(".")
                if comp in COMPONENTS and field:
                    configs.setdefault(comp, {})[field] = value
    beside = path.with_name("adapter_config.json")
    if path.stem == "adapter_model" and beside.is_file():  # a PEFT save_pretrained folder
        config = read_json(beside, "PEFT adapter config")
        if not isinstance(config, dict):
            raise LoraFileError(f"{beside}: not a PEFT adapter config (a JSON object)")
        for comp in COMPONENTS:
            configs.setdefault(comp, config)
    return configs


def peft_alpha(config: Mapping, module: str, rank: int) -> float:
    """The alpha that makes alpha / rank PEFT's scaling of `module` under a LoraConfig dict."""
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha  # rsLoRA: alpha / sqrt(r)


def lora_delta(down: np.ndarray, up: np.ndarray, alpha: Optional[np.ndarray], scale: float) -> np.ndarray:
    """scale * alpha / r * up @ down in PyTorch layout.

    down (r, in) or (r, in, kh, kw); up (out, r) or (out, r, 1, 1). -> (out, in[, kh, kw]).
    """
    rank = down.shape[0]
    factor = scale * (float(alpha) / rank if alpha is not None else 1.0)
    delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    return (factor * delta).reshape((up.shape[0],) + down.shape[1:])


def merge_lora_state_dict(
    params: dict[str, Mapping], state_dict: Mapping[str, np.ndarray], scale: float = 1.0, *,
    skip_unknown: bool = False, name: str = "LoRA", adapter_configs: Optional[Mapping[str, Mapping]] = None,
) -> tuple[dict[str, Mapping], LoraMergeReport]:
    """Fold one LoRA into {"unet": ..., "text_encoder": ...} params (either may be absent).

    adapter_configs: {component: PEFT LoraConfig dict} giving alpha where a module has no
    `.alpha` key (`read_adapter_configs`).

    Returns (new params, report); the input trees are not modified. Raises LoraFileError
    naming every unmatched key (unless skip_unknown) or a shape that does not fit.
    """
    targets = component_targets(params.get("unet"), params.get("text_encoder"), params.get("text_encoder_2"))
    if "text_encoder_2" in params and any(k.startswith("lora_te_") for k in state_dict):
        # CLIP-L's names are SDXL's text_encoder's too: without this, such a file would merge
        raise LoraFileError(f"{name}: an SD1.5 LoRA (lora_te_ keys) on an SDXL base model")
    pairs, unknown = parse_lora(state_dict, targets)
    if unknown and not skip_unknown:
        shown = ", ".join(unknown[:20]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 20 else "")
        sdxl_file = any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in state_dict)
        family = ("an SDXL LoRA (lora_te1_/lora_te2_ or text_encoder_2 keys) on a base model with one text "
                  "encoder (SD1.5): " if sdxl_file and "text_encoder_2" not in params else "")
        raise LoraFileError(f"{name}: {family}{len(unknown)} key(s) match no UNet/text-encoder module: {shown} "
                            "(--lora_skip_unknown drops them)")
    flat = {comp: dict(traverse_util.flatten_dict(params[comp])) for comp in COMPONENTS if comp in params}
    merged = {comp: 0 for comp in flat}
    for (comp, module), parts in sorted(pairs.items()):
        path, transform = targets[comp][module]
        base = np.asarray(flat[comp][path], np.float32)
        alpha = parts.get("alpha")
        if alpha is None and comp in (adapter_configs or {}):
            alpha = peft_alpha(adapter_configs[comp], module, parts["down"].shape[0])
        delta = lora_delta(parts["down"], parts["up"], alpha, scale)
        if delta.ndim == 4 and transform is torch_import.linear_kernel:  # a 1x1 conv pair on a Linear
            delta = delta[:, :, 0, 0] if delta.shape[2:] == (1, 1) else delta
        try:
            delta = transform(delta)
        except (ValueError, IndexError) as e:
            raise LoraFileError(f"{name}: {comp} {module}: LoRA shape {delta.shape} does not fit: {e}") from e
        if delta.shape != base.shape:
            raise LoraFileError(f"{name}: {comp} {module}: LoRA gives {delta.shape}, the weight is {base.shape}")
        flat[comp][path] = base + delta
        merged[comp] += 1
    out = dict(params)
    for comp, leaves in flat.items():
        out[comp] = traverse_util.unflatten_dict(leaves)
    return out, LoraMergeReport(path=name, scale=scale, merged=merged, dropped=unknown if skip_unknown else [])


def merge_lora_file(
    params: dict[str, Mapping], path: str | os.PathLike, scale: float = 1.0, *, skip_unknown: bool = False
) -> tuple[dict[str, Mapping], LoraMergeReport]:
    """`merge_lora_state_dict` of a `.safetensors` (or torch pickle) LoRA file."""
    return merge_lora_state_dict(params, torch_import.read_state_dict(path), scale, skip_unknown=skip_unknown,
                                 name=str(path), adapter_configs=read_adapter_configs(path))


def parse_lora_arg(text: str) -> tuple[str, float]:
    """A command line's `FILE[:SCALE]` -> (file, scale); scale 1 when absent.

    A text that names an existing file is that file (its name may hold a ':'); otherwise what
    follows the last ':' is the scale, and a scale that is not a finite number is a
    LoraFileError saying so (not "file not found" for `FILE:abc`)."""
    path, sep, scale = text.rpartition(":")
    if not sep or os.path.isfile(text):
        return text, 1.0
    try:
        value = float(scale)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise LoraFileError(f"--lora {text}: scale {scale!r} is not a finite number (FILE[:SCALE], e.g. "
                            f"{path}:0.8)")
    return path, value
