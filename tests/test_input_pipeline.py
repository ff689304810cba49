"""Input pipeline: shards -> seeded shuffled batches -> global arrays on the 8 fake devices.

Datasets are precomputed with the stand-in extractors (tests/_data_helpers.py) from small
generated images: the pipeline reads whatever the shards hold, so no models are needed here.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

import _data_helpers as helpers
from processes import wait_for
from dynamicid_jax.data import pipeline, records, shards
from dynamicid_jax.data.precompute import PrecomputeJob, run_precompute

NUM_ANCHOR = 24
# identity -> number of images; the KDEF-named identities get source "kdef".
IDENTITY_SIZES = {"id0": 4, "id1": 5, "id2": 4, "id3": 1, "kdef_a": 4, "kdef_b": 4}
KDEF_CODES = ("AFS", "HAS", "SUHL", "NEFR", "SAS")


def _write_image(path, rng):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def anchor_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    src = tmp_path_factory.mktemp("anchor_src")
    for i in range(NUM_ANCHOR):
        _write_image(src / f"img{i:02d}.png", rng)
        (src / f"img{i:02d}.txt").write_text(f"caption {i}")
    out = tmp_path_factory.mktemp("anchor_shards")
    run_precompute(PrecomputeJob("anchor", src, out, num_shards=4, resolution=16, batch_size=4, progress=False),
                   helpers.stand_in_extractors())
    return out


@pytest.fixture(scope="module")
def reconfig_data(tmp_path_factory):
    rng = np.random.default_rng(1)
    src = tmp_path_factory.mktemp("reconfig_src")
    for identity, n in IDENTITY_SIZES.items():
        (src / identity).mkdir()
        for j in range(n):
            person = "01" if identity == "kdef_a" else "02"
            name = f"AF{person}{KDEF_CODES[j]}.JPG" if identity.startswith("kdef") else f"{j}.png"
            _write_image(src / identity / name, rng)
    out = tmp_path_factory.mktemp("reconfig_shards")
    run_precompute(PrecomputeJob("reconfig", src, out, num_shards=3, resolution=16, batch_size=4, progress=False),
                   helpers.stand_in_extractors())
    return out


def _keys(batches):
    return [k for b in batches for k in b["key"]]


# --------------------------------------------------------------------------- anchor


def test_hosts_read_disjoint_files_covering_the_dataset(anchor_data):
    manifest = shards.load_manifest(anchor_data, "anchor")
    files = [pipeline.host_shard_files(manifest, i, 2) for i in range(2)]
    assert not set(files[0]) & set(files[1])
    assert sorted(files[0] + files[1]) == sorted(s["file"] for s in manifest["shards"])
    keys = []
    for host in range(2):
        ds = pipeline.anchor_dataset(anchor_data, global_batch_size=2, seed=0, num_epochs=1, keep_strings=True,
                                     process_index=host, process_count=2)
        keys.append(_keys(ds[i] for i in range(len(ds))))
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == [f"img{i:02d}.png" for i in range(NUM_ANCHOR)]
    with pytest.raises(ValueError, match="4 shard file"):
        pipeline.host_shard_files(manifest, 0, 5)


def test_shuffle_is_a_seeded_permutation_per_epoch(anchor_data):
    def order(seed):
        ds = pipeline.anchor_dataset(anchor_data, global_batch_size=4, seed=seed, num_epochs=2, keep_strings=True,
                                     process_index=0, process_count=1)
        return _keys(ds[i] for i in range(len(ds)))

    keys = order(7)
    epoch1, epoch2 = keys[:NUM_ANCHOR], keys[NUM_ANCHOR:]
    assert sorted(epoch1) == sorted(epoch2) == [f"img{i:02d}.png" for i in range(NUM_ANCHOR)]
    assert epoch1 != epoch2  # reshuffled each epoch
    assert order(7) == keys and order(8) != keys


def test_iterator_state_restores_exactly_across_epochs(anchor_data):
    ds = pipeline.anchor_dataset(anchor_data, global_batch_size=8, seed=3, process_index=0, process_count=1)
    with pipeline.GlobalBatchIterator(ds, num_threads=2, prefetch=3) as it:
        for _ in range(5):  # 3 batches per epoch: the state lies in the second epoch
            it.next_local()
        state = it.get_state()
        expected = [it.next_local() for _ in range(4)]
    saved = json.loads(json.dumps(state))  # the state is plain JSON (checkpointable)
    with pipeline.GlobalBatchIterator(ds) as resumed:
        resumed.set_state(saved)
        got = [resumed.next_local() for _ in range(4)]
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def _stacked(specs, payloads):
    """The reference batch: every record through records.decode_example, then np.stack."""
    rows = [records.decode_example(specs, p) for p in payloads]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _host_source(folder, stage):
    manifest = shards.load_manifest(folder, stage)
    return pipeline.ShardRecordSource(folder, pipeline.host_shard_files(manifest, 0, 1)), records.specs_from_json(
        manifest["features"])


def test_anchor_batch_j_is_records_jb_to_jb_plus_b_of_the_shuffled_stream(anchor_data):
    """Batches decoded straight into batch arrays equal the per-record decode + stack, in the
    order of the shuffled element stream (the order grain's .batch gave: saved states resume)."""
    source, specs = _host_source(anchor_data, "anchor")
    order = pipeline.EpochPermutation(len(source), seed=3)
    ds = pipeline.anchor_dataset(anchor_data, global_batch_size=8, seed=3, keep_strings=True, process_index=0,
                                 process_count=1)
    for j in (0, 2, 3, 7):  # 3 batches per epoch: 3 and 7 lie in later epochs
        expected = _stacked(specs, [source[order(i)] for i in range(8 * j, 8 * j + 8)])
        got = ds[j]
        assert got.keys() == expected.keys()
        for k in expected:
            assert got[k].dtype == expected[k].dtype and got[k].shape == expected[k].shape, k
            np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
            if got[k].dtype.kind != "U":
                assert got[k].flags.writeable and got[k].flags.c_contiguous, k
    assert ds[0]["vae_mean"] is not ds[0]["vae_mean"]  # fresh arrays every time
    source.close()


def test_batch_decoder_refuses_bad_records(anchor_data):
    source, specs = _host_source(anchor_data, "anchor")
    decode = pipeline.BatchDecoder(specs)
    good = source[0]
    short = [records.FeatureSpec(s.name, (2, 2, 2), s.dtype) if s.name == "vae_mean" else s for s in specs]
    values = records.decode_example(specs, good)
    wrong_size = records.encode_example(short, {**values, "vae_mean": np.zeros((2, 2, 2), np.float32)})
    with pytest.raises(records.RecordFormatError, match=r"'vae_mean': 64 bytes, expected 32"):
        pipeline.BatchDecoder(short)([good])
    with pytest.raises(records.RecordFormatError, match=r"'vae_mean': 32 bytes, expected 64"):
        decode([good, wrong_size])
    missing = records.encode_example([s for s in specs if s.name != "caption"],
                                     {k: v for k, v in values.items() if k != "caption"})
    with pytest.raises(records.RecordFormatError, match="record lacks feature 'caption'"):
        decode([missing])
    with pytest.raises(ValueError, match="do not fill a batch of shape"):
        decode([good, good, good], (2, 2))
    source.close()


class _Recording:
    """A batched dataset that records which batches were read (from the iterator's threads)."""

    def __init__(self, dataset, fail_at=None):
        self.dataset, self.fail_at, self.read = dataset, fail_at, []
        self._lock = threading.Lock()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, j):
        with self._lock:
            self.read.append(j)
        if j == self.fail_at:
            raise OSError(f"disk error reading batch {j}")
        return self.dataset[j]


def test_placed_prefetch_keeps_the_consumed_position_exact(anchor_data):
    """Batches read and placed ahead by the threads are not part of the state: it is the
    position after what next() returned; a resume from it, or a set_state back, is exact."""
    import jax

    from dynamicid_jax.sharding import batch_sharding, make_mesh

    mesh = make_mesh(4, 2)
    ds = pipeline.anchor_dataset(anchor_data, global_batch_size=8, seed=1, process_index=0, process_count=1)
    recording = _Recording(ds)
    with pipeline.GlobalBatchIterator(recording, mesh, num_threads=2, prefetch=3) as it:
        got = [next(it) for _ in range(4)]
        assert wait_for(lambda: max(recording.read) == 6)  # batches 4, 5, 6 read ahead
        state = it.get_state()
        assert state == {"next_index": 4}
        for j, batch in enumerate(got):
            for name, array in batch.items():
                assert isinstance(array, jax.Array) and array.is_fully_addressable
                assert array.sharding.is_equivalent_to(batch_sharding(mesh), array.ndim)
                np.testing.assert_array_equal(np.asarray(array), ds[j][name])
        it.set_state({"next_index": 1})  # back: the read-ahead batches are dropped
        np.testing.assert_array_equal(np.asarray(next(it)["vae_mean"]), ds[1]["vae_mean"])
        assert it.get_state() == {"next_index": 2}
    with pipeline.GlobalBatchIterator(ds, mesh, prefetch=3) as resumed:
        resumed.set_state(json.loads(json.dumps(state)))
        for j in (4, 5):
            batch = next(resumed)
            for name in batch:
                np.testing.assert_array_equal(np.asarray(batch[name]), ds[j][name])


def test_iterator_errors_end_and_modes(anchor_data):
    ds = pipeline.anchor_dataset(anchor_data, global_batch_size=8, seed=0, num_epochs=1, process_index=0,
                                 process_count=1)
    with pipeline.GlobalBatchIterator(_Recording(ds, fail_at=1), prefetch=2) as it:
        it.next_local()
        with pytest.raises(OSError, match="disk error reading batch 1"):
            it.next_local()
        assert it.get_state() == {"next_index": 1}  # the failed batch was not consumed
    with pipeline.GlobalBatchIterator(ds, prefetch=5) as it:  # a finite dataset ends with StopIteration
        assert len([it.next_local() for _ in range(len(ds))]) == 3
        with pytest.raises(StopIteration):
            it.next_local()
        assert it.get_state() == {"next_index": 3}
        with pytest.raises(ValueError, match="outside the dataset's 3 batches"):
            it.set_state({"next_index": 4})
        with pytest.raises(ValueError, match="use next_local"):
            next(it)
    from dynamicid_jax.sharding import make_mesh

    with pipeline.GlobalBatchIterator(ds, make_mesh(4, 2)) as it:
        with pytest.raises(ValueError, match="places its batches on the mesh"):
            it.next_local()
    it.close()  # closing twice is harmless
    with pytest.raises(ValueError, match="closed"):
        next(it)


def test_trainer_logs_the_input_stall_and_saves_the_consumed_position(tmp_path, monkeypatch, capsys):
    """Through the trainer: an input that is late by `delay` per batch shows in the logged
    input_share (the loop waits for it with the devices idle), and every checkpoint holds the
    position after the batches its steps consumed, not after what the threads read ahead."""
    import orbax.checkpoint as ocp

    import train_data
    from configs import anchor as anchor_configs
    from dynamicid_jax import modeling
    from dynamicid_jax.training import checkpoints, data, stages, trainer

    delay, read = 0.05, []

    class Late(pipeline.GlobalBatchIterator):
        def _read(self, index):
            read.append(index)
            return super()._read(index)

        def __next__(self):
            time.sleep(delay)
            return super().__next__()

    monkeypatch.setattr(pipeline, "GlobalBatchIterator", Late)
    config = anchor_configs.get_config(train_data.CONFIG_ARG)
    # tests/test_train.py's step (same model, shapes, schedule, XLA options): its compiled executable is reused.
    config.total_steps, config.checkpoint.every_steps, config.checkpoint.keep = 6, 2, 5
    config.progress_bar, config.log_every_steps = False, 3
    specs = data.expected_features(stages.get("anchor"), modeling.build_modules(config.model), config)
    folder = train_data.write_dataset(tmp_path / "shards", "anchor", specs, units=16,
                                      null_specs=train_data.null_specs_for(specs))
    trainer.train(config, tmp_path / "run", folder, stage="anchor")
    windows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [w["step"] for w in windows] == [3, 6]
    for w in windows:
        waited = w["input_share"] * 3 / w["steps_per_second"]  # seconds in next() over the window's 3 steps
        # The stall shows: at least the 3 sleeps. No upper bound in seconds (a loaded machine
        # slows next() too: 1.44 s measured once for 0.15 s of sleeps); counting the steps
        # themselves as input time would put the share near 1.
        assert waited >= 3 * delay and w["input_share"] < 0.9, w
    assert max(read) >= 6  # the threads had read past the last consumed batch (5)
    mngr = checkpoints.manager(tmp_path / "run", every_steps=2, keep=5, async_save=False)
    try:
        for step in (2, 4, 6):
            saved = mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
            assert saved == {"next_index": step}
    finally:
        mngr.close()


def test_global_batches_are_sharded_over_data_and_fsdp(anchor_data):
    import jax

    from dynamicid_jax.sharding import batch_sharding, make_mesh

    mesh = make_mesh(4, 2)
    ds = pipeline.anchor_dataset(anchor_data, global_batch_size=8, seed=0, process_index=0, process_count=1)
    with pipeline.GlobalBatchIterator(ds, mesh) as it:
        batch = next(it)
    local = ds[0]
    assert set(batch) == {"input_ids", "vae_mean", "vae_logvar", "id_embedding", "clip_image_features"}
    for name, array in batch.items():
        assert isinstance(array, jax.Array) and array.shape == local[name].shape and array.shape[0] == 8
        assert array.sharding.is_equivalent_to(batch_sharding(mesh), array.ndim)
        assert len(array.addressable_shards) == 8
        assert {s.data.shape[0] for s in array.addressable_shards} == {1}  # one row per device
        assert array.dtype == local[name].dtype  # float16 CLIP features stay float16
        np.testing.assert_array_equal(np.asarray(array), local[name])


def test_manifest_mismatch_is_refused_naming_it(anchor_data, tmp_path):
    manifest = shards.load_manifest(anchor_data, "anchor")
    specs = records.specs_from_json(manifest["features"])
    wrong = [records.FeatureSpec(s.name, (4, 4, 4), s.dtype) if s.name == "vae_mean" else s for s in specs]
    with pytest.raises(shards.ManifestError, match=r"vae_mean: found float32\[2, 2, 4\], expected float32\[4, 4, 4\]"):
        pipeline.anchor_dataset(anchor_data, global_batch_size=2, seed=0, expected_features=wrong,
                                process_index=0, process_count=1)
    pipeline.anchor_dataset(anchor_data, global_batch_size=2, seed=0, expected_features=specs,
                            process_index=0, process_count=1)
    with pytest.raises(shards.ManifestError, match="stage 'anchor', expected 'reconfig'"):
        pipeline.reconfig_dataset(anchor_data, global_batch_size=2, num_targets=2, seed=0, process_index=0,
                                  process_count=1)
    copy = tmp_path / "old"
    shutil.copytree(anchor_data, copy)
    (copy / shards.MANIFEST).write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(shards.ManifestError, match="format_version 0"):
        pipeline.anchor_dataset(copy, global_batch_size=2, seed=0, process_index=0, process_count=1)


def test_null_features_load(anchor_data):
    null = pipeline.load_null_features(anchor_data)
    ex = helpers.stand_in_extractors()
    np.testing.assert_array_equal(null["input_ids"], ex.tokenize([""])[0])
    np.testing.assert_array_equal(null["clip_image_features"],
                                  ex.encode_clip_pixels(np.zeros((1, 8, 8, 3), np.float32))[0].astype(np.float16))


# --------------------------------------------------------------------------- reconfig


def test_reconfig_examples_hold_one_identity(reconfig_data):
    ds = pipeline.reconfig_dataset(reconfig_data, global_batch_size=2, num_targets=3, seed=0, kdef_probability=0.5,
                                   keep_strings=True, process_index=0, process_count=1)
    batches = [ds[i] for i in range(20)]
    b = batches[0]
    assert b["source_vae_mean"].shape == (2, 2, 2, 4) and b["target_vae_mean"].shape == (2, 3, 2, 2, 4)
    assert b["target_landmark_image"].shape == (2, 3, 96, 96, 1)
    sources = []
    for batch in batches:
        for i in range(2):
            identity = batch["source_identity"][i]
            assert set(batch["target_identity"][i]) == {identity}
            assert identity != "id3"  # one image: fewer than min_images, left out
            assert batch["source_key"][i] not in set(batch["target_key"][i])  # >= 4 images: no repeats
            assert len(set(batch["target_key"][i])) == 3
            sources.append(batch["source_source"][i])
    assert 0.2 < sources.count("kdef") / len(sources) < 0.8
    only_multi = pipeline.reconfig_dataset(reconfig_data, global_batch_size=2, num_targets=3, seed=0,
                                           kdef_probability=0.0, keep_strings=True, process_index=0, process_count=1)
    assert {s for i in range(10) for s in only_multi[i]["source_source"]} == {"multi"}


def test_reconfig_batch_j_is_examples_jb_to_jb_plus_b(reconfig_data):
    """Each example's source and targets decoded into the batch equal the per-record decode."""
    source, specs = _host_source(reconfig_data, "reconfig")
    draw = pipeline._DrawIdentityExample(pipeline.identity_pools(source, 2), 3, 0.3, 4)
    ds = pipeline.reconfig_dataset(reconfig_data, global_batch_size=2, num_targets=3, seed=4, kdef_probability=0.3,
                                   keep_strings=True, process_index=0, process_count=1)
    for j in (0, 5):
        examples = []
        for i in (2 * j, 2 * j + 1):
            rows = [records.decode_example(specs, source[int(r)]) for r in draw(i)]
            example = {f"source_{k}": np.asarray(v) for k, v in rows[0].items()}
            example.update({f"target_{k}": np.stack([r[k] for r in rows[1:]]) for k in rows[0]})
            examples.append(example)
        got = ds[j]
        assert list(got) == list(examples[0])
        for k in got:
            expected = np.stack([e[k] for e in examples])
            assert got[k].shape == expected.shape and got[k].dtype.kind == expected.dtype.kind, k
            np.testing.assert_array_equal(got[k], expected, err_msg=k)
            assert got[k].flags.c_contiguous, k
    source.close()


def test_reconfig_state_restores_exactly(reconfig_data):
    ds = pipeline.reconfig_dataset(reconfig_data, global_batch_size=2, num_targets=2, seed=5, kdef_probability=0.3,
                                   process_index=0, process_count=1)
    with pipeline.GlobalBatchIterator(ds) as it:
        for _ in range(3):
            it.next_local()
        state = it.get_state()
        expected = [it.next_local() for _ in range(3)]
    with pipeline.GlobalBatchIterator(ds) as resumed:
        resumed.set_state(state)
        for a in expected:
            b = resumed.next_local()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_reconfig_pools_and_missing_pool_error(reconfig_data):
    manifest = shards.load_manifest(reconfig_data, "reconfig")
    source = pipeline.ShardRecordSource(reconfig_data, [s["file"] for s in manifest["shards"]])
    pools = pipeline.identity_pools(source, min_images=2)
    assert pools.identities == {"multi": ["id0", "id1", "id2"], "kdef": ["kdef_a", "kdef_b"]}
    assert pools.too_small == ["id3"]
    source.close()
    # Host 0 of 3 reads only the first shard (id0, id1): no KDEF identities there.
    with pytest.raises(ValueError, match="kdef_probability=0.05 but no 'kdef' identities"):
        pipeline.reconfig_dataset(reconfig_data, global_batch_size=3, num_targets=2, seed=0,
                                  process_index=0, process_count=3)
