"""One DynamicID weights file: a training run's own parameters in the release's key layout,
generalised to every base-model family (SD1.5, SDXL), with the run's model config beside them.

    python launch/export.py --dynamicid RUN_WORKDIR --out dynamicid_sdxl.safetensors
    python launch/sample.py --dynamicid dynamicid_sdxl.safetensors --base_model sdxl/ ...

A .safetensors file (float32, read without torch) whose keys are the release's three files
under their stems, the key layout of each unchanged:

    proj_module.*          face projection                  (SAA.bin's proj_module)
    SAA_module.N.*         attention processor N            (SAA.bin's SAA_module)
    IMR.*                  IMR                               (IMR.bin; stage-2 runs only)
    key_point_encoder.*    KeyPointEncoder, BatchNorm statistics included
                                                             (key_point_encoder.bin; stage-2 runs only)

Processor N is the N-th attention of the UNet in diffusers' `attn_processors` order
(published_weights.attention_processor_paths): SD1.5's 32 as in the release; SDXL's 140 (70
transformer blocks, attn1 then attn2 each: down blocks, up blocks, mid block). Every
processor has `N.to_{q,k,v,out}_lora.{down,up}.weight`; an attn2 with SAA also
`N.to_{k,v}_ip.weight` (all of them unless the run's `model.saa_blocks` left some out).

Metadata (safetensors' string map): "format" = FORMAT, "family", and "config": the run's
config.json with its base model resolved (init.random / init.base_model as the run started;
a stage-2 run's stage-1 link dropped), so sampling builds exactly the run's architecture
and takes the base weights from where the run did. The base UNet, VAE, text encoders and
vision tower are never in the file: they come from the base model.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional

import ml_collections
import numpy as np

from dynamicid_jax.dynamicid import published_weights as pw
from dynamicid_jax.errors import ConfigError
from dynamicid_jax.models.torch_import import (
    WeightImportError,
    export_state_dict,
    read_safetensors,
    safetensors_header,
)

FORMAT = "dynamicid-weights/1"
PROJ, SAA, IMR, KPE = "proj_module.", "SAA_module.", "IMR.", "key_point_encoder."


def is_weights_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a file this module wrote (a .safetensors whose metadata names FORMAT)."""
    path = pathlib.Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    return safetensors_header(path)[1].get("format") == FORMAT


def read_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """The run config stored in a weights file (WeightImportError when it is not one)."""
    metadata = safetensors_header(path)[1]
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise WeightImportError(f"{path}: not a DynamicID weights file (metadata format {metadata.get('format')!r}, "
                                f"expected {FORMAT!r})")
    return ml_collections.ConfigDict(json.loads(metadata["config"]))


def export_state(params, modules) -> dict[str, np.ndarray]:
    """params {"unet" (the SAA UNet), "face_projection"[, "imr", "keypoint_encoder"]} -> the
    file's flat state dict (the inverse of each strict release importer)."""
    proj = modules.face_projection
    state = {PROJ + k: v for k, v in export_state_dict(
        params["face_projection"], pw.face_projection_key_fn(proj.num_heads * proj.head_dim)).items()}
    state.update({SAA + k: v for k, v in pw.export_saa_module(params["unet"]).items()})
    if "imr" in params:
        imr_fn = pw.imr_key_fn(modules.imr.num_heads * modules.imr.head_dim)
        state.update({IMR + k: v for k, v in export_state_dict(params["imr"], imr_fn).items()})
    if "keypoint_encoder" in params:
        state.update({KPE + k: v for k, v in export_state_dict(params["keypoint_encoder"],
                                                                pw.keypoint_encoder_key_fn).items()})
    return state


def write(path: str | os.PathLike, params, modules, run_config: ml_collections.ConfigDict) -> pathlib.Path:
    """Write the weights file of a run's params (see `export_state`) atomically; returns its path."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"--out {path}: a DynamicID weights file is a .safetensors file")
    state = {k: np.ascontiguousarray(v, np.float32) for k, v in export_state(params, modules).items()}
    metadata = {"format": FORMAT, "family": modules.family.name, "config": run_config.to_json(sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial), metadata=metadata)
    os.replace(partial, path)
    return path


def load(path: str | os.PathLike, modules, base_unet, shapes: Optional[dict] = None) -> dict:
    """A weights file -> {"unet", "face_projection"[, "imr", "keypoint_encoder"]} for `modules`
    (built from the file's config), strictly: every key used, every leaf filled, shapes equal.
    base_unet: an UNet tree whose base leaves (LoRA and identity projections ignored) fill
    the UNet's; shapes: `modeling.abstract_params(modules)` when the caller has it."""
    from dynamicid_jax import modeling

    shapes = shapes or modeling.abstract_params(modules)
    state = read_safetensors(path)
    unknown = sorted(k for k in state if not k.startswith((PROJ, SAA, IMR, KPE)))
    if unknown:
        raise WeightImportError(f"{path}: keys outside proj_module/SAA_module/IMR/key_point_encoder: {unknown[:10]}")
    part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    params = {
        "unet": pw.merge_dynamicid_unet_params(pw.base_unet_params(base_unet), part(SAA),
                                               abstract_params=shapes["unet"]),
        "face_projection": pw.load_face_projection_params(part(PROJ), modules.face_projection),
    }
    has_imr, has_kpe = bool(part(IMR)), bool(part(KPE))
    if has_imr != has_kpe:
        raise WeightImportError(f"{path}: holds {'IMR' if has_imr else 'key_point_encoder'} without the other")
    if has_imr:
        params["imr"] = pw.load_imr_params(part(IMR), modules.imr)
        params["keypoint_encoder"] = pw.load_keypoint_encoder_variables(part(KPE), modules.keypoint_encoder)
    return params
