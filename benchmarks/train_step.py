"""Train-step benchmark: time, memory and FLOPs of one anchor update step.

    python benchmarks/train_step.py                      # tiny x 1 device, tiny x 8 fake devices, SD1.5 x 1
    python benchmarks/train_step.py --only tiny-1        # one case (tiny-1, tiny-8, sd15-1)
    python benchmarks/train_step.py --flops_only sd15-1  # FLOPs from the lowered step, no compile
    python benchmarks/train_step.py --only sd15-1 --global_batch 8 --dtype bfloat16 --steps 10   # a GPU box

Each case builds the modules from the stage config, random parameters from the shapes
(no init compile), random in-memory batches of the shard format, compiles the step ahead of
time with `trainer.compile_step` (the trainer's own), then times `--steps` updates.
Reported per case: compile seconds, seconds per step, XLA's FLOPs per step
(`compiled.cost_analysis()`, per device for SPMD programs), XLA's memory estimate
(`compiled.memory_analysis()`: arguments + outputs + temporaries - aliased), the process's
peak RSS, and the images/s per chip the FLOPs imply at 50% utilisation of A100 (312 TFLOP/s
bf16), H100 (989) and TPU v5p (459). The table is printed and written to
benchmarks/train_step_report.md. The 8-device case runs in a subprocess (fake CPU devices
must be set before jax starts).
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
sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "TPU v5p": 459.0}
UTILISATION = 0.5
CASES = {  # name -> (config argument, devices, global batch, resolution)
    "tiny-1": ("tiny", 1, 8, 64),
    "tiny-8": ("tiny", 8, 8, 64),
    "sd15-1": (None, 1, 1, 512),
}


def _case(name: str, global_batch: int | None = None, dtype: str | None = None):
    """(config, mesh, modules, manifest, tx) of a case: the stage config at the case's batch
    and resolution, a mesh over its devices, and a manifest of the shard format."""
    import jax

    from configs import anchor
    from dynamicid_jax import modeling, sharding
    from dynamicid_jax.data import records
    from dynamicid_jax.training import data, stages
    from dynamicid_jax.training.step import make_optimizer
    from dynamicid_jax.training.trainer import compute_dtype

    arg, n_devices, batch_size, resolution = CASES[name]
    config = anchor.get_config(arg)
    config.data.global_batch_size, config.data.resolution = global_batch or batch_size, resolution
    config.dtype = dtype or config.dtype
    devices = jax.devices()[:n_devices]
    if len(devices) != n_devices:
        raise RuntimeError(f"{name} needs {n_devices} devices, found {len(jax.devices())}")
    mesh = sharding.make_mesh(1, -1, devices)
    modules = modeling.build_modules(config.model, dtype=compute_dtype(config.dtype))
    specs = data.expected_features(stages.get("anchor"), modules, config)
    null = [s for s in specs if s.name in ("input_ids", "clip_image_features")]
    manifest = {"features": records.specs_to_json(specs), "null_features": {"features": records.specs_to_json(null)}}
    return config, mesh, modules, manifest, make_optimizer(config.optimizer, config.total_steps)


def run_case(name: str, steps: int, global_batch: int | None = None, dtype: str | None = None) -> dict:
    import jax
    import numpy as np

    from dynamicid_jax import modeling, sharding
    from dynamicid_jax.training import data, partition, stages, trainer
    from dynamicid_jax.training.step import init_state

    _, n_devices, batch_size, resolution = CASES[name]
    config, mesh, modules, manifest, tx = _case(name, global_batch, dtype)
    batch_size = config.data.global_batch_size
    start = time.perf_counter()
    compiled, abs_state, abs_fixed = trainer.compile_step(stages.get("anchor"), modules, config, tx, mesh, manifest)
    compile_seconds = time.perf_counter() - start
    print(f"compiled in {compile_seconds:.1f}s", file=sys.stderr, flush=True)

    rng = np.random.default_rng(0)

    def draw(leaf):
        if np.issubdtype(leaf.dtype, np.integer):
            return np.zeros(leaf.shape, leaf.dtype)
        return (0.02 * rng.standard_normal(leaf.shape, np.float32)).astype(leaf.dtype)

    trainable, frozen, model_state = partition.split_params(modeling.abstract_params(modules), stages.get("anchor"))
    state = jax.jit(lambda t, m: init_state(t, m, tx, 0), out_shardings=jax.tree.map(lambda a: a.sharding, abs_state))(
        jax.tree.map(draw, trainable), jax.tree.map(draw, model_state))
    fixed = jax.device_put(jax.tree.map(draw, abs_fixed), jax.tree.map(lambda a: a.sharding, abs_fixed))
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {k: jax.device_put(draw(v), batch_sharding) for k, v in data.abstract_batch(manifest, stages.get("anchor"), config).items()}
    batch["input_ids"] = jax.device_put(rng.integers(0, 100, batch["input_ids"].shape).astype(np.int32), batch_sharding)
    batch["vae_logvar"] = jax.device_put(np.full(batch["vae_logvar"].shape, -4.0, np.float32), batch_sharding)

    print("inputs ready", file=sys.stderr, flush=True)
    state, metrics = compiled(state, fixed, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, fixed, batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_per_device = float(cost.get("flops", float("nan")))
    memory = compiled.memory_analysis()
    xla_bytes = None
    if memory is not None:
        xla_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                     - memory.alias_size_in_bytes)
    flops_per_step = flops_per_device * n_devices  # an SPMD program's analysis is per device
    per_image = flops_per_step / batch_size
    return {
        "case": name, "device_kind": jax.devices()[0].device_kind, "dtype": config.dtype, "devices": n_devices, "global_batch": batch_size, "resolution": resolution,
        "lora_rank": config.model.lora_rank, "compile_s": round(compile_seconds, 1), "step_s": round(seconds, 4),
        "images_per_s_cpu": round(batch_size / seconds, 3), "flops_per_step": flops_per_step,
        "xla_memory_bytes": xla_bytes, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device_peak_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),  # None on CPU
        "achieved_tflops": round(flops_per_step / seconds / 1e12, 1),
        "implied_images_per_s_per_chip": {chip: round(UTILISATION * tf * 1e12 / per_image, 1)
                                          for chip, tf in PEAK_TFLOPS.items()},
        "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
    }


def lowered_flops(name: str) -> dict:
    """FLOPs of one step from the lowered (unoptimised) program: no XLA compile, no run.

    For shapes whose full CPU compile does not fit the machine (the SD1.5 step on 2 cores /
    24 GB); XLA's pre-optimisation count, close to the compiled one for matmul/conv-bound
    programs.
    """
    from dynamicid_jax.training import stages, trainer

    _, n_devices, batch_size, resolution = CASES[name]
    config, mesh, modules, manifest, tx = _case(name)
    start = time.perf_counter()
    lowered, _, _ = trainer.lower_step(stages.get("anchor"), modules, config, tx, mesh, manifest)
    lower_seconds = time.perf_counter() - start
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"]) * n_devices
    per_image = flops / batch_size
    return {"case": name, "global_batch": batch_size, "resolution": resolution, "lora_rank": config.model.lora_rank,
            "lower_s": round(lower_seconds, 1), "flops_per_step": flops,
            "implied_images_per_s_per_chip": {chip: round(UTILISATION * tf * 1e12 / per_image, 1)
                                              for chip, tf in PEAK_TFLOPS.items()}}


def report(results: list[dict]) -> str:
    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    lines = [
        "| case | devices | batch | res | compile s | step s (CPU) | GFLOP/step | XLA mem GiB | peak RSS GiB | "
        "img/s/chip A100 | H100 | v5p |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        chips = r["implied_images_per_s_per_chip"]
        lines.append(f"| {r['case']} | {r['devices']} | {r['global_batch']} | {r['resolution']} | {r['compile_s']} | "
                     f"{r['step_s']} | {r['flops_per_step'] / 1e9:.2f} | {gib(r['xla_memory_bytes'])} | "
                     f"{gib(r['peak_rss_bytes'])} | {chips['A100']} | {chips['H100']} | {chips['TPU v5p']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(CASES), help="run one case in this process and print its JSON")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up)")
    parser.add_argument("--cases", default="tiny-1,tiny-8,sd15-1", help="comma-separated cases for the table")
    parser.add_argument("--global_batch", type=int, help="with --only: override the case's global batch")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="with --only: compute dtype")
    parser.add_argument("--flops_only", choices=sorted(CASES), help="FLOPs of the lowered step only (no compile)")
    args = parser.parse_args()
    if args.flops_only:
        print(json.dumps(lowered_flops(args.flops_only)), flush=True)
        return
    if args.only:
        print("RESULT " + json.dumps(run_case(args.only, args.steps, args.global_batch, args.dtype)), flush=True)
        return
    results = []
    for name in args.cases.split(","):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        if CASES[name][1] > 1:
            env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={CASES[name][1]}"
        out = subprocess.run([sys.executable, __file__, "--only", name, "--steps", str(args.steps)], env=env,
                             capture_output=True, text=True)
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(f"{name}: failed (exit {out.returncode})\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[0][len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    table = report(results)
    print(table)
    (ROOT / "benchmarks" / "train_step_report.md").write_text(
        "# Train step (anchor stage), measured by benchmarks/train_step.py on CPU\n\n" + table + "\n\n"
        f"Implied images/s per chip: {UTILISATION:.0%} of peak bf16 FLOP/s divided by XLA's FLOPs per image "
        "(float32 program's count; the bf16 step does the same FLOPs).\n")


if __name__ == "__main__":
    main()
