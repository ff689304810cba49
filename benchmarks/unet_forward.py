"""One SD1.5 UNet forward: our JAX/Flax UNet vs diffusers' PyTorch UNet2DConditionModel on CPU.

Run (a few minutes on 2 cores; needs ~12 GB of RAM for two 3.4 GB float32 models):

    .venv/bin/python benchmarks/unet_forward.py --repeats 3

Both models compute the same function: the PyTorch UNet gets diffusers' random init, and its
weights go through our import path (`unet_key_fn`) into the JAX UNet, so the script also
reports the relative L2 difference of the two outputs. Shape: batch 2 (one CFG pair),
64x64x4 latents (512 px), 77x768 text context. Timed runs alternate JAX and PyTorch so load
from other processes on a shared machine hits both alike; medians are reported.
JAX's compile time is measured with the persistent compilation cache off and reported
separately. Threads: torch.set_num_threads(--threads); XLA's CPU client uses one thread per
core, so set --threads to the core count (the default) for a like-for-like run.

Wall time on a shared 2-core machine swings with other processes' load, so the table also
gives process CPU time (both frameworks run two threads).

What was tried for speed (2-core x86 CPU, float32, 2026-11-28; ratios JAX/PyTorch wall):
- Attention is where XLA lost most: materialising the (2, 8, 4096, 4096) logits of the
  finest level's self-attention took ~2 s per layer against ~0.45 s for torch's fused CPU
  flash kernel. `layers.attend_blockwise` (online softmax over key blocks, queries mapped
  in blocks) brings it to ~0.6 s; UNetConfig.attention_block picks the block (256: 1.23,
  512: 1.12, 1024: 1.26 with the flag below; 512 is the default). Query-only chunking
  (~1.7 s) and jax.nn.dot_product_attention (XLA path, ~3.3 s) helped less.
- XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= (empty: no YNNPACK fusions, convs and
  dots go to XLA's own Eigen kernels) was ~10-20% faster here than the default YNNPACK
  fusions: recommended for CPU runs. --xla_cpu_use_onednn / --xla_cpu_use_xnnpack /
  --xla_cpu_enable_fast_math made no measurable difference in micro-benchmarks.
- One-pass (fast) variance in GroupNorm/LayerNorm: no measurable change; kept two-pass.
Remaining gap: torch's oneDNN convolutions (~3.5 s of a ~7 s forward) beat XLA's by
~1.3-1.5x, and the fused attention kernel is still ~1.3x faster than the blockwise one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per framework (median reported)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent-size", type=int, default=64, help="latent height = width (64 = 512 px)")
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="JAX compute dtype")
    p.add_argument("--skip-torch", action="store_true", help="time only JAX (weights still come from torch)")
    p.add_argument("--attention-block", type=int, default=None,
                   help="UNetConfig.attention_block (default: the config's; 0 = materialise all logits)")
    return p.parse_args()


def main():
    args = parse_args()
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # honest compile time
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from dynamicid_jax.models.torch_import import import_params
    from dynamicid_jax.base_models import sd15
    from dynamicid_jax.models.unet import UNet2DConditionModel, unet_abstract_params, unet_key_fn

    torch.set_num_threads(args.threads)
    config = sd15.unet_config()
    if args.attention_block is not None:
        config = dataclasses.replace(config, attention_block=args.attention_block or None)
    torch.manual_seed(0)
    # diffusers' defaults with SD1.5's cross-attention width are exactly SD1.5's UNet.
    torch_unet = TorchUNet(cross_attention_dim=config.cross_attention_dim, sample_size=64).eval()
    state_dict = {k: v.detach().numpy() for k, v in torch_unet.state_dict().items()}

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    module = UNet2DConditionModel(config, dtype=dtype)
    params = import_params(unet_abstract_params(module), state_dict, unet_key_fn, model_name="unet")
    del state_dict
    params = jax.device_put(params)

    rng = np.random.default_rng(0)
    b, s = args.batch, args.latent_size
    sample = rng.standard_normal((b, 4, s, s), dtype=np.float32)
    context = rng.standard_normal((b, args.context_len, config.cross_attention_dim), dtype=np.float32)
    timesteps = np.full((b,), 981.0, dtype=np.float32)
    jax_inputs = jax.device_put((sample.transpose(0, 2, 3, 1), timesteps, context))
    torch_inputs = tuple(torch.from_numpy(a) for a in (sample, timesteps, context))

    forward = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
    t0 = time.perf_counter()
    compiled = forward.lower(params, *jax_inputs).compile()
    compile_s = time.perf_counter() - t0

    def timed(fn):
        """(wall seconds, process CPU seconds, result): CPU time is less swayed by other load."""
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - wall, time.process_time() - cpu, out

    def run_jax():
        return timed(lambda: compiled(params, *jax_inputs).block_until_ready())

    def run_torch():
        with torch.inference_mode():
            return timed(lambda: torch_unet(*torch_inputs).sample)

    jax_out = run_jax()[2]  # warm-up
    if not args.skip_torch:
        torch_out = run_torch()[2]
        ref = torch_out.numpy().transpose(0, 2, 3, 1)
        rel_err = float(np.linalg.norm(np.asarray(jax_out) - ref) / np.linalg.norm(ref))
    jax_times, torch_times = [], []
    for _ in range(args.repeats):
        jax_times.append(run_jax()[:2])
        if not args.skip_torch:
            torch_times.append(run_torch()[:2])

    def medians(times):
        return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)

    jax_s, jax_cpu = medians(jax_times)
    print()
    print(f"SD1.5 UNet forward, batch {b}, latents {s}x{s}x4, context {args.context_len}x768, "
          f"{args.repeats} timed runs (median); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {args.threads}, jax {jax.__version__}, torch {torch.__version__}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, JAX compute dtype {args.dtype}, "
          f"attention_block {config.attention_block}")
    print()
    print("| framework | forward wall (s) | JAX / PyTorch (wall) | forward CPU (s) | JAX / PyTorch (CPU) | compile (s) |")
    print("|---|---|---|---|---|---|")
    if args.skip_torch:
        print(f"| JAX (jit) | {jax_s:.2f} | - | {jax_cpu:.2f} | - | {compile_s:.1f} |")
    else:
        torch_s, torch_cpu = medians(torch_times)
        print(f"| JAX (jit) | {jax_s:.2f} | {jax_s / torch_s:.2f} | {jax_cpu:.2f} | {jax_cpu / torch_cpu:.2f} "
              f"| {compile_s:.1f} |")
        print(f"| PyTorch (diffusers) | {torch_s:.2f} | 1.00 | {torch_cpu:.2f} | 1.00 | - |")
        print()
        print(f"outputs: relative L2 difference JAX vs PyTorch = {rel_err:.2e}")
    print(f"all (wall, CPU) times: JAX {[(round(w, 1), round(c, 1)) for w, c in jax_times]}; "
          f"PyTorch {[(round(w, 1), round(c, 1)) for w, c in torch_times]}")


if __name__ == "__main__":
    main()
