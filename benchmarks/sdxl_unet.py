"""The SDXL UNet forward at real shapes, ours (JAX/Flax) against diffusers (PyTorch) on this
CPU, and the compile time of the SDXL sampling loop.

    .venv/bin/python benchmarks/sdxl_unet.py --rows 512:float32 --repeats 3
    .venv/bin/python benchmarks/sdxl_unet.py                      # every row and the loop compile
    .venv/bin/python benchmarks/sdxl_unet.py --rows "" --loop 1024:float32   # the loop compile only

Rows are SIZE:DTYPE (pixels per side; float32 or bfloat16): SDXL base 1.0's UNet (2.57 B
parameters, `UNetConfig.sdxl()` / its unet/config.json) with RANDOM weights (normal, std
0.02: the cost does not depend on the values), batch 2 (one CFG pair), latents SIZE/8,
context 77 x 2048, the pooled text (1280) and six time ids. Each framework runs in its own
child process, one after the other, so only one 10 GB float32 copy of the UNet is in memory
at a time (and the memory is returned between rows); a row whose framework needs more than
the machine's available memory is skipped and said so. Medians of --repeats forwards after
one warm-up; process CPU seconds beside the wall seconds (less swayed by other load on a
shared machine). The ratio column is ours / diffusers (below 1: ours faster).

The loop compile (--loop SIZE:DTYPE) lowers and compiles `denoising.denoise`, the one
program `launch/sample.py` runs for plain SDXL text-to-image (UNet without the identity
branch, every sampler behind a traced index, the VAE decode), from parameter SHAPES only
(no weights in memory), with the persistent compilation cache off.

The output ends with a markdown table (benchmarks/sdxl_unet.md keeps the measured one) and
the machine's load average at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (diffusers' names), as
# tests/test_sdxl_real_size.py holds our UNet's parameters to it.
DIFFUSERS_SDXL_UNET = dict(
    addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
)
BATCH, CONTEXT, CONTEXT_WIDTH, POOLED = 2, 77, 2048, 1280
# Memory a child needs beyond the weights (activations, XLA's buffers, the interpreter), GB.
WEIGHTS_GB = {"float32": 10.3, "bfloat16": 5.2}
HEADROOM_GB = {512: 2.5, 1024: 5.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="512:float32,512:bfloat16,1024:float32,1024:bfloat16",
                   help="comma-separated SIZE:DTYPE rows ('' = none)")
    p.add_argument("--frameworks", default="jax,torch", help="comma-separated: jax, torch")
    p.add_argument("--loop", default="1024:float32", help="SIZE:DTYPE of the sampling-loop compile ('' = skip)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per row and framework (median)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--torch_device", default="cpu", help="cpu or cuda (JAX uses its default device)")
    p.add_argument("--torch_compile", action="store_true", help="diffusers' UNet through torch.compile")
    p.add_argument("--child", nargs=3, metavar=("WHAT", "SIZE", "DTYPE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def available_gb() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def note(text: str) -> None:
    """A child's progress, on stderr (its stdout is the result), shown when the child fails."""
    print(f"[{time.strftime('%H:%M:%S')}] {text} (load {load_average()})", file=sys.stderr, flush=True)


def timed(fn):
    """(wall seconds, process CPU seconds) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def medians(times) -> dict:
    return {"wall": statistics.median(t[0] for t in times), "cpu": statistics.median(t[1] for t in times),
            "all": [[round(w, 2), round(c, 2)] for w, c in times]}


def sdxl_modules(dtype: str):
    """`modeling.build_modules` of the SDXL family at full size, without the identity branch:
    what `launch/sample.py` builds for an SDXL base model alone."""
    import jax.numpy as jnp

    from dynamicid_jax import base_models, modeling

    model = base_models.default_config(family="sdxl").model
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    return modeling.build_modules(model, dtype=compute, vae_dtype=jnp.float32, identity_branch=False)


def child_jax(size: int, dtype: str, repeats: int) -> dict:
    """Our UNet forward: random parameters in the compute dtype (as load_pipeline casts them)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)  # honest compile time
    from dynamicid_jax.models.unet import unet_abstract_params

    module = sdxl_modules(dtype).unet
    target = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jax.device_put((rng.standard_normal(s.shape, np.float32) * 0.02).astype(target)),
                          unet_abstract_params(module))
    s = size // 8
    inputs = (rng.standard_normal((BATCH, s, s, 4), np.float32), np.full((BATCH,), 981.0, np.float32),
              rng.standard_normal((BATCH, CONTEXT, CONTEXT_WIDTH), np.float32),
              {"text_embeds": rng.standard_normal((BATCH, POOLED), np.float32),
               "time_ids": np.tile(np.asarray([size, size, 0, 0, size, size], np.float32), (BATCH, 1))})
    inputs = jax.device_put(inputs)
    note("our parameters drawn")
    forward = jax.jit(lambda p, x, t, c, a: module.apply({"params": p}, x, t, c, None, added_cond=a))
    start = time.perf_counter()
    compiled = forward.lower(params, *inputs).compile()
    compile_s = time.perf_counter() - start
    note(f"compiled in {compile_s:.0f} s")
    run = lambda: compiled(params, *inputs).block_until_ready()  # noqa: E731
    run()  # warm-up
    return dict(medians([timed(run) for _ in range(repeats)]), compile=compile_s)


def child_torch(size: int, dtype: str, repeats: int, threads: int, device: str = "cpu",
                compile_: bool = False) -> dict:
    """diffusers' UNet2DConditionModel with SDXL's config, random weights of the same law
    (on `device`; compile_: through torch.compile, its compile in the warm-up)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(threads)
    target = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    with torch.device("meta"):  # no default init of 2.57 B weights: filled below
        unet = UNet2DConditionModel(**DIFFUSERS_SDXL_UNET)
    unet = unet.to_empty(device="cpu").to(target).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02, generator=generator)
        for b in unet.buffers():
            b.zero_()
    note("diffusers' parameters drawn")
    s = size // 8
    sample = torch.randn(BATCH, 4, s, s, generator=generator).to(target)
    t = torch.full((BATCH,), 981.0)
    context = torch.randn(BATCH, CONTEXT, CONTEXT_WIDTH, generator=generator).to(target)
    added = {"text_embeds": torch.randn(BATCH, POOLED, generator=generator).to(target),
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * BATCH, dtype=target)}
    unet, sample, t, context = (a.to(device) for a in (unet, sample, t, context))
    added = {k: v.to(device) for k, v in added.items()}
    forward = torch.compile(unet) if compile_ else unet

    def run():
        with torch.inference_mode():
            forward(sample, t, encoder_hidden_states=context, added_cond_kwargs=added)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run()  # warm-up
    return medians([timed(run) for _ in range(repeats)])


def child_loop(size: int, dtype: str) -> dict:
    """Compile seconds of `denoising.denoise` for one SDXL picture of SIZE px (plain
    text-to-image), from shapes: parameters and rows as ShapeDtypeStructs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)
    from dynamicid_jax import denoising, modeling
    from dynamicid_jax import schedulers as S
    from dynamicid_jax.base_models import TextConditioning

    modules = sdxl_modules(dtype)
    start = time.perf_counter()
    abstract = modeling.abstract_params(modules)
    target = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    shapes = {"unet": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, target), abstract["unet"]),
              "vae": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), abstract["vae"])}
    abstract_s = time.perf_counter() - start
    n, s = 1, size // 8
    spec = lambda *shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    rows = {"noise": spec(n, s, s, 4), "step_key": spec(n, 2, dt=jnp.uint32),
            "conditioning": TextConditioning(context=spec(n, 2, CONTEXT, CONTEXT_WIDTH),
                                             extras={"text_embeds": spec(n, 2, POOLED), "time_ids": spec(n, 2, 6)}),
            "guidance": spec(n), "alpha_count": spec(n, dt=jnp.int32), "beta": spec(n), "id_scale": spec(n),
            "mix": spec(n)}
    schedule = S.make_schedule("euler", modules.scheduler, 30)
    start = time.perf_counter()
    lowered = denoising.denoise.lower(shapes, rows, np.int32(S.sampler_index("euler")), schedule, None, np.int32(0),
                                      modules=modules, gating=True, use_boxes=False, with_mix=False)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    return {"trace_and_lower": lower_s + abstract_s, "compile": time.perf_counter() - start}


def run_child(what: str, size: int, dtype: str, args) -> dict:
    need = (WEIGHTS_GB[dtype] if what != "loop" else 0.0) + HEADROOM_GB.get(size, 5.0)
    free = available_gb()
    if free < need:
        return {"skipped": f"needs ~{need:.0f} GB, {free:.1f} GB available"}
    command = [sys.executable, __file__, "--child", what, str(size), dtype, "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--torch_device", args.torch_device]
    command += ["--torch_compile"] if args.torch_compile else []
    print(f"[{time.strftime('%H:%M:%S')}] {what} {size} px {dtype} (load {load_average()}, {free:.1f} GB free) ...",
          flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=None, text=True)  # progress shows live
    if done.returncode != 0:
        return {"skipped": f"failed (exit {done.returncode}{', killed: out of memory?' if done.returncode == -9 else ''})"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"    {result}", flush=True)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        what, size, dtype = args.child[0], int(args.child[1]), args.child[2]
        result = (child_jax(size, dtype, args.repeats) if what == "jax" else
                  child_torch(size, dtype, args.repeats, args.threads, args.torch_device, args.torch_compile)
                  if what == "torch" else child_loop(size, dtype))
        print(json.dumps(result))
        return
    import jax
    import torch

    start_load = load_average()
    frameworks = [f for f in args.frameworks.split(",") if f]
    rows = [(int(r.split(":")[0]), r.split(":")[1]) for r in args.rows.split(",") if r]
    results = {(size, dtype): {f: run_child(f, size, dtype, args) for f in frameworks} for size, dtype in rows}
    loop = None
    if args.loop:
        size, dtype = int(args.loop.split(":")[0]), args.loop.split(":")[1]
        loop = (size, dtype, run_child("loop", size, dtype, args))
    print()
    print(f"SDXL UNet forward, batch {BATCH}, random weights; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {args.threads}, jax {jax.__version__}, torch {torch.__version__}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {args.repeats} timed forwards (median); JAX on "
          f"{jax.devices()[0].platform}, diffusers on {args.torch_device}"
          + (" through torch.compile" if args.torch_compile else ""))
    print(f"load average (1, 5, 15 min): {start_load} at the start, {load_average()} at the end")
    print()
    print("| size | dtype | ours wall (s) | diffusers wall (s) | ours / diffusers (wall) | ours CPU (s) "
          "| diffusers CPU (s) | ours / diffusers (CPU) | our compile (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    cell = lambda r, k, f="{:.2f}": f.format(r[k]) if r and k in r else (r or {}).get("skipped", "-")  # noqa: E731
    for (size, dtype), r in results.items():
        ours, theirs = r.get("jax"), r.get("torch")
        both = ours and theirs and "wall" in ours and "wall" in theirs
        print(f"| {size} px | {dtype} | {cell(ours, 'wall')} | {cell(theirs, 'wall')} | "
              f"{ours['wall'] / theirs['wall']:.2f} | " if both else
              f"| {size} px | {dtype} | {cell(ours, 'wall')} | {cell(theirs, 'wall')} | - | ", end="")
        print(f"{cell(ours, 'cpu')} | {cell(theirs, 'cpu')} | "
              + (f"{ours['cpu'] / theirs['cpu']:.2f}" if both else "-") + f" | {cell(ours, 'compile', '{:.0f}')} |")
    if loop:
        size, dtype, r = loop
        print()
        print(f"sampling loop (denoising.denoise, plain SDXL, {size} px, {dtype}): "
              + (f"trace + lower {r['trace_and_lower']:.0f} s, compile {r['compile']:.0f} s" if "compile" in r
                 else r["skipped"]))


if __name__ == "__main__":
    main()
