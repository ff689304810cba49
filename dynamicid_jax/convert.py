"""Import PyTorch weights once and write them as Flax params with orbax, so later runs are fast.

    python -m dynamicid_jax.convert --base_model PATH --out DIR
        [--components unet,vae,text_encoder] [--vision_encoder PATH] [--dynamicid PATH]

--base_model: a diffusers SD1.5 pipeline folder or a single-file checkpoint.
Output layout:

    DIR/dynamicid_converted.json   {"format": 1, "components": {name: {"config": {...}}}}
    DIR/<component>/               orbax checkpoint of that component's params (float32)
    DIR/dynamicid/{SAA,IMR,key_point_encoder}.safetensors   the authors' weights, torch-free

The DynamicID files keep their flat PyTorch key layout (as .safetensors, readable without
torch): their import needs the model configs (configs/base.py), which live with the run,
so `modeling.load_pretrained(dynamicid=DIR/dynamicid)` imports them strictly at load time.

Every loader (`load_unet`, `load_vae`, `load_text_encoder`, ...) accepts DIR and then reads
its component from here without torch. A component asked for whose importer is missing or
whose weights do not match is an error; nothing is skipped silently.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
from typing import Callable, Optional, Sequence

import numpy as np

from dynamicid_jax import base_models
from dynamicid_jax.dynamicid import published_weights as pw
from dynamicid_jax.errors import ConfigError, MissingFileError
# The folder format (models/converted.py) lives below the loaders that read it.
from dynamicid_jax.models.converted import save_component
from dynamicid_jax.models.torch_import import read_state_dict

# component -> (module, loader function name). Loaders take (path) and return (module, params)
# with the module's static settings in `module.config` (a dataclass).
LOADERS: dict[str, tuple[str, str]] = {
    "unet": ("dynamicid_jax.models.unet", "load_unet"),
    "vae": ("dynamicid_jax.models.vae", "load_vae"),
    "text_encoder": ("dynamicid_jax.models.clip_weights", "load_text_encoder"),
    "vision_encoder": ("dynamicid_jax.models.clip_weights", "load_vision_encoder"),
}
BASE_MODEL_COMPONENTS = ("unet", "vae", "text_encoder")


def _loader(component: str) -> Callable:
    module_name, fn_name = LOADERS[component]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise ImportError(f"cannot convert {component!r}: {module_name} is not available") from e
    return getattr(module, fn_name)


def convert(
    base_model: Optional[str | os.PathLike],
    out: str | os.PathLike,
    components: Sequence[str] = BASE_MODEL_COMPONENTS,
    vision_encoder: Optional[str | os.PathLike] = None,
    dynamicid: Optional[str | os.PathLike] = None,
) -> list[str]:
    """Import each requested component and write it under `out`. Returns the names written."""
    sources: dict[str, os.PathLike | str] = {}
    for component in components:
        if component not in BASE_MODEL_COMPONENTS:
            raise ConfigError(f"base-model components are {BASE_MODEL_COMPONENTS}, got {component!r}")
        if base_model is None:
            raise ConfigError(f"converting {component!r} needs --base_model")
        sources[component] = base_model
    if vision_encoder is not None:
        sources["vision_encoder"] = vision_encoder
    if not sources and dynamicid is None:
        raise ConfigError("nothing to convert: give --base_model, --vision_encoder or --dynamicid")
    # Refused before any conversion, so a bad --out leaves nothing half-written.
    taken = [name for name in [*sources, *(["dynamicid"] if dynamicid is not None else [])]
             if (pathlib.Path(out) / name).exists()]
    if taken:
        raise ConfigError(f"--out {out}: {', '.join(taken)} exist(s) already; choose an empty --out folder")
    written = []
    for component, source in sources.items():
        # A single file carries no config: its family's (None for folders and SDXL's shapes).
        config = base_models.single_file_config(source, component) if component in BASE_MODEL_COMPONENTS else None
        module, params = _loader(component)(source, **({"config": config} if config is not None else {}))
        config = getattr(module, "config", None)
        if not dataclasses.is_dataclass(config):
            raise TypeError(f"{component}: loader's module has no dataclass `.config` to record")
        save_component(out, component, config, params)
        written.append(component)
        print(f"wrote {component} -> {pathlib.Path(out) / component}")
    if dynamicid is not None:
        for path in convert_dynamicid_weights(dynamicid, pathlib.Path(out) / "dynamicid"):
            print(f"wrote {path}")
        written.append("dynamicid")
    return written


DYNAMICID_FILES = pw.RELEASE_STEMS


def convert_dynamicid_weights(folder: str | os.PathLike, out: str | os.PathLike) -> list[pathlib.Path]:
    """Re-save the authors' SAA.bin (required), IMR.bin and key_point_encoder.bin (when present)
    as flat-keyed .safetensors under `out`. Returns the files written."""
    from safetensors.numpy import save_file

    folder, out = pathlib.Path(folder), pathlib.Path(out)
    found = {stem: pw.find_release_file(folder, stem) for stem in DYNAMICID_FILES}
    if found["SAA"] is None:
        raise MissingFileError(f"--dynamicid {folder}: SAA.bin (or SAA.safetensors) not found")
    if (found["IMR"] is None) != (found["key_point_encoder"] is None):
        raise MissingFileError(f"--dynamicid {folder}: IMR and key_point_encoder come together; found only one")
    out.mkdir(parents=True, exist_ok=False)
    written = []
    for stem, source in found.items():
        if source is not None:
            state_dict = {k: np.ascontiguousarray(v) for k, v in read_state_dict(source).items()}
            save_file(state_dict, str(out / f"{stem}.safetensors"))
            written.append(out / f"{stem}.safetensors")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI: 0 on success, 2 (one stderr line) on a user error."""
    from dynamicid_jax import cli

    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--base_model", help="diffusers SD1.5 pipeline folder or single-file checkpoint")
    parser.add_argument("--out", required=True, help="output folder (new or empty)")
    parser.add_argument("--components", default=",".join(BASE_MODEL_COMPONENTS),
                        help="comma-separated base-model components to convert")
    parser.add_argument("--vision_encoder", help="CLIP ViT-H/14 image encoder folder (transformers)")
    parser.add_argument("--dynamicid", help="folder with the authors' SAA.bin [IMR.bin, key_point_encoder.bin]")
    args = parser.parse_args(argv)
    cli.quiet_logs(args.verbose)
    components = [c for c in args.components.split(",") if c] if args.base_model else []

    def run():
        cli.check_output_folder(args.out, "--out")
        convert(args.base_model, args.out, components, args.vision_encoder, args.dynamicid)

    return cli.run_main(run)


if __name__ == "__main__":
    raise SystemExit(main())
