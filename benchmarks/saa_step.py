"""Denoising-step cost of DynamicID's SAA + LoRA UNet at the SD1.5 shape, on this machine.

    .venv/bin/python benchmarks/saa_step.py --repeats 3          # ~10 min on 2 CPU cores, ~16 GB RAM
    python benchmarks/saa_step.py --dtype bfloat16 --torch_device cuda --repeats 50   # a GPU box

Rows (one UNet forward of a CFG pair: batch 2, 64x64x4 latents, 77x768 text):
  plain      our Flax UNet, no SAA, no LoRA
  saa-1id    our UNet with SAA in every attn2 and LoRA rank 128 on every attn1/attn2, 1 identity
  saa-3id    the same with 3 identities (12 identity tokens, 3 boxes)
  torch-ip   diffusers UNet2DConditionModel with IPAdapterAttnProcessor2_0 on every attn2
             (4 identity tokens, scale 1): the closest off-the-shelf PyTorch peer
  torch-plain  the same diffusers UNet with its default AttnProcessor2_0 (no identity)
--dtype bfloat16 runs both frameworks in bfloat16 (our parameters cast once, as the bfloat16
sampler does; torch's module `.to(bfloat16)`); JAX runs on its default backend, torch on
--torch_device.
Goals (issue): saa-1id / plain <= 1.15, saa-3id / saa-1id <= 1.05, saa-1id / torch-ip <= 0.8.

Then the sampling loop (DynamicIDPipeline's jitted fori_loop + VAE decode) at 512 px:
compile time, and whether a second call with another step count compiles again.

All weights are random (diffusers' init imported through our key mapping); timings alternate
between the variants so that other load on the machine hits all of them alike; medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--skip-loop", action="store_true", help="skip the sampling-loop compile measurement")
    p.add_argument("--channels", default="320,640,1280,1280",
                   help="UNet block_out_channels (smaller values: a quick check of this script)")
    p.add_argument("--loop_steps", default="2,3", help="step counts of the successive sampling-loop calls")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--torch_device", default="cpu", help="cpu or cuda")
    p.add_argument("--attention_block", type=int, default=None,
                   help="UNetConfig.attention_block (default: the config's; 0 = materialise all logits)")
    return p.parse_args()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    args = parse_args()
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # honest compile times
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    from dynamicid_jax.dynamicid import published_weights as pw
    from dynamicid_jax.dynamicid.saa import SAAConfig, identity_conditioning
    from dynamicid_jax.models.torch_import import import_params
    import dataclasses

    from dynamicid_jax.base_models import sd15
    from dynamicid_jax.models.unet import UNet2DConditionModel, unet_abstract_params, unet_key_fn

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    torch_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    device = torch.device(args.torch_device)
    channels = tuple(int(c) for c in args.channels.split(","))
    overrides = {"block_out_channels": channels}  # UNetConfig fields set from the flags
    if args.attention_block is not None:
        overrides["attention_block"] = args.attention_block or None
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch_unet = TorchUNet(block_out_channels=channels, cross_attention_dim=768, sample_size=64).eval()
    state_dict = {k: v.detach().numpy() for k, v in torch_unet.state_dict().items()}
    plain = UNet2DConditionModel(dataclasses.replace(sd15.unet_config(), **overrides), dtype=dtype)
    plain_params = import_params(unet_abstract_params(plain), state_dict, unet_key_fn, model_name="unet")
    del state_dict
    saa = UNet2DConditionModel(dataclasses.replace(sd15.unet_config(), lora_rank=128, saa=SAAConfig(), **overrides), dtype=dtype)
    saa_params = pw.init_dynamicid_unet_params(plain_params, jax.random.PRNGKey(0), 128)
    cast = lambda tree: jax.tree.map(lambda a: a.astype(dtype), tree)  # noqa: E731
    plain_params, saa_params = jax.device_put((cast(plain_params), cast(saa_params)))

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 64, 64, 4), dtype=np.float32), dtype)
    t = jnp.full((2,), 981, jnp.int32)
    ctx = jnp.asarray(rng.standard_normal((2, 77, 768), dtype=np.float32), dtype)

    def identity(n_ids):
        tokens = jnp.asarray(rng.standard_normal((2, n_ids, 4, 768), dtype=np.float32), dtype)
        return identity_conditioning(tokens, None, layout_active=True, beta=4.0)

    forward_plain = jax.jit(lambda p, x, t, c: plain.apply({"params": p}, x, t, c))
    forward_saa = jax.jit(lambda p, x, t, c, i: saa.apply({"params": p}, x, t, c, i))
    compiled, compile_s = {}, {}
    t0 = time.perf_counter()
    compiled["plain"] = forward_plain.lower(plain_params, x, t, ctx).compile()
    compile_s["plain"] = time.perf_counter() - t0
    for n in (1, 3):
        ident = identity(n)
        t0 = time.perf_counter()
        compiled[f"saa-{n}id"] = (forward_saa.lower(saa_params, x, t, ctx, ident).compile(), ident)
        compile_s[f"saa-{n}id"] = time.perf_counter() - t0

    # diffusers peer: IP-Adapter processors on every attn2.
    procs = {}
    for name in torch_unet.attn_processors:
        if not name.endswith("attn2.processor"):
            procs[name] = AttnProcessor2_0()
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        procs[name] = IPAdapterAttnProcessor2_0(hidden_size=hidden, cross_attention_dim=768, num_tokens=(4,), scale=1.0)
    torch_unet.set_attn_processor(procs)
    torch_unet.to(device, torch_dtype)
    as_torch = lambda a: torch.from_numpy(np.asarray(a, np.float32)).to(device, torch_dtype)  # noqa: E731
    tx = as_torch(np.asarray(x, np.float32).transpose(0, 3, 1, 2).copy())
    tc = as_torch(ctx)
    tip = [as_torch(rng.standard_normal((2, 4, 768), dtype=np.float32))]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    runners = {
        "plain": lambda: compiled["plain"](plain_params, x, t, ctx).block_until_ready(),
        "saa-1id": lambda: compiled["saa-1id"][0](saa_params, x, t, ctx, compiled["saa-1id"][1]).block_until_ready(),
        "saa-3id": lambda: compiled["saa-3id"][0](saa_params, x, t, ctx, compiled["saa-3id"][1]).block_until_ready(),
    }

    def torch_run():
        with torch.no_grad():
            torch_unet(tx, 981, encoder_hidden_states=(tc, tip))
        sync()

    torch_plain = TorchUNet(block_out_channels=channels, cross_attention_dim=768, sample_size=64).eval()
    torch_plain.load_state_dict({k: v for k, v in torch_unet.state_dict().items() if "_ip" not in k})
    torch_plain.set_attn_processor(AttnProcessor2_0())
    torch_plain.to(device, torch_dtype)

    def torch_plain_run():
        with torch.no_grad():
            torch_plain(tx, 981, encoder_hidden_states=tc)
        sync()

    runners["torch-ip"] = torch_run
    runners["torch-plain"] = torch_plain_run
    for fn in runners.values():  # warm-up
        fn()
    times = {k: [] for k in runners}
    for _ in range(args.repeats):
        for k, fn in runners.items():
            times[k].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}

    print(f"\n## SAA denoising step, SD1.5 shape (batch 2, 64x64, 77 tokens), {args.dtype}, JAX on "
          f"{jax.devices()[0].device_kind}, torch on {args.torch_device}, {os.cpu_count()} cores, "
          f"attention_block {saa.config.attention_block}, median of {args.repeats}\n")
    print("| variant | step time (s) | compile (s) |")
    print("|---|---|---|")
    for k in runners:
        print(f"| {k} | {med[k]:.4f} | {compile_s.get(k, float('nan')):.1f} |")
    print("\n| ratio | measured | goal |")
    print("|---|---|---|")
    print(f"| saa-1id / plain | {med['saa-1id'] / med['plain']:.3f} | <= 1.15 |")
    print(f"| saa-3id / saa-1id | {med['saa-3id'] / med['saa-1id']:.3f} | <= 1.05 |")
    print(f"| saa-1id / torch-ip | {med['saa-1id'] / med['torch-ip']:.3f} | <= 0.8 |")
    print(f"| plain / torch-plain | {med['plain'] / med['torch-plain']:.3f} | (no goal) |")

    if args.skip_loop or channels != (320, 640, 1280, 1280):
        return
    del compiled, runners, torch_unet, torch_plain
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _sampling_loop(saa_params, dtype, tuple(int(n) for n in args.loop_steps.split(",")))


def _sampling_loop(saa_params, dtype, steps):
    """Compile time of the full denoising loop + decode at 512 px, and a step-count change."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dynamicid_jax import denoising, modeling, schedulers
    from dynamicid_jax.base_models import TextConditioning, default_config
    from dynamicid_jax.pipeline import DynamicIDPipeline

    config = default_config()
    modules = modeling.build_modules(config.model, dtype=dtype)
    vae_params = jax.jit(modules.vae.init)(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)))["params"]
    vae_params = jax.tree.map(lambda a: a.astype(dtype), vae_params)

    class _NoFaces:  # the loop needs no face models; the pipeline checks the embedding size only
        embedding_dim, name = modules.id_dim, "none"

    pipe = DynamicIDPipeline(modules, {"unet": saa_params, "vae": vae_params}, None, _NoFaces())
    n_ids = 2
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.standard_normal((1, 64, 64, 4), dtype=np.float32))
    # Per image (see dynamicid_jax.batching): [negative, positive] on axis 1, per-row settings (N,).
    context = jnp.asarray(rng.standard_normal((1, 2, 77, 768), dtype=np.float32))
    tokens = jnp.asarray(rng.standard_normal((1, 2, n_ids, 4, 768), dtype=np.float32))
    boxes = jnp.asarray([[[0, 0, 1, 0.5], [0, 0.5, 1, 1]]], jnp.float32)
    row = lambda v, dtype=jnp.float32: jnp.full((1,), v, dtype)  # noqa: E731
    rows = []
    for n in steps:
        schedule = schedulers.make_schedule("ddim", pipe.scheduler, n)
        t0 = time.perf_counter()
        image_rows = dict(noise=noise, conditioning=TextConditioning(context=context), id_tokens=tokens, boxes=boxes,
                          step_key=jax.random.PRNGKey(1)[None],  # (N, 2): one ancestral-noise key per image
                          guidance=row(5.0), alpha_count=row(1, jnp.int32), beta=row(4.0), id_scale=row(1.0),
                          mix=row(0.0))
        out = denoising.denoise({"unet": saa_params, "vae": vae_params}, image_rows, jnp.int32(0), schedule, None,
                                jnp.int32(0), modules=pipe.modules, gating=True, use_boxes=True, with_mix=False)
        jax.block_until_ready(out)
        cache_size = denoising.compiled_programs()
        rows.append((n, time.perf_counter() - t0, cache_size))
    print("\n## Sampling loop at 512x512 (2 identities, CFG batched, VAE decode included)\n")
    print("| call | steps | wall time incl. compile (s) | compiled programs after the call |")
    print("|---|---|---|---|")
    for i, (n, s, c) in enumerate(rows):
        print(f"| {i + 1} | {n} | {s:.1f} | {c} |")
    print("\nThe step count is a traced loop bound: a second step count reuses the first program "
          "when the last column stays 1.")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    main()
