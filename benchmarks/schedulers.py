"""Per-sampler step cost of our sampling loop against DDIM and against diffusers'
StableDiffusionPipeline with the same scheduler (same run, same tiny random UNet + VAE), and
the time to merge a kohya-sized style LoRA into SD1.5-shaped weights.

  python benchmarks/schedulers.py                # tiny demo model, CPU: prints markdown tables
  python benchmarks/schedulers.py --steps 20 --repeats 3 --lora_rank 128

Step time = (time of an S-step call - time of a 1-step call) / (S - 1), so the VAE decode and
call overhead cancel. Ours: the jitted loop (compiled once for every sampler: the sampler is a
traced index); CFG batched (2 latents), identity branch off. Diffusers: the same UNet/VAE in
torch, float32, CPU threads as set by torch.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile
import time

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
    from dynamicid_jax import schedulers as S

    models = E.build_models(pathlib.Path(tempfile.mkdtemp()))
    ours = models["ours"]
    f = ours.modules.vae_scale_factor
    noise, key = ours.initial_noise(0, (1, E.SIZE // f, E.SIZE // f, 4))

    def run_ours(name, n):
        schedule = S.make_schedule(name, ours.scheduler, n)
        tokens = jnp.zeros((2, 1, ours.modules.face_projection.num_tokens, models["context"].shape[-1]))
        boxes = jnp.asarray([[[0.0, 0.0, 1.0, 1.0]]] * 2)
        out = ours._denoise(ours.params["unet"], ours.params["vae"], noise, jnp.asarray(models["context"]), tokens,
                            boxes, jnp.int32(S.sampler_index(name)), schedule, key, jnp.float32(5.0), jnp.int32(1),
                            jnp.float32(4.0), jnp.float32(0.0), jnp.float32(0.0), gating=False, use_boxes=False,
                            with_mix=False)
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
    rows = {}
    for name in S.SCHEDULERS:
        per_step = []
        for runner in (run_ours, run_theirs):
            runner(name, 2)  # warm-up
            long = _best(lambda: runner(name, steps), repeats)
            short = _best(lambda: runner(name, 1), repeats)
            per_step.append((long - short) / (steps - 1))
        rows[name] = per_step
    print(f"\n## Sampler step cost, tiny demo model ({E.SIZE} px, CFG), CPU, {steps}-step calls\n")
    print(f"One compile for all samplers: {compile_s:.1f} s.\n")
    print("| sampler | ours ms/step | vs our DDIM | diffusers ms/step | ours / diffusers |")
    print("|---|---|---|---|---|")
    ddim = rows["ddim"][0]
    for name, (o, d) in rows.items():
        print(f"| {name} | {1e3 * o:.2f} | {o / ddim:.3f} | {1e3 * d:.2f} | {o / d:.2f} |")


def bench_lora_merge(rank: int):
    """Merge a kohya LoRA of SD1.5's UNet + text attention/ff/proj modules at `rank` (fp16 on
    disk, as downloaded files are) into zero-filled SD1.5-shaped float32 weights."""
    from flax import traverse_util
    from safetensors.numpy import save_file

    from dynamicid_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from dynamicid_jax.models.lora_files import component_targets, merge_lora_file
    from dynamicid_jax.models.unet import UNet2DConditionModel, UNetConfig, unet_abstract_params

    unet_shapes = unet_abstract_params(UNet2DConditionModel(UNetConfig()))
    text = CLIPTextModel(CLIPTextConfig.sd15())
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
    args = p.parse_args(argv)
    if not args.skip_samplers:
        bench_samplers(args.steps, args.repeats)
    bench_lora_merge(args.lora_rank)


if __name__ == "__main__":
    main()
