"""DynamicID on SDXL, on the tiny SDXL (`configs/anchor.py:tiny_sdxl`): precompute, then the
anchor trainer on those shards.

One dataset serves every test: real photos through the SDXL precompute (the tiny random SDXL
VAE and both tokenizers, offline face analysis). Two compiled programs, each once: the anchor
step on the 8-device fsdp mesh (compiled by the in-process reference run and reused in
memory by the other tests; the killed subprocess run loads it from the persistent compile
cache), and the step on one device with two accumulated micro-batches and remat on. Costs
(2 cores shared with 5 other jobs, cold) are stated per test.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

import _data_helpers as helpers
import processes
import train_data
from configs import anchor as anchor_configs
from dynamicid_jax import base_models, cli, modeling, sharding
from dynamicid_jax.data import inputs, records, shards
from dynamicid_jax.data.precompute import PrecomputeJob, run_precompute
from dynamicid_jax.training import data, init, partition, stages, trainer
from dynamicid_jax.training.step import init_state
from parity import assert_updates_close, assert_updates_differ

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, EVERY = 4, 2
SDXL = base_models.get("sdxl")


def sdxl_config(**overrides):
    config = anchor_configs.get_config("tiny_sdxl")
    config.total_steps, config.checkpoint.every_steps, config.checkpoint.keep = STEPS, EVERY, 5
    config.progress_bar = False
    for key, value in overrides.items():
        config.optimizer[key] = value
    return config


# Flags giving launch/train.py exactly sdxl_config().
FLAGS = [f"--config.total_steps={STEPS}", f"--config.checkpoint.every_steps={EVERY}", "--config.checkpoint.keep=5",
         "--config.progress_bar=False"]


@pytest.fixture(scope="module")
def modules():
    return modeling.build_modules(sdxl_config().model)


@pytest.fixture(scope="module")
def photos(test_assets, tmp_path_factory):
    return helpers.make_anchor_folder(test_assets, tmp_path_factory.mktemp("sdxl_photos") / "images")


@pytest.fixture(scope="module")
def sdxl_shards(photos, tmp_path_factory):
    """The SDXL precompute at the tiny SDXL's native 64 px, in two runs (the first stops after
    one of its 2 shards, the rerun resumes), and an uninterrupted run for comparison."""
    from dynamicid_jax.data.extractors import build_extractors

    model = base_models.default_config(tiny=True, family="sdxl").model
    ex = build_extractors(faces="default", tiny_model_config=model, need_expression=False)
    job = dict(num_shards=2, resolution=base_models.native_resolution(model), batch_size=2, progress=False)
    out = tmp_path_factory.mktemp("sdxl_shards")
    assert not run_precompute(PrecomputeJob("anchor", photos, out, max_shards=1, **job), ex)["finalized"]
    assert run_precompute(PrecomputeJob("anchor", photos, out, **job), ex)["shards_skipped"] == 1
    whole = tmp_path_factory.mktemp("sdxl_whole")
    run_precompute(PrecomputeJob("anchor", photos, whole, **job), ex)
    return out, whole, ex


def test_sdxl_precompute_records_both_tokenizers_and_the_crop(sdxl_shards, photos):
    """Cost: ~30 s (the tiny SDXL VAE, text and vision towers compile; three small runs)."""
    out, whole, ex = sdxl_shards
    assert helpers.read_shard_bytes(out) == helpers.read_shard_bytes(whole)  # resumed == uninterrupted
    manifest = json.loads((out / shards.MANIFEST).read_text())
    assert manifest["models"]["family"] == "sdxl"
    assert manifest["models"]["vae_scaling_factor"] == base_models.default_config(tiny=True, family="sdxl")[
        "model"]["vae"]["scaling_factor"]
    specs = records.specs_from_json(manifest["features"])
    rows = [records.decode_example(specs, p) for s in manifest["shards"] for p in records.iter_records(out / s["file"])]
    assert sorted(r["key"] for r in rows) == sorted(helpers.FACE_PHOTOS)
    first, second = SDXL.tiny_tokenizer()
    for row in rows:
        image = inputs.load_image(photos / row["key"])
        h, w = image.shape[:2]
        np.testing.assert_array_equal(row["original_size"], [h, w])
        # the center crop of the image resized so that its shorter side is 64
        side = min(h, w)
        expected = [(max(64, round(h * 64 / side)) - 64) // 2, (max(64, round(w * 64 / side)) - 64) // 2]
        np.testing.assert_array_equal(row["crop_top_left"], expected)
        assert row["input_ids"].shape == (2, 77)
        ids_1, ids_2 = row["input_ids"]
        caption = row["caption"]
        np.testing.assert_array_equal(ids_1, first([caption])[0])
        np.testing.assert_array_equal(ids_2, second([caption])[0])
        assert ids_1[-1] == first.pad_id != second.pad_id == ids_2[-1]  # each pads with its own token
    assert any(r["crop_top_left"].any() for r in rows)  # some photo is not square


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, sdxl_shards):
    """The uninterrupted run on the fsdp-8 mesh (in-process, through the trainer) -> (workdir,
    last metrics, its compiled step (compiled, abstract state, abstract fixed, mesh, tx))."""
    workdir = tmp_path_factory.mktemp("sdxl_run")
    metrics, step = train_data.train_keeping_step(sdxl_config(), workdir, sdxl_shards[0])
    return workdir, metrics, step


def _one_step(stepper, config, params, folder, modules, batch):
    compiled, abs_state, abs_fixed, mesh, tx = stepper
    trainable, frozen, model_state = params
    state = jax.jit(lambda t, m: init_state(t, m, tx, config.seed),
                    out_shardings=jax.tree.map(lambda a: a.sharding, abs_state))(trainable, model_state)
    manifest = data.check_dataset(folder, stages.get("anchor"), modules, config)
    fixed = jax.device_put({"params": frozen, "constants": {"null": data.null_features(folder, manifest)}},
                           jax.tree.map(lambda a: a.sharding, abs_fixed))
    new_state, metrics = compiled(state, fixed, jax.device_put(batch, sharding.batch_sharding(mesh)))
    return traverse_util.flatten_dict(jax.device_get(new_state.trainable)), jax.device_get(metrics)


def test_sdxl_sharded_step_equals_one_device_with_accumulation_and_remat(reference_run, sdxl_shards, modules):
    """One update from the same state and batch: the fsdp-8 step of the reference run (no
    accumulation, no remat) against one device with 2 accumulated micro-batches and remat per
    transformer block. Sharding, accumulation and remat each leave the update equal up to
    float32 reduction order, so one comparison covers the three (a break in any one fails
    it). Cost: one compile of the tiny SDXL step (measured 2-4 min on the shared 2 cores)."""
    folder = sdxl_shards[0]
    config = sdxl_config()
    batch = data.dataset(folder, stages.get("anchor"), modules, config)[0]
    params = partition.split_params(init.initial_params(stages.get("anchor"), config, modules), stages.get("anchor"))
    start = traverse_util.flatten_dict(jax.device_get(params[0]))
    fsdp8 = reference_run[2]
    ref, m8 = _one_step(fsdp8, config, params, folder, modules, batch)
    accumulated = sdxl_config(accumulation_steps=2)
    remat_modules = modeling.build_modules(accumulated.model, remat=True)
    one_device = train_data.compile_anchor_step(remat_modules, accumulated, folder, jax.devices()[:1])
    acc, m2 = _one_step(one_device, accumulated, params, folder, remat_modules, batch)
    # The loss is a mean over rows, reduced in another order (devices, micro-batches): a few
    # float32 epsilons (6e-8) of it; remat recomputes the same float32 operations.
    assert abs(m2["loss"] - m8["loss"]) <= 1e-5 * abs(m8["loss"])
    moved = [p for p in ref if not np.array_equal(ref[p], start[p])]
    assert len(moved) > 0.5 * len(ref)  # the step really updated most leaves
    # Updates compared, within tests/parity.py's derived bound; a learning rate 10% off fails it.
    assert_updates_close(acc, ref, start, "tiny SDXL: fsdp8 vs one device, 2 micro-batches, remat")
    wrong_lr = {p: start[p] + 1.1 * (ref[p] - start[p]) for p in ref}
    assert_updates_differ(acc, wrong_lr, start, "tiny SDXL: learning rate 10% off")

    # The micro-conditioning reaches the UNet: halved original sizes change the loss. Same
    # program and draws, so without an effect the loss would be bit-identical; 16 float32
    # epsilons (1e-6) separate an effect from none (measured: 1.2e-5 on the tiny random SDXL,
    # whose time embedding is a small part of its prediction).
    moved_size = dict(batch, original_size=batch["original_size"] // 2)
    _, m_size = _one_step(fsdp8, config, params, folder, modules, moved_size)
    assert abs(m_size["loss"] - m8["loss"]) > 1e-6 * abs(m8["loss"])


def test_sdxl_kill_and_resume_matches_uninterrupted(tmp_path, sdxl_shards, reference_run, modules):
    """SIGKILL a launch/train.py run after its step-2 checkpoint, resume it in-process: the
    parameters equal the uninterrupted run's bit for bit. Cost: one subprocess start (imports,
    the step from the persistent cache, 2 steps) and an in-process resume (the compiled step in
    memory)."""
    folder = sdxl_shards[0]
    workdir = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), "--stage=anchor",
                             "--config=configs/anchor.py:tiny_sdxl", f"--data={folder}", f"--workdir={workdir}",
                             *FLAGS], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    processes.kill_once_saved(proc, workdir / "checkpoints" / str(EVERY), timeout=600)
    assert not (workdir / "checkpoints" / str(STEPS)).exists()
    assert train_data.finish_in_process(reference_run[2][:3], sdxl_config(), workdir, folder)["step"] == STEPS
    reference = train_data.assert_same_trained_params(workdir, reference_run[0], modules)
    assert "text_encoder_2" in {p[0] for p in reference}  # SDXL's second encoder is part of the run


def test_shards_of_another_family_are_refused(sdxl_shards, tmp_path, capsys):
    """SD1.5 training on SDXL shards and SDXL training on SD1.5-named shards: one line naming
    both families, exit 2, no workdir. Cost: < 1 s (refused before anything compiles)."""
    folder = sdxl_shards[0]
    sd15 = anchor_configs.get_config("tiny")
    capsys.readouterr()
    assert cli.run_main(trainer.train, sd15, tmp_path / "run", folder, stage="anchor") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shards of the sdxl base-model family; this run trains sd15" in err[0], err
    assert not (tmp_path / "run").exists()
    import shutil

    relabelled = pathlib.Path(shutil.copytree(folder, tmp_path / "sd15_named"))
    manifest = json.loads((relabelled / shards.MANIFEST).read_text())
    del manifest["models"]["family"]  # shards written before the family was recorded are SD1.5's
    (relabelled / shards.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(data.DataMismatchError, match="sd15 base-model family; this run trains sdxl"):
        data.check_dataset(relabelled, stages.get("anchor"), modeling.build_modules(sdxl_config().model),
                           sdxl_config())


def test_sdxl_story_from_the_anchor_run(reference_run, test_assets, tmp_path, capsys, monkeypatch):
    """`make tiny-run BASE=sdxl` from stage 2 on (tests/tiny_story.py, as the SD1.5 story runs
    it): the test photos' identity folders -> SDXL identity shards (precompute.py --family=sdxl)
    -> train.py --stage=reconfig with configs/reconfig.py:tiny_sdxl from the reference run ->
    sample.py (two people, one edit) -> evaluate.py's report. Stage 1 is the reference run (the
    anchor trainer on these SDXL shards; the kill-and-resume test shows launch/train.py reaches
    the same parameters), so the story adds no second SDXL precompute and anchor compile.
    Cost: 228 CPU-s in a cold `make test` (tests/cpu_profile.py), most of it the stage-2 SDXL
    step (compiled nowhere else) and the sampling and evaluation programs, which
    tests/test_dynamicid_sdxl_run.py then finds in the persistent cache."""
    import tiny_story
    from data_pipelines import photo_folders

    inputs = tmp_path / "inputs"
    assert photo_folders.main(["--photos", str(test_assets), "--out", str(inputs)]) == 0
    tiny_story.stage2_to_report("sdxl", inputs, reference_run[0], tmp_path, test_assets, capsys, monkeypatch)
