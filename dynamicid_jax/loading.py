"""Assemble a ready DynamicIDPipeline from files (real weights, a training run) or the demo.

Four sources of weights, one result:
  demo         a family's tiny model (`demo=True` or "sd15": SD1.5's; "sdxl": SDXL's) with THE
               tiny random weights (`modeling.tiny_random_params`), identity branch included.
  release      SD1.5 + CLIP ViT-H/14 + the authors' SAA.bin/IMR.bin/key_point_encoder.bin.
  base only    a base model (any family, detected from its files) without DynamicID weights:
               the UNet without the identity branch, plain text-to-image (said in the log
               and the sidecar's provenance: "identity_branch": "absent").
  training run a `launch/train.py` workdir, or the one weights file `launch/export.py` made
               of it (`dynamicid/weights_file.py`): its config fixes the architecture; trained
               components from its newest checkpoint (or the file), the rest from the base
               model it started from (the tiny random one for tiny runs, else --base_model /
               --vision_encoder).
Nothing falls back: a missing component is an error naming it.
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from dynamicid_jax import base_models, modeling
from dynamicid_jax.errors import MissingFileError
from dynamicid_jax.pipeline import DynamicIDPipeline
from dynamicid_jax.request import InputError

DEMO_NOTICE = (
    "DEMO MODE: tiny model with RANDOM weights (configs/tiny.py; --demo sdxl: SDXL's). Pictures will be noise-like; "
    "pass --base_model/--vision_encoder/--dynamicid for real pictures."
)
ABSENT_NOTICE = ("identity branch: absent (no --dynamicid weights): plain text-to-image from the base model; "
                 "--ref needs DynamicID weights")
TINY_NOTICE = "NOTE: this training run started from the TINY RANDOM base model: pictures will be noise-like."
# Components a training run may lack (stage 1 has no IMR): never filled with random weights.
EDIT_COMPONENTS = ("imr", "keypoint_encoder")


def training_run_config(dynamicid: Optional[str]):
    """The config.json of a training workdir named by `dynamicid` (or the config a weights file
    of one carries), or None for anything else."""
    if not dynamicid:
        return None
    from dynamicid_jax.dynamicid import weights_file
    from dynamicid_jax.dynamicid.published_weights import find_release_file

    path = pathlib.Path(dynamicid)
    if weights_file.is_weights_file(path):
        return weights_file.read_config(path)
    if find_release_file(path, "SAA") is not None or not path.exists():
        return None
    from dynamicid_jax.training.checkpoints import find_workdir

    try:
        workdir = find_workdir(path)
    except (FileNotFoundError, ValueError) as e:
        raise MissingFileError(f"--dynamicid {path}: neither a release folder (SAA.bin) nor a training run: {e}")
    return ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))


def run_base(run) -> tuple[bool, str]:
    """(started from the tiny random base?, base model path) of a training run; a stage-2 run
    inherits both from the stage-1 run it started from."""
    if run.init.random or run.init.base_model:
        return bool(run.init.random), run.init.base_model
    stage1 = training_run_config(run.init.stage1) if run.init.get("stage1") else None
    return run_base(stage1) if stage1 is not None else (False, "")


def sampling_config(demo: bool, dynamicid: Optional[str], base_model: Optional[str] = None,
                    vae: Optional[str] = None):
    """Config with `model` and `sampling` sections for this source of weights: a training run's
    own model section; else the family's defaults (`base_models.default_config`), the sections
    a base model's files define read from them (`model_from_files`); with `vae` (--vae) the
    VAE section that folder's config.json says (its own scaling factor)."""
    return _with_vae(_sampling_config(demo, training_run_config(dynamicid), base_model), demo, vae)


def embedding_widths(model: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The widths a textual-inversion file must hold (`family.embedding_widths`) from a
    config's model section, before any weight loads (the modules alone: no parameters)."""
    modules = modeling.build_modules(model, identity_branch=False)
    return modules.family.embedding_widths(modules)


def _with_vae(config, demo: bool, vae: Optional[str]):
    if vae:
        if demo:
            raise InputError("--demo uses random weights: drop --vae")
        config.model.vae = vae_folder_section(vae)
    return config


def vae_folder_section(folder: str) -> dict:
    """The `model.vae` section of a separate VAE folder (--vae: a diffusers AutoencoderKL
    folder, config.json + diffusion_pytorch_model.safetensors, e.g. the SDXL fp16-fix VAE):
    its architecture and scaling_factor. InputError naming the folder when it is no VAE."""
    from dynamicid_jax.base_models.sd15 import config_fields
    from dynamicid_jax.input_files import FileFormatError, read_json
    from dynamicid_jax.models.vae import VAEConfig

    config_file = pathlib.Path(folder) / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"--vae {folder}: no config.json (expected a diffusers AutoencoderKL folder)")
    try:
        data = read_json(config_file, "VAE config")
    except FileFormatError as e:
        raise InputError(f"--vae {folder}: {e}") from None
    kind = data.get("_class_name") if isinstance(data, dict) else None
    if kind != "AutoencoderKL":
        raise InputError(f"--vae {folder}: config.json describes {kind or 'no diffusers model'}, not an AutoencoderKL VAE")
    try:
        return config_fields(VAEConfig.from_diffusers(data))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"--vae {folder}: {e}") from None


def _sampling_config(demo: bool, run, base_model: Optional[str] = None):
    if run is not None:
        config = base_models.default_config(tiny=run_base(run)[0], family=base_models.of(run.model).name)
        config.model = run.model
        return config
    if base_model and not demo:
        config = base_models.default_config(family=base_models.detect(base_model))
        config.model = base_models.get(config.model.family).model_from_files(config.model, base_model)
        # diffusers' default size: the UNet's sample_size x the VAE factor, as the files say
        config.sampling.height = config.sampling.width = base_models.native_resolution(config.model)
        return config
    return base_models.default_config(tiny=bool(demo), family=demo_family(demo) or "sd15")


def demo_family(demo) -> Optional[str]:
    """The family of the tiny random demo model `demo` asks for: None (no demo), True (SD1.5's)
    or a family name (`--demo sdxl`)."""
    if not demo:
        return None
    if demo is True:
        return "sd15"
    try:
        return base_models.get(demo).name
    except ValueError as e:
        raise InputError(f"--demo {demo}: {e}") from None


def identity_branch(demo: bool, dynamicid: Optional[str]) -> bool:
    """Whether this source of weights has DynamicID's identity branch (SAA + LoRA, face
    projection): the demo and any --dynamicid do; a base model alone does not."""
    return bool(demo or dynamicid)


def _expressions(path: Optional[str]):
    from dynamicid_jax.faces.expression import default_model_path, load_expression_classifier

    target = pathlib.Path(path) if path else default_model_path()
    if path is None and not target.is_file():
        return None  # only needed for automatic source prompts; the sampler names it if asked
    return load_expression_classifier(target)


def load_pipeline(
    *,
    demo: bool | str = False,
    base_model: Optional[str] = None,
    vision_encoder: Optional[str] = None,
    dynamicid: Optional[str] = None,
    faces: str = "default",
    expression_model: Optional[str] = None,
    dtype: str = "float32",
    vae_dtype: str = "float32",
    log: Callable[[str], None] = lambda m: None,
    loras: Sequence[tuple[str, float]] = (),
    lora_skip_unknown: bool = False,
    vae: Optional[str] = None,
    tokenizer_folder: Optional[str] = None,
):
    """-> (config, DynamicIDPipeline). See the module docstring for the four sources.

    loras: style LoRA files (kohya or diffusers/PEFT) with their scales, merged in order into
    the base UNet and text encoder (`models.lora_files`); the provenance lists each file and,
    with lora_skip_unknown, the keys dropped from it. vae: a separate VAE folder replacing the
    base model's (architecture, scaling factor and weights; `vae_folder_section`). tokenizer_folder:
    the folder of the family's tokenizer(s) when the base model has none (a single file).
    """
    from dynamicid_jax.faces import load_face_analyzer

    compute_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    # The VAE stays float32 under a bfloat16 model unless asked: its decoder's activations
    # span a range where bfloat16's 8-bit mantissa shows as banding (and fp16 VAEs overflow).
    decode_dtype = jnp.bfloat16 if vae_dtype == "bfloat16" else jnp.float32
    run = training_run_config(dynamicid)
    config = _with_vae(_sampling_config(demo, run, base_model), demo, vae)
    with_identity = identity_branch(demo, dynamicid)
    modules = modeling.build_modules(config.model, dtype=compute_dtype, vae_dtype=decode_dtype,
                                     identity_branch=with_identity)
    if run is None and dynamicid and not demo and not modules.family.release_weights:
        raise InputError(f"--dynamicid {dynamicid}: the authors' DynamicID weights are for SD1.5, the base model "
                         f"{base_model} is {modules.family.name} (drop --dynamicid for plain text-to-image)")
    analyzer = load_face_analyzer(faces) if with_identity else None
    expressions = _expressions(expression_model) if with_identity else None
    if not with_identity:
        if not base_model:
            raise InputError("missing --base_model (or use --demo for a tiny random model)")
        log(f"loading weights: base {base_model} ({modules.family.name})")
        log(ABSENT_NOTICE)
        params = modeling.load_base_model(modules, base_model)
        tokenizer = modules.family.load_tokenizer(base_model, tokenizer_folder)
        provenance = {"base_model": str(base_model), "family": modules.family.name, "identity_branch": "absent"}
    elif demo:
        if base_model or vision_encoder or dynamicid or tokenizer_folder:
            raise InputError("--demo uses random weights: drop --base_model/--vision_encoder/--dynamicid/--tokenizer")
        log(DEMO_NOTICE)
        params = modeling.tiny_random_params(modules, seed=0)
        tokenizer = modules.family.tiny_tokenizer()
        provenance = {"weights": f"tiny random (base_models.{modules.family.name}.tiny_model_config, seed 0, "
                                 f"{modeling.TINY_PRNG_IMPL} PRNG)"}
    elif run is not None and run_base(run)[0]:
        log(TINY_NOTICE)
        params = _without_edit_components(modeling.tiny_random_params(modules, seed=0))
        params.update(_trained(dynamicid, modules, params["unet"]))
        tokenizer = modules.family.tiny_tokenizer()
        provenance = {"weights": f"training run {dynamicid} on the tiny random base model"}
    else:
        base_model = base_model or (run_base(run)[1] if run is not None else None)
        missing = [n for n, v in (("--base_model", base_model), ("--vision_encoder", vision_encoder),
                                  ("--dynamicid", dynamicid)) if not v]
        if missing:
            raise InputError(f"missing {', '.join(missing)} (or use --demo for a tiny random model)")
        log(f"loading weights: base {base_model}, vision {vision_encoder}, DynamicID {dynamicid}")
        if run is None:
            params = modeling.load_pretrained(modules, base_model=base_model, vision_encoder=vision_encoder,
                                              dynamicid=pathlib.Path(dynamicid))
        else:
            params = modeling.load_pretrained(modules, base_model=base_model, vision_encoder=vision_encoder)
            params.update(_trained(dynamicid, modules, params["unet"]))
        tokenizer = modules.family.load_tokenizer(base_model, tokenizer_folder)
        provenance = {"base_model": str(base_model), "vision_encoder": str(vision_encoder), "dynamicid": str(dynamicid)}
    # As the base-only branch says "absent", every sidecar names the family and the branch
    # (pictures made before these keys are refused on a rerun into the same --out, naming them).
    if with_identity:
        provenance.update(family=modules.family.name, identity_branch="present")
    if analyzer is not None:
        provenance["faces"] = analyzer.name
    if tokenizer_folder:
        provenance["tokenizer"] = str(tokenizer_folder)
    if vae:
        from dynamicid_jax.models import load_vae

        log(f"VAE: {vae}")
        _, params["vae"] = load_vae(vae)
        provenance["vae"] = str(vae)
    if loras:
        params, provenance["loras"] = merge_style_loras(params, loras, lora_skip_unknown, log)
    # Inference only: half the memory and weight traffic, same compute.
    cast = lambda tree, to: jax.tree.map(  # noqa: E731
        lambda a: a.astype(to) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != to else a, tree)
    params = {name: cast(tree, decode_dtype if name == "vae" else compute_dtype) for name, tree in params.items()}
    params = jax.device_put(params)
    pipeline = DynamicIDPipeline(modules, params, tokenizer, analyzer, expressions, provenance)
    return config, pipeline


def merge_style_loras(params: dict, loras: Sequence[tuple[str, float]], skip_unknown: bool = False,
                      log: Callable[[str], None] = lambda m: None) -> tuple[dict, list[dict]]:
    """Fold each (file, scale) into params' "unet"/"text_encoder"(/"text_encoder_2"); -> (params, one record per file)."""
    import dataclasses

    from dynamicid_jax.models.lora_files import merge_lora_file

    records = []
    for path, scale in loras:
        params, report = merge_lora_file(params, path, scale, skip_unknown=skip_unknown)
        text = sum(n for comp, n in report.merged.items() if comp != "unet")  # SDXL: both text encoders
        log(f"LoRA {path} x{scale}: merged {report.merged['unet']} UNet and {text} "
            f"text-encoder modules" + (f", dropped {len(report.dropped)} unknown keys" if report.dropped else ""))
        records.append(dataclasses.asdict(report))
    return params, records


def _without_edit_components(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in EDIT_COMPONENTS}


def _trained(dynamicid: str, modules, base_unet) -> dict:
    """Trained components of a workdir or its weights file; the IMR pair only when the run
    trained it. base_unet: the UNet tree whose base leaves a weights file's LoRA joins."""
    from dynamicid_jax.dynamicid import weights_file
    from dynamicid_jax.training.checkpoints import load_trained_params

    if weights_file.is_weights_file(dynamicid):
        return weights_file.load(dynamicid, modules, base_unet)
    return load_trained_params(dynamicid, modules)
