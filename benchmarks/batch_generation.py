"""Batch generation throughput on CPU: one device vs 8 fake CPU devices, tiny random model.

    .venv/bin/python benchmarks/batch_generation.py [--images 32] [--steps 8] [--size 64] [--rounds 3]

The engine's own path (generation.BatchSampler over `ImageItem`s, no disk writes): 2
identities with boxes, CFG, DDIM, VAE decode. Rows:
  reference  batch 1 on one device (what `DynamicIDPipeline.generate` does per picture);
  batch B on one device;
  batch B split over 8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8).
Each row is compiled and warmed first; times are the median of --rounds over --images
pictures. Honest about CPU: 8 fake devices share the same cores, so they can only show that
the sharded path runs and what its overhead is, not a speed-up; that needs real devices
(benchmarks/gpu_session.sh).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--photos", default=os.environ.get("TEST_ASSETS", "test_assets"))
    args = p.parse_args()

    import jax

    from dynamicid_jax.batching import ImageItem
    from dynamicid_jax.generation import BatchSampler
    from dynamicid_jax.loading import load_pipeline
    from dynamicid_jax.request import IdentityRequest, SampleRequest

    _, pipe = load_pipeline(demo=True)
    photos = [os.path.join(args.photos, n) for n in ("obama.jpg", "biden.jpg")]
    items = [ImageItem(SampleRequest(
        identities=[IdentityRequest(refs=[photos[0]], box=[0, 0, 1, 0.5]), IdentityRequest(refs=[photos[1]], box=[0, 0.5, 1, 1])],
        prompt=f"two people, scene {i}", seed=i, steps=args.steps, height=args.size, width=args.size, alpha=2), 0)
        for i in range(args.images)]
    pipe.conditioning.prepare(items[0].request)  # faces and tokens are cached: time the denoising only
    for item in items:
        pipe.conditioning.prepare(item.request)

    rows = [("batch 1, 1 device (reference)", BatchSampler(pipe, 1, devices=jax.devices()[:1])),
            (f"batch {args.batch}, 1 device", BatchSampler(pipe, args.batch, devices=jax.devices()[:1])),
            (f"batch {args.batch}, {len(jax.devices())} fake devices", BatchSampler(pipe, args.batch))]
    results = []
    for name, sampler in rows:
        t0 = time.perf_counter()
        sampler(items[:sampler.batch_size])  # compile + first run
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for i in range(0, len(items), sampler.batch_size):
                sampler(items[i:i + sampler.batch_size])
            times.append(time.perf_counter() - t0)
        results.append((name, compile_s, args.images / statistics.median(times)))
    ref = results[0][2]
    print(f"\n## Batch generation on CPU ({os.cpu_count()} cores, {args.size} px, {args.steps} DDIM steps, "
          f"2 identities, CFG, tiny random model, {args.images} pictures, median of {args.rounds})\n")
    print("| path | compile + first batch (s) | images/s | vs reference |")
    print("|---|---|---|---|")
    for name, compile_s, rate in results:
        print(f"| {name} | {compile_s:.1f} | {rate:.2f} | {rate / ref:.2f}x |")


if __name__ == "__main__":
    main()
