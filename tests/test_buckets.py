"""Aspect-ratio buckets: the geometry, precompute into buckets, one-bucket batches, the checks.

Nothing here compiles a model: the geometry is numpy, the shards are made with the stand-in
extractors (tests/_data_helpers.py) from the real test photos and small generated images, and
the trainer's per-bucket steps are checked with a stand-in compile. The whole file costs about
10 s of wall time on 2 busy cores (the shards; no XLA compile).

A real two-bucket training run is NOT tested here: each bucket's tiny step is a fresh
XLA compile (measured once by hand, the tiny anchor step at 64x64 + 64x48 for 6 steps: about
90 CPU-s for the two compiles, 3 min wall on the shared 2 cores; over this file's budget);
`BucketSteps` (which step a batch gets) and `abstract_batch` (the shapes each step is
lowered for) are what differs from a one-bucket run, and both are checked below.
"""

from __future__ import annotations

import dataclasses
import json
import math

import ml_collections
import numpy as np
import pytest
from PIL import Image

import _data_helpers as helpers
from dynamicid_jax.data import buckets, inputs, pipeline, records, shards
from dynamicid_jax.data.precompute import PrecomputeJob, run_precompute
from dynamicid_jax.errors import ConfigError

SIZES = ((16, 16), (16, 24))  # (height, width): square and 3:2 landscape, multiples of the stand-ins' VAE factor 8


# --------------------------------------------------------------------------- geometry (numpy only)


def test_parse_nearest_and_crop_geometry():
    assert buckets.parse("1024x1024, 1152x896,896x1152") == ((1024, 1024), (896, 1152), (1152, 896))
    assert buckets.format_sizes(((896, 1152), (1152, 896))) == "1152x896,896x1152"
    for bad, match in (("1024", "WIDTHxHEIGHT"), ("64x0", "side < 1"), ("64x48,64x48", "listed twice")):
        with pytest.raises(ConfigError, match=match):
            buckets.parse(bad)

    sdxl = buckets.parse("1024x1024,1152x896,896x1152,1216x832,832x1216")
    assert buckets.nearest(1000, 1000, sdxl) == 0
    assert buckets.nearest(600, 800, sdxl) == 1  # 4:3 landscape: log-distance 0.035 to 9:7, 0.26 to 1:1
    assert buckets.nearest(800, 600, sdxl) == 2
    assert buckets.nearest(500, 1000, sdxl) == 3  # 2:1: the widest bucket (19:13)
    # A square photo is as far from 4:3 as from 3:4: the bucket listed first wins.
    assert buckets.nearest(100, 100, ((48, 64), (64, 48))) == 0
    assert buckets.nearest(100, 100, ((64, 48), (48, 64))) == 0

    # Square bucket: shorter side to R, centre crop (the crop precompute made before buckets).
    assert buckets.crop_geometry(100, 200, (50, 50)) == (50, 100, 0, 25)
    assert buckets.crop_geometry(300, 100, (64, 64)) == (192, 64, 64, 0)
    # Landscape bucket of a wider photo: scale max(48/100, 64/200) = 0.48 -> 48 x 96, 16 px cut each side.
    assert buckets.crop_geometry(100, 200, (48, 64)) == (48, 96, 0, 16)
    # ... of a taller photo: scale max(48/100, 64/100) = 0.64 -> 64 x 64, 8 px cut top and bottom.
    assert buckets.crop_geometry(100, 100, (48, 64)) == (64, 64, 8, 0)

    # The family sets: SDXL's at its native size unchanged; fitted to the tiny 64 px in multiples of 4.
    from dynamicid_jax import base_models

    preset = base_models.get("sdxl").bucket_sizes
    assert buckets.scaled_preset(preset, 1024, 1024, 32) == preset
    tiny = buckets.scaled_preset(preset, 1024, 64, 4)
    assert tiny[:3] == ((64, 64), (56, 72), (72, 56))  # 896/16 = 56, 1152/16 = 72
    assert all(h % 4 == 0 and w % 4 == 0 for h, w in tiny)
    with pytest.raises(ConfigError, match="56x72 not multiples of 16"):
        buckets.check_multiple(tiny[2:3], 16, "--buckets")


def test_schedule_is_global_deterministic_and_resumable():
    one = buckets.Schedule([7], seed=3)
    assert [one(j) for j in range(5)] == [(0, j) for j in range(5)]  # no buckets: the plain stream

    schedule = buckets.Schedule([30, 10], seed=3, block=64)
    drawn = [schedule(j) for j in range(400)]
    for k in (0, 1):  # each bucket's batches take its stream's batches 0, 1, 2, ... in order
        assert [n for b, n in drawn if b == k] == list(range(sum(b == k for b, _ in drawn)))
    share = sum(b == 1 for b, _ in drawn) / len(drawn)
    assert abs(share - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 400)  # 10 / 40 of the records, within 5 sigma
    # A fresh schedule (another host, or a resumed run) asked at batch 333 first agrees.
    assert buckets.Schedule([30, 10], seed=3, block=64)(333) == drawn[333]
    assert [buckets.Schedule([30, 10], seed=4, block=64)(j) for j in range(400)] != drawn


def test_vae_crop_of_a_bucket_follows_the_geometry():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 90, 3), dtype=np.uint8)
    pixels, original, crop = inputs.vae_crop(image, (16, 24))
    nh, nw, top, left = buckets.crop_geometry(30, 90, (16, 24))
    assert pixels.shape == (16, 24, 3) and original == (30, 90) and crop == (top, left) == (0, 12)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR), np.float32)
    np.testing.assert_array_equal(pixels, resized[:16, 12:36] / 127.5 - 1.0)  # the same arithmetic: exact
    square, _, _ = inputs.vae_crop(image, 16)  # an int side is the square bucket
    np.testing.assert_array_equal(square, inputs.vae_crop(image, (16, 16))[0])


# --------------------------------------------------------------------------- precompute into buckets


def _sdxl_fields(ex):
    """The stand-ins with SDXL's per-record fields (original_size, crop_top_left)."""
    from dynamicid_jax import base_models

    sdxl = base_models.get("sdxl")
    return dataclasses.replace(ex, record_specs=tuple(sdxl.record_specs()), record_values=sdxl.record_values)


def test_precompute_into_two_buckets_on_real_photos(test_assets, tmp_path):
    """The anchor photos (portrait 5:4 / 2:1 / 1:1 / 9:16 ...) into a square and a 3:2 bucket."""
    src = helpers.make_anchor_folder(test_assets, tmp_path / "images")
    ex = _sdxl_fields(helpers.stand_in_extractors())
    out = tmp_path / "out"
    run_precompute(PrecomputeJob("anchor", src, out, num_shards=2, resolution=16, batch_size=2, progress=False,
                                 buckets=SIZES), ex)
    manifest = json.loads((out / shards.MANIFEST).read_text())
    assert manifest["buckets"]["sizes"] == [list(s) for s in SIZES]
    features = {s["name"]: s for s in manifest["features"]}
    assert features["vae_mean"]["shape"] == [2, 2, 4] and features["bucket"]["shape"] == []  # bucket 0's latents

    seen = {}
    per_bucket = pipeline.bucket_feature_specs(manifest)
    for shard in manifest["shards"]:
        index = shards.read_shard_index(out, shard["file"])
        assert shard["bucket_counts"] == [sum(r["bucket"] == k for r in index["records"]) for k in (0, 1)]
        for entry, payload in zip(index["records"], records.iter_records(out / shard["file"])):
            k = entry["bucket"]
            record = records.decode_example(per_bucket[k], payload)
            image = inputs.load_image(src / record["key"])
            h, w = image.shape[:2]
            # nearest by hand: |log(w/h) - log(bw/bh)| for 1:1 and 3:2
            want = int(abs(math.log(w / h) - math.log(1.5)) < abs(math.log(w / h)))
            assert int(record["bucket"]) == k == want, record["key"]
            bh, bw = SIZES[k]
            assert record["vae_mean"].shape == (bh // 8, bw // 8, 4)
            nh, nw, top, left = buckets.crop_geometry(h, w, SIZES[k])
            assert list(record["original_size"]) == [h, w] and list(record["crop_top_left"]) == [top, left]
            mean, _ = ex.encode_vae(inputs.vae_crop(image, SIZES[k])[0][None])
            np.testing.assert_array_equal(record["vae_mean"], mean[0])
            seen[record["key"]] = k
    assert manifest["buckets"]["counts"] == [sum(k == b for k in seen.values()) for b in (0, 1)]
    assert sorted(set(seen.values())) == [0, 1]  # both buckets hold photos (biden.jpg is 2.3:1, the frames 9:16)
    from dynamicid_jax.data.verify import verify_dataset

    assert verify_dataset(out)["ok"]  # --verify reads each record with its bucket's specs

    # Without buckets: no bucket feature, nothing about buckets in the manifest (the shards of before).
    plain = tmp_path / "plain"
    run_precompute(PrecomputeJob("anchor", src, plain, num_shards=2, resolution=16, batch_size=2, progress=False),
                   ex)
    manifest = json.loads((plain / shards.MANIFEST).read_text())
    assert "buckets" not in manifest and "buckets" not in manifest["settings"]
    assert "bucket" not in {s["name"] for s in manifest["features"]}
    assert all("bucket" not in r for r in shards.read_shard_index(plain, manifest["shards"][0]["file"])["records"])


def test_cli_bucket_flag_resolves_the_family_set():
    """--buckets=family: the family's set fitted to the resolution in sides the model takes."""
    import importlib.util
    import pathlib

    from dynamicid_jax.base_models import default_config

    path = pathlib.Path(__file__).resolve().parents[1] / "data_pipelines" / "precompute.py"
    spec = importlib.util.spec_from_file_location("precompute_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    tiny_xl = default_config(tiny=True, family="sdxl").model  # VAE factor 2, 2 UNet levels: multiples of 4
    assert cli._bucket_sizes("family", "sdxl", tiny_xl, 64, 2)[:3] == ((64, 64), (56, 72), (72, 56))
    tiny = default_config(tiny=True, family="sd15").model  # factor 8 and 2 UNet levels: multiples of 16
    # SD1.5's set / 8, to the nearest 16 (half to even): 56 = 3.5 x 16 and 72 = 4.5 x 16 both go to
    # 64 (kept once); 48, 80, 96 stay; 40 = 2.5 x 16 goes to 32.
    assert cli._bucket_sizes("family", "sd15", tiny, 64, 8) == ((64, 64), (48, 80), (80, 48), (32, 96), (96, 32))
    assert cli._bucket_sizes("family", "sd15", default_config().model, 512, 8) == (
        (512, 512), (448, 576), (576, 448), (384, 640), (640, 384), (320, 768), (768, 320))
    assert cli._bucket_sizes(None, "sd15", tiny, 64, 8) is None
    assert cli._bucket_sizes("64x48", "sd15", tiny, 64, 8) == ((48, 64),)
    with pytest.raises(ConfigError, match="--buckets 64x44: 64x44 not multiples of 8"):
        cli._bucket_sizes("64x44", "sd15", tiny, 64, 8)


# --------------------------------------------------------------------------- one bucket per batch


def _write(path, rng, h, w):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def bucketed_anchor(tmp_path_factory):
    """20 images, 12 square and 8 at 3:2, in 4 shards."""
    rng = np.random.default_rng(0)
    src = tmp_path_factory.mktemp("bucket_src")
    for i in range(20):
        _write(src / f"img{i:02d}.png", rng, 32, 48 if i % 5 < 2 else 32)
        (src / f"img{i:02d}.txt").write_text(f"caption {i}")
    out = tmp_path_factory.mktemp("bucket_shards")
    run_precompute(PrecomputeJob("anchor", src, out, num_shards=4, resolution=16, batch_size=4, progress=False,
                                 buckets=SIZES), helpers.stand_in_extractors())
    return out


def _batches(ds, start, stop):
    return [ds[j] for j in range(start, stop)]


def test_anchor_batches_hold_one_bucket_deterministic_and_resumable(bucketed_anchor):
    manifest = json.loads((bucketed_anchor / shards.MANIFEST).read_text())
    assert manifest["buckets"]["counts"] == [12, 8]
    ds = pipeline.anchor_dataset(bucketed_anchor, global_batch_size=2, seed=0, keep_strings=True)
    batches = _batches(ds, 0, 40)
    square = {f"img{i:02d}.png" for i in range(20) if i % 5 >= 2}
    for batch in batches:
        k = int(batch["bucket"][0])
        assert (batch["bucket"] == k).all()
        assert batch["vae_mean"].shape == (2, 2, 2 + k, 4)  # 16x16 -> 2x2 latents, 16x24 -> 2x3
        assert all((key in square) == (k == 0) for key in batch["key"])
    assert {int(b["bucket"][0]) for b in batches} == {0, 1}
    for k, n in ((0, 12), (1, 8)):  # each bucket's stream: every record once per epoch of the bucket
        keys = [key for b in batches if b["bucket"][0] == k for key in b["key"]][:n]
        assert len(set(keys)) == n
    again = pipeline.anchor_dataset(bucketed_anchor, global_batch_size=2, seed=0, keep_strings=True)
    assert [list(b["key"]) for b in _batches(again, 0, 40)] == [list(b["key"]) for b in batches]

    # Kill and resume: an iterator restored from the state after 7 batches gives batches 7, 8, ...
    with pipeline.GlobalBatchIterator(ds) as it:
        for _ in range(7):
            it.next_local()
        state = it.get_state()
    with pipeline.GlobalBatchIterator(pipeline.anchor_dataset(bucketed_anchor, global_batch_size=2, seed=0,
                                                              keep_strings=True)) as resumed:
        resumed.set_state(state)
        assert [list(resumed.next_local()["key"]) for _ in range(5)] == [list(b["key"]) for b in batches[7:12]]

    # Two hosts: disjoint files, the same bucket in every batch j (one global batch, one shape).
    hosts = [pipeline.anchor_dataset(bucketed_anchor, global_batch_size=2, seed=0, keep_strings=True,
                                     process_index=i, process_count=2) for i in range(2)]
    for j in range(20):
        a, b = hosts[0][j], hosts[1][j]
        assert a["vae_mean"].shape == b["vae_mean"].shape and a["bucket"][0] == b["bucket"][0]
        assert not set(a["key"]) & set(b["key"])


def test_reconfig_batches_hold_one_bucket(tmp_path):
    """Identities with images of both ratios: each example's source and targets share the batch's
    bucket; id1 has one wide image only, too few for an example of that bucket."""
    rng = np.random.default_rng(1)
    src = tmp_path / "ids"
    for identity, wide in (("id0", (1, 3, 5)), ("id1", (2,))):
        (src / identity).mkdir(parents=True)
        for j in range(6):
            _write(src / identity / f"{j}.png", rng, 32, 48 if j in wide else 32)
    out = tmp_path / "out"
    run_precompute(PrecomputeJob("reconfig", src, out, num_shards=1, resolution=16, batch_size=4, progress=False,
                                 buckets=SIZES), helpers.stand_in_extractors())
    manifest = json.loads((out / shards.MANIFEST).read_text())
    assert manifest["shards"][0]["bucket_identity_sizes"] == [[3, 5], [1, 3]]
    # Buckets weigh the records of identities with >= 2 images in them: 3 + 5 square, id0's 3 wide.
    assert pipeline._identity_weights(manifest, 2, out) == [8, 3]
    ds = pipeline.reconfig_dataset(out, global_batch_size=2, num_targets=2, seed=0, kdef_probability=0.0,
                                   keep_strings=True)
    kinds = set()
    for j in range(12):
        batch = ds[j]
        k = int(batch["source_bucket"][0])
        assert (batch["source_bucket"] == k).all() and (batch["target_bucket"] == k).all()
        assert batch["target_vae_mean"].shape == (2, 2, 2, 2 + k, 4)
        assert k == 0 or set(batch["source_identity"]) == {"id0"}
        kinds.add(k)
    assert kinds == {0, 1}
    with pytest.raises(ConfigError, match="no identity has 6 or more images in one aspect-ratio bucket"):
        pipeline.reconfig_dataset(out, global_batch_size=2, num_targets=2, seed=0, kdef_probability=0.0,
                                  min_images=6)


# --------------------------------------------------------------------------- training side


def _data_config(buckets_text="", resolution=16):
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict({"buckets": buckets_text, "resolution": resolution,
                                             "global_batch_size": 2})
    return config


def test_config_and_shards_must_name_the_same_buckets(bucketed_anchor):
    from dynamicid_jax.training import data

    data.check_buckets(bucketed_anchor, _data_config("16x16,24x16"))  # the shards' set: fine
    for text in ("", "16x16", "24x16,16x16"):  # none, a subset, another order (bucket indices differ)
        with pytest.raises(data.DataMismatchError) as e:
            data.check_buckets(bucketed_anchor, _data_config(text))
        message = str(e.value)
        assert "\n" not in message and "made with buckets 16x16,24x16" in message
        assert f"the config trains buckets {text or '16x16'}" in message
    with pytest.raises(ConfigError, match="--config.data.buckets"):
        buckets.config_sizes(_data_config("16by16").data)


def test_abstract_batches_and_step_per_bucket(bucketed_anchor):
    """The trainer lowers one step per bucket (`abstract_batch`) and hands each batch its own."""
    from dynamicid_jax.training import data, stages
    from dynamicid_jax.training.trainer import BucketSteps

    manifest = json.loads((bucketed_anchor / shards.MANIFEST).read_text())
    stage, config = stages.get("anchor"), _data_config("16x16,24x16")
    shapes = [data.abstract_batch(manifest, stage, config, k) for k in (0, 1)]
    assert shapes[0]["vae_mean"].shape == (2, 2, 2, 4) and shapes[1]["vae_logvar"].shape == (2, 2, 3, 4)
    assert shapes[1]["bucket"].shape == (2,) and "key" not in shapes[1]

    compiled = []
    steps = BucketSteps(lambda k: compiled.append(k) or f"step {k}", shapes, "step 0")
    ds = pipeline.anchor_dataset(bucketed_anchor, global_batch_size=2, seed=0)
    for j in range(12):
        batch = ds[j]
        step, _ = steps.for_batch(batch)
        assert step == f"step {int(batch['bucket'][0])}"
    assert compiled == [1]  # bucket 0 came compiled; bucket 1 compiled once, on its first batch
    with pytest.raises(ValueError, match="none of the dataset's buckets"):
        steps.for_batch({"vae_mean": np.zeros((2, 5, 5, 4), np.float32)})
