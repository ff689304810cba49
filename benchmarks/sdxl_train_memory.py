"""Per-device memory of the SDXL anchor step, from XLA's analysis of the compiled program.

    python benchmarks/sdxl_train_memory.py                         # 1024 px, batch 1/device, remat on and off
    python benchmarks/sdxl_train_memory.py --remat on --batch 2    # one case
    python benchmarks/sdxl_train_memory.py --resolution 512        # the smaller proxy
    python benchmarks/sdxl_train_memory.py --accounting            # parameters and state only, seconds
    python benchmarks/sdxl_train_memory.py --gpu_target h100       # compiled for 8 H100s, no GPU needed

`--gpu_target NAME` compiles for a compile-only CUDA topology of 8 GPUs described by
`benchmarks/gpu_targets/NAME.pbtxt` (XLA's GpuTargetConfig: the device's limits and memory,
the CUDA and cuDNN versions), without a GPU: jax's deviceless ahead-of-time compilation. It
needs the CUDA plugin in the interpreter that runs this script (`pip install
"jax-cuda12-plugin[with-cuda]"` of the installed jax's version; its own venv is enough). The
XLA:CPU figures do not show what remat saves: remat on and off compiled to the same peak
there (benchmarks/sdxl_train_memory.md has the figures and the likely reason).

Nothing is allocated: the parameters are `jax.eval_shape` shapes (`modeling.abstract_params`),
the batch is ShapeDtypeStructs of the shard format, and the step is the trainer's own
(`trainer.lower_step`: the configs/anchor.py:sdxl step, bfloat16 compute, parameters and
AdamW state float32, fsdp-split above `sharding.min_size`), lowered and compiled ahead of
time for a (data 1, fsdp 8) mesh of fake CPU devices or of `--gpu_target` GPUs. Each case runs
in its own process (`XLA_FLAGS=--xla_force_host_platform_device_count=8` must be set before
jax starts, and a case's compile memory is returned to the system when it ends).

Per case: lowering and compile seconds, the process's peak RSS, and per device
(`compiled.memory_analysis()`): arguments (parameters, optimizer state, batch), outputs,
temporaries (activations, gathered parameters, gradients) and aliased bytes (the donated
state); the peak estimate is arguments + outputs + temporaries - aliased. It is the buffer
assignment of the compiler that ran (the GPU's, or the CPU backend's, which fuses and schedules
differently), not a measured run: allocator fragmentation and library workspaces come on
top. One JSON line per case on stdout;
`benchmarks/sdxl_train_memory.md` holds the measured table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 2**30


def sdxl_config(layers):
    """configs/anchor.py:sdxl; `layers` (an int) replaces transformer_layers_per_block (1, 2, 10)
    for a proxy with fewer transformer blocks (the same widths, resolutions and resnets)."""
    from configs import anchor

    config = anchor.get_config("sdxl")
    if layers is not None:
        config.model.unet.transformer_layers_per_block = (layers,) * len(config.model.unet.block_out_channels)
    return config


def target_devices(devices: int, gpu_target):
    """`devices` fake CPU devices, or a compile-only CUDA topology of `devices` GPUs described
    by benchmarks/gpu_targets/<gpu_target>.pbtxt (one host)."""
    import jax

    if gpu_target is None:
        return jax.devices()[:devices]
    import importlib.util

    from jax.experimental import topologies

    targets = pathlib.Path(__file__).resolve().parent / "gpu_targets"
    if not (targets / f"{gpu_target}.pbtxt").is_file():
        raise SystemExit(f"--gpu_target {gpu_target}: no {targets / gpu_target}.pbtxt; known: "
                         f"{sorted(t.stem for t in targets.glob('*.pbtxt'))}")
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        raise SystemExit(f"--gpu_target needs jax's CUDA plugin in this interpreter: "
                         f"pip install 'jax-cuda12-plugin[with-cuda]=={jax.__version__}'")
    config = (targets / f"{gpu_target}.pbtxt").read_text()
    return topologies.get_topology_desc(platform="cuda", target_config=config, topology=f"1x1x{devices}").devices


def run_case(remat: bool, batch_per_device: int, resolution: int, devices: int, layers=None, gpu_target=None) -> dict:
    """Lower and compile one case in this process (its jax must see `devices` devices, or
    `gpu_target` names a compile-only GPU)."""
    from dynamicid_jax import modeling, sharding
    from dynamicid_jax.data import records
    from dynamicid_jax.training import data, stages, trainer
    from dynamicid_jax.training.step import make_optimizer

    config = sdxl_config(layers)
    config.remat = remat
    config.data.resolution = resolution
    config.data.global_batch_size = batch_per_device * devices
    mesh = sharding.make_mesh(1, -1, target_devices(devices, gpu_target))
    modules = modeling.build_modules(config.model, dtype=trainer.compute_dtype(config.dtype), remat=remat)
    stage = stages.get("anchor")
    specs = data.expected_features(stage, modules, config)
    null = [s for s in specs if s.name in ("input_ids", "clip_image_features")]
    manifest = {"features": records.specs_to_json(specs), "null_features": {"features": records.specs_to_json(null)}}
    tx = make_optimizer(config.optimizer, config.total_steps)
    start = time.perf_counter()
    lowered, _, _ = trainer.lower_step(stage, modules, config, tx, mesh, manifest)
    lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    out = {
        "remat": remat, "batch_per_device": batch_per_device, "resolution": resolution, "devices": devices,
        "backend": f"gpu:{gpu_target}" if gpu_target else "cpu",
        "transformer_layers": layers or "sdxl",
        "dtype": config.dtype, "lower_seconds": round(lower_seconds, 1), "compile_seconds": round(compile_seconds, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "arguments_gib": m.argument_size_in_bytes / GIB, "outputs_gib": m.output_size_in_bytes / GIB,
        "temporaries_gib": m.temp_size_in_bytes / GIB, "aliased_gib": m.alias_size_in_bytes / GIB,
    }
    out["peak_gib"] = out["arguments_gib"] + out["outputs_gib"] + out["temporaries_gib"] - out["aliased_gib"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def accounting(devices: int, layers=None) -> dict:
    """The step's batch-independent bytes per device, from the abstract shapes and the
    trainer's shardings alone (no lowering, seconds): the stored state (trainable parameters
    and AdamW's two moments, split over fsdp), the frozen parameters as stored, and what the
    step gathers whole on every device (`step._gathered`: all parameters, float32) plus the
    trainable gradients before their reduce-scatter. What a compile adds on top is activations."""
    import jax
    import numpy as np

    from dynamicid_jax import modeling, sharding
    from dynamicid_jax.training import partition, stages
    from dynamicid_jax.training.step import init_state, make_optimizer

    config = sdxl_config(layers)
    mesh = sharding.make_mesh(1, -1, jax.devices()[:devices])
    modules = modeling.build_modules(config.model)
    trainable, frozen, model_state = partition.split_params(modeling.abstract_params(modules), stages.get("anchor"))
    tx = make_optimizer(config.optimizer, config.total_steps)
    state = jax.eval_shape(lambda t, m: init_state(t, m, tx, 0), trainable, model_state)

    def per_device(tree) -> float:
        shardings = sharding.param_shardings(tree, mesh, sharding.DEFAULT_RULES, config.sharding.min_size)
        return sum(np.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                   for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))) / GIB

    def whole(tree) -> float:
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree)) / GIB

    return {"devices": devices, "transformer_layers": layers or "sdxl", "trainable_parameters": int(sum(a.size for a in jax.tree.leaves(trainable))),
            "frozen_parameters": int(sum(a.size for a in jax.tree.leaves(frozen))),
            "state_gib": round(per_device(state), 3), "frozen_gib": round(per_device(frozen), 3),
            "gathered_parameters_gib": round(whole(trainable) + whole(frozen), 3),
            "gradients_gib": round(whole(trainable), 3)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--remat", choices=("on", "off", "both"), default="both")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch per device (one case each)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--devices", type=int, default=8, help="fsdp mesh size (fake CPU devices)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per case before it is stopped")
    p.add_argument("--accounting", action="store_true", help="only the batch-independent bytes (no compile)")
    p.add_argument("--layers", type=int, default=None,
                   help="proxy: this many transformer blocks per attention instead of SDXL's (1, 2, 10)")
    p.add_argument("--fast_codegen", action="store_true",
                   help="XLA's backend (LLVM) optimisation level 0: a faster CPU compile; the memory analysis "
                        "comes from the HLO buffer assignment before code generation, so it should not change "
                        "(not checked against a full compile here)")
    p.add_argument("--gpu_target", default=None, help="compile for this GPU (benchmarks/gpu_targets/NAME.pbtxt) "
                   "without one: deviceless AOT, needs jax's CUDA plugin installed")
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)  # the child process
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.case and args.accounting:
        result = accounting(args.devices, args.layers)
        print(json.dumps(result), flush=True)
        return [result]
    if args.case:
        result = run_case(args.remat == "on", args.batch[0], args.resolution, args.devices, args.layers,
                          args.gpu_target)
        print(json.dumps(result), flush=True)
        return [result]
    flags = f"--xla_force_host_platform_device_count={args.devices}"
    flags += " --xla_backend_optimization_level=0" if args.fast_codegen else ""
    # Deviceless, XLA cannot autotune; its Triton GEMM tiler then fails on some small dots
    # ("Couldn't find output tile sizes"): cuBLAS takes them, as on GPUs without Triton.
    flags += " --xla_gpu_enable_triton_gemm=false" if args.gpu_target else ""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    # What each child case is handed beyond its own flags (accounting reads only --layers).
    case_flags = [f"--layers={args.layers}"] if args.layers is not None else []
    case_flags += [f"--gpu_target={args.gpu_target}"] if args.gpu_target else []
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)  # the memory XLA's full optimiser gives
    results = []
    if args.accounting:
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--case", "--accounting",
               f"--devices={args.devices}", *case_flags]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        print(proc.stdout.strip() or proc.stderr.strip().splitlines()[-1], flush=True)
        return results
    for remat in (("on", "off") if args.remat == "both" else (args.remat,)):
        for batch in args.batch:
            cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--case", f"--remat={remat}",
                   f"--batch={batch}", f"--resolution={args.resolution}", f"--devices={args.devices}", *case_flags]
            start = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                result = {"remat": remat == "on", "batch_per_device": batch, "resolution": args.resolution,
                          "error": f"stopped after {args.timeout} s"}
            else:
                lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                result = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                    "remat": remat == "on", "batch_per_device": batch, "resolution": args.resolution,
                    "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
            result["wall_seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
