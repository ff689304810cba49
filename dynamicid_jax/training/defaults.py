"""The training fields both stages share (configs/anchor.py and configs/reconfig.py add
their own): the model, the run's length and seed, initialisation, data, mesh, sharding,
optimizer, checkpoints and logging. Owned by the library so that configs import it (never
the reverse) and a config file needs nothing on sys.path but the installed package.
"""

import ml_collections

from dynamicid_jax import base_models


# The `:ARG` of a stage config -> (tiny model, base-model family).
CONFIG_ARGS = {"": (False, "sd15"), "tiny": (True, "sd15"), "sdxl": (False, "sdxl"), "tiny_sdxl": (True, "sdxl")}


def parse_arg(arg) -> tuple[bool, str]:
    """A stage config's argument -> (small, family): "" (SD1.5), "tiny", "sdxl", "tiny_sdxl"."""
    return _config_arg(arg)


def _config_arg(arg) -> tuple:
    if (arg or "") not in CONFIG_ARGS:
        raise ValueError(f"config argument must be empty or one of {', '.join(repr(a) for a in CONFIG_ARGS if a)}, "
                         f"got {arg!r}")
    return CONFIG_ARGS[arg or ""]


def common_config(arg) -> ml_collections.ConfigDict:
    """Fields shared by both stages; `arg`: "" (SD1.5), "tiny" (the tiny model and a short
    run), "sdxl" (SDXL base 1.0 at 1024 px, bfloat16 compute, remat) or "tiny_sdxl" (the
    tiny SDXL: tests and the tiny run)."""
    small, family = _config_arg(arg)
    members = base_models.get(family)
    config = ml_collections.ConfigDict()
    config.model = base_models.default_config(tiny=small, family=family).model
    config.seed = 0  # parameter init of new modules, data order and every per-step draw
    config.total_steps = 20 if small else 100_000
    # compute dtype: "float32" or "bfloat16" (parameters and optimizer state stay float32)
    # (the family's full-size setting; tiny runs compute in float32)
    config.dtype = "float32" if small else members.training_dtype
    # Rematerialise each UNet transformer block in the backward pass: activation memory for
    # recomputation (the family's full-size setting; SDXL at 1024 px: benchmarks/sdxl_train_memory.md).
    config.remat = members.training_remat and not small

    config.init = ml_collections.ConfigDict()
    config.init.random = small  # random base model: tiny configs only (nothing pretrained to load)
    config.init.base_model = ""  # the family's pipeline folder / single file / converted folder
    config.init.stage1 = ""  # reconfig: a stage-1 workdir or a folder with the release's SAA.bin
    # reconfig: tokenizer folder ("" = <base_model>/tokenizer, or the tiny vocabulary on the tiny random base)
    config.init.tokenizer = ""

    config.data = ml_collections.ConfigDict()
    config.data.global_batch_size = 8 if small else 16  # examples per optimizer update, all hosts
    # Pixel side the shards were made at: the model's native size (tiny 64, SD1.5 512, SDXL
    # 1024), which is also the precompute job's default.
    config.data.resolution = base_models.native_resolution(config.model)
    # Aspect-ratio buckets the shards were made with ("WxH,WxH,...", precompute --buckets;
    # each batch holds one, the step compiles once per bucket); "" = one square bucket at
    # data.resolution. Must equal the manifest's set (checked at start).
    config.data.buckets = ""
    config.data.num_threads = 2  # grain read threads per host
    config.data.prefetch = 2  # batches read ahead per host
    # A corrupt record (CRC) stops the run naming file and offset; True skips and counts them
    # instead (logged once each, written to DIR/summary.json) for long runs on huge datasets.
    config.data.skip_corrupt_records = False
    config.data.expected_models = ml_collections.ConfigDict()  # key -> value the manifest's "models" must hold

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = 1  # pure data-parallel axis
    config.mesh.fsdp = -1  # data parallel + parameters split; -1 = the remaining devices
    config.sharding = ml_collections.ConfigDict()
    config.sharding.min_size = 2**10 if small else 2**16  # smaller tensors are replicated

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.lr = 1e-3 if small else 1e-4  # release code 1e-4; the paper says 1e-5
    config.optimizer.warmup_steps = 2 if small else 500  # linear warmup from 0
    config.optimizer.schedule = "constant"  # after warmup: "constant" or "cosine" (to 0 at total_steps)
    config.optimizer.weight_decay = 1e-2
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.grad_clip = 1.0  # global-norm clip, applied once per update; 0 = off
    config.optimizer.accumulation_steps = 1  # micro-batches per update (scan inside the step)

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 5 if small else 1000
    config.checkpoint.keep = 2 if small else 3
    config.checkpoint.async_save = True

    config.log_every_steps = 1 if small else 50
    config.nonfinite = "stop"  # a NaN/Inf loss or gradient: "stop" the run or "skip" the update
    config.progress_bar = True
    return config
