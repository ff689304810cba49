"""Assemble a ready DynamicIDPipeline from files (real weights) or from the tiny demo config.

Real weights never fall back to anything: a missing component is an error naming it.
The demo path uses `configs/tiny.py` with random parameters and says so.
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from dynamicid_jax import modeling, schedulers
from dynamicid_jax.sampling import DynamicIDPipeline, InputError

DEMO_NOTICE = (
    "DEMO MODE: tiny model with RANDOM weights (configs/tiny.py). Pictures will be noise-like; "
    "pass --base_model/--vision_encoder/--dynamicid for real pictures."
)


def load_config(name: str):
    """configs/<name>.py's get_config(); configs/ sits beside the package in the repo."""
    import importlib
    import sys

    root = str(pathlib.Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"configs.{name}").get_config()


def _expressions(path: Optional[str], required: bool):
    from dynamicid_jax.faces.expression import default_model_path, load_expression_classifier

    target = pathlib.Path(path) if path else default_model_path()
    if not target.is_file() and not required:
        return None  # only needed for automatic source prompts; the sampler names it if asked
    return load_expression_classifier(target)


def load_pipeline(
    *,
    demo: bool = False,
    base_model: Optional[str] = None,
    vision_encoder: Optional[str] = None,
    dynamicid: Optional[str] = None,
    faces: str = "default",
    expression_model: Optional[str] = None,
    dtype: str = "float32",
    log: Callable[[str], None] = lambda m: None,
):
    """-> (config, DynamicIDPipeline). demo=True: tiny random model; else real weights."""
    from dynamicid_jax.faces import load_face_analyzer
    from dynamicid_jax.tokenizer import CLIPTokenizer

    compute_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    analyzer = load_face_analyzer(faces)
    expressions = _expressions(expression_model, required=expression_model is not None)
    if demo:
        if base_model or vision_encoder or dynamicid:
            raise InputError("--demo uses random weights: drop --base_model/--vision_encoder/--dynamicid")
        log(DEMO_NOTICE)
        config = load_config("tiny")
        modules = modeling.build_modules(config.model, dtype=compute_dtype)
        params = modeling.init_random_params(modules, jax.random.PRNGKey(0))
        from dynamicid_jax.tokenizer import write_tiny_vocab

        vocab = write_tiny_vocab(pathlib.Path(tempfile.gettempdir()) / "dynamicid_jax_tiny_vocab")
        tokenizer = CLIPTokenizer.from_folder(vocab)
        provenance = {"weights": "tiny random (configs/tiny.py, PRNGKey(0))", "faces": analyzer.name}
        scheduler = schedulers.SchedulerConfig()
    else:
        missing = [n for n, v in (("--base_model", base_model), ("--vision_encoder", vision_encoder),
                                  ("--dynamicid", dynamicid)) if not v]
        if missing:
            raise InputError(f"missing {', '.join(missing)} (or use --demo for a tiny random model)")
        config = load_config("base")
        modules = modeling.build_modules(config.model, dtype=compute_dtype)
        log(f"loading weights: base {base_model}, vision {vision_encoder}, DynamicID {dynamicid}")
        params = _load_dynamicid(modules, base_model, vision_encoder, dynamicid)
        tokenizer = CLIPTokenizer.from_folder(_tokenizer_folder(base_model))
        scheduler_folder = pathlib.Path(base_model) / "scheduler"
        scheduler = (
            schedulers.SchedulerConfig.from_folder(scheduler_folder)
            if scheduler_folder.is_dir() else schedulers.SchedulerConfig()
        )
        provenance = {"base_model": str(base_model), "vision_encoder": str(vision_encoder),
                      "dynamicid": str(dynamicid), "faces": analyzer.name}
    params = jax.device_put(params)
    pipeline = DynamicIDPipeline(modules, params, tokenizer, analyzer, scheduler, expressions, provenance)
    return config, pipeline


def _load_dynamicid(modules, base_model: str, vision_encoder: str, dynamicid: str):
    """Published release folder, or a training workdir/checkpoint of our trainer."""
    path = pathlib.Path(dynamicid)
    if not path.exists():
        raise FileNotFoundError(f"--dynamicid {path} does not exist")
    if (path / "SAA.bin").is_file() or (path / "SAA.safetensors").is_file():
        return modeling.load_pretrained(modules, base_model=base_model, vision_encoder=vision_encoder, dynamicid=path)
    from dynamicid_jax.training import load_trained_params  # a workdir of launch/train.py

    base = modeling.load_pretrained(modules, base_model=base_model, vision_encoder=vision_encoder, dynamicid=None)
    return load_trained_params(path, modules, base)


def _tokenizer_folder(base_model: str) -> pathlib.Path:
    path = pathlib.Path(base_model)
    for candidate in (path / "tokenizer", path):
        if (candidate / "vocab.json").is_file() and (candidate / "merges.txt").is_file():
            return candidate
    raise FileNotFoundError(
        f"no CLIP tokenizer (vocab.json + merges.txt) in {path}/tokenizer: a single-file checkpoint carries "
        "none; convert it with launch/convert.py or pass a pipeline folder"
    )
