"""Per-sampler step cost of our sampling loop against DDIM and against diffusers'
StableDiffusionPipeline with the same scheduler (same run, same tiny random UNet + VAE), and
the time to merge a kohya-sized style LoRA into SD1.5-shaped weights.

  python benchmarks/schedulers.py                # tiny demo model, CPU: prints markdown tables
  python benchmarks/schedulers.py --steps 20 --repeats 3 --lora_rank 128

Step time = (time of an S-step call - time of a 1-step call) / (S - 1), so the VAE decode and
call overhead cancel: a WHOLE denoising step (UNet, CFG, the sampler's update). Ours: the
jitted loop (compiled once for every sampler: the sampler is a traced index), CFG batched (2
latents), twice: identity branch off, and SAA on with 2 identities (gating, boxes, layout for
the first 3 steps, identity scale 1). Diffusers: the same UNet/VAE in torch, float32. Both
single-threaded by default (see below).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import tempfile
import time

# One compute thread on each side unless told otherwise: on a shared 2-core machine torch's
# default OpenMP threads spin against other processes (measured: 983 ms vs 57 ms for one tiny
# UNet call), which would make the comparison meaningless.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_samplers(steps: int, repeats: int):
    import diffusers
    import torch

    import test_sampler_pipeline_parity as E
    from dynamicid_jax import denoising
    from dynamicid_jax import schedulers as S
    from dynamicid_jax.base_models import TextConditioning

    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))

    models = E.build_models(pathlib.Path(tempfile.mkdtemp()))
    ours = models["ours"]
    f = ours.modules.vae_scale_factor
    noise, key = ours.initial_noise(0, (1, E.SIZE // f, E.SIZE // f, 4))

    # One image's row (batching.py's per-image layout): [negative, positive] on axis 1, settings (1,).
    width, num_tokens = models["context"].shape[-1], ours.modules.face_projection.num_tokens
    plain = (jnp.zeros((1, 2, 1, num_tokens, width)), jnp.asarray([[[0.0, 0.0, 1.0, 1.0]]]), 0.0, False)
    two_ids = (jax.random.normal(jax.random.PRNGKey(2), (1, 2, 2, num_tokens, width)),
               jnp.asarray([[[0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]]]), 1.0, True)

    def run_ours(name, n, saa=False):
        tokens, boxes, id_scale, on = two_ids if saa else plain
        schedule = S.make_schedule(name, ours.scheduler, n)
        row = lambda v, dtype=jnp.float32: jnp.asarray([v], dtype)  # noqa: E731
        rows = dict(noise=noise, conditioning=TextConditioning(context=jnp.asarray(models["context"])[None]),
                    id_tokens=tokens, boxes=boxes, step_key=key, guidance=row(5.0),
                    alpha_count=row(3 if saa else 1, jnp.int32), beta=row(4.0), id_scale=row(id_scale), mix=row(0.0))
        out = denoising.denoise({"unet": ours.params["unet"], "vae": ours.params["vae"]}, rows,
                                jnp.int32(S.sampler_index(name)), schedule, None, jnp.int32(0), modules=ours.modules,
                                gating=on, use_boxes=on, with_mix=False)
        jax.block_until_ready(out)

    def run_theirs(name, n):
        cls, extra = E.REFERENCE[name]
        pipe = diffusers.StableDiffusionPipeline(
            vae=models["vae"], text_encoder=None, tokenizer=None, unet=models["unet"],
            scheduler=cls.from_config({**E.SD15_SCHEDULER_JSON, **extra}), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            pipe(prompt_embeds=torch.from_numpy(models["context"][1:]),
                 negative_prompt_embeds=torch.from_numpy(models["context"][:1]),
                 latents=torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy()), num_inference_steps=n,
                 guidance_scale=5.0, height=E.SIZE, width=E.SIZE, output_type="np")

    t0 = time.perf_counter()
    run_ours("ddim", 1)
    compile_s = time.perf_counter() - t0
    # Rounds interleave the samplers and sides (in a rotated order) so that load drifting on a
    # shared machine hits all alike; each figure is the best round.
    runners = (run_ours, lambda name, n: run_ours(name, n, saa=True), run_theirs)
    timings = {(name, side, n): [] for name in S.SCHEDULERS for side in range(3) for n in (1, steps)}
    for name in S.SCHEDULERS:
        for runner in runners:
            runner(name, 2)  # warm-up (and the SAA program's compile)
    for r in range(repeats):
        for name in S.SCHEDULERS[r % len(S.SCHEDULERS):] + S.SCHEDULERS[:r % len(S.SCHEDULERS)]:  # rotated
            for side, runner in enumerate(runners):
                for n in (1, steps):
                    timings[(name, side, n)].append(_best(lambda: runner(name, n), 1))
    rows = {name: [(min(timings[(name, side, steps)]) - min(timings[(name, side, 1)])) / (steps - 1)
                   for side in range(3)] for name in S.SCHEDULERS}
    print(f"\n## Whole denoising step per sampler, tiny demo model ({E.SIZE} px, CFG), CPU, {steps}-step calls\n")
    print(f"One compile for all samplers: {compile_s:.1f} s.\n")
    print("| sampler | ours ms/step | vs our DDIM | ours SAA 2 ids ms/step | vs its DDIM | diffusers ms/step "
          "| ours / diffusers |")
    print("|---|---|---|---|---|---|---|")
    ddim, ddim_saa = rows["ddim"][0], rows["ddim"][1]
    for name, (o, s, d) in rows.items():
        print(f"| {name} | {1e3 * o:.2f} | {o / ddim:.3f} | {1e3 * s:.2f} | {s / ddim_saa:.3f} | {1e3 * d:.2f} "
              f"| {o / d:.2f} |")


def bench_step_math(repeats: int, steps: int = 50):
    """The sampler update alone (no UNet) at SD1.5's 512 px latent (2, 64, 64, 4), inside the
    sampling loop's `lax.switch`, per step: what a sampler adds to a UNet step."""
    from dynamicid_jax import schedulers as S
    from dynamicid_jax.base_models import sd15

    config = S.SchedulerConfig(**sd15.SCHEDULER)
    table = S.noise_table(config)
    x0 = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 4))
    eps = 0.5 * x0

    @jax.jit
    def loop(index, schedule, key):
        def body(i, carry):
            x, state = carry
            x = S.scale_model_input_by_index(index, schedule, i, x)
            return S.step_by_index(index, table, schedule, i, eps + 0.01 * x, x, state, key)

        start = x0 * schedule.init_sigma
        return jax.lax.fori_loop(0, schedule.num_steps, body, (start, S.init_state("dpmpp_2m", start)))[0]

    from dynamicid_jax.batching import step_keys

    key = jnp.asarray(step_keys([(1, 0), (1, 1)]))  # each latent's own per-step noise key (N, 2)
    rows = {}
    for name in S.SCHEDULERS:
        n = min(steps, S.max_steps(name, config))
        schedule = S.make_schedule(name, config, n)
        run = lambda: jax.block_until_ready(loop(jnp.int32(S.sampler_index(name)), schedule, key))  # noqa: E731
        run()
        rows[name] = _best(run, repeats) / n
    print(f"\n## Sampler update alone, 512 px latent (2, 64, 64, 4), CPU, {steps}-step loops\n")
    print("| sampler | us/step | vs DDIM |")
    print("|---|---|---|")
    for name, t in rows.items():
        print(f"| {name} | {1e6 * t:.0f} | {t / rows['ddim']:.2f} |")


def bench_lora_merge(rank: int):
    """Merge a kohya LoRA of SD1.5's UNet + text attention/ff/proj modules at `rank` (fp16 on
    disk, as downloaded files are) into zero-filled SD1.5-shaped float32 weights."""
    from flax import traverse_util
    from safetensors.numpy import save_file

    from dynamicid_jax.base_models import sd15
    from dynamicid_jax.models.clip import CLIPTextModel
    from dynamicid_jax.models.lora_files import component_targets, merge_lora_file
    from dynamicid_jax.models.unet import UNet2DConditionModel, unet_abstract_params

    unet_shapes = unet_abstract_params(UNet2DConditionModel(sd15.unet_config()))
    text = CLIPTextModel(sd15.text_config())
    text_shapes = jax.eval_shape(lambda: text.init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32)))["params"]
    # np.zeros is lazily committed by the OS: only the merged leaves are really touched.
    zeros = lambda tree: traverse_util.unflatten_dict(  # noqa: E731
        {k: np.zeros(v.shape, np.float32) for k, v in traverse_util.flatten_dict(tree).items()})
    params = {"unet": zeros(unet_shapes), "text_encoder": zeros(text_shapes)}
    pattern = re.compile(r"(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2"
                         r"|q_proj|k_proj|v_proj|out_proj|fc1|fc2)$")
    rng = np.random.default_rng(0)
    flat = {c: traverse_util.flatten_dict(params[c]) for c in params}
    lora = {}
    for comp, targets in component_targets(params["unet"], params["text_encoder"]).items():
        for name, (path, _) in targets.items():
            if not pattern.search(name):
                continue
            kernel = flat[comp][path]
            fan_in, out = int(np.prod(kernel.shape[:-1])), kernel.shape[-1]
            stem = ("lora_unet_" if comp == "unet" else "lora_te_") + name.replace(".", "_")
            lora[stem + ".lora_down.weight"] = rng.standard_normal((rank, fan_in)).astype(np.float16)
            lora[stem + ".lora_up.weight"] = rng.standard_normal((out, rank)).astype(np.float16)
            lora[stem + ".alpha"] = np.asarray(rank / 2, np.float16)
    path = pathlib.Path(tempfile.mkdtemp()) / "style.safetensors"
    save_file(lora, str(path))
    size = path.stat().st_size / 2**20
    t0 = time.perf_counter()
    _, report = merge_lora_file(params, path, 0.8)
    seconds = time.perf_counter() - t0
    print(f"\n## Style LoRA merge, SD1.5 shapes (kohya, rank {rank}, fp16 file)\n")
    print("| file size (MiB) | modules merged (UNet / text) | merge time incl. read (s) |")
    print("|---|---|---|")
    print(f"| {size:.0f} | {report.merged['unet']} / {report.merged['text_encoder']} | {seconds:.2f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--lora_rank", type=int, default=128)
    p.add_argument("--skip_samplers", action="store_true")
    p.add_argument("--skip_lora", action="store_true")
    args = p.parse_args(argv)
    if not args.skip_samplers:
        bench_samplers(args.steps, args.repeats)
    bench_step_math(max(args.repeats, 5))
    if not args.skip_lora:
        bench_lora_merge(args.lora_rank)


if __name__ == "__main__":
    main()
