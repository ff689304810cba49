"""Small synthetic precomputed datasets for the training tests, written with the data
package's own writer (records + shards), so the trainer reads them exactly as real shards;
and how those tests finish an interrupted run and compare it with an uninterrupted one."""

from __future__ import annotations

import contextlib
import pathlib

import numpy as np

from dynamicid_jax.data import records, shards

# The trainer-mechanics tests' config (tests/test_train*.py): configs/anchor.py's tiny run (the
# tiny model, as tests/test_tiny_run.py's). In-process runs take get_config(CONFIG_ARG),
# subprocess runs CONFIG_FLAG: the same programs, shared through the persistent compile cache.
CONFIG_ARG = "tiny"
CONFIG_FLAG = f"--config=configs/anchor.py:{CONFIG_ARG}"


def _values(spec: records.FeatureSpec, rng: np.random.Generator, vocab: int, text: str):
    if spec.dtype == records.STRING:
        return text
    if spec.name == "input_ids":
        return rng.integers(0, vocab - 1, spec.shape).astype(np.int32)
    if spec.name == "vae_logvar":
        return np.full(spec.shape, -4.0, np.float32) + 0.1 * rng.standard_normal(spec.shape).astype(np.float32)
    if spec.name == "id_embedding":
        v = rng.standard_normal(spec.shape)
        return (v / np.linalg.norm(v)).astype(np.float32)
    if spec.name == "landmark_image":
        img = -np.ones(spec.shape, np.float32)
        img[tuple(rng.integers(0, spec.shape[0], (2, 106)))] = 1.0
        return img
    return rng.standard_normal(spec.shape).astype(spec.dtype)


def write_dataset(folder, stage: str, specs, *, units, null_specs=None, models=None, seed: int = 0,
                  vocab: int = 1000, num_shards: int = 2, edit=None, bucket_sizes=None) -> pathlib.Path:
    """units: anchor -> number of records; reconfig -> {identity: (source, n_images)}.

    bucket_sizes: aspect-ratio buckets ((height, width), ...; `specs` are bucket 0's, with a
    `bucket` feature): record i goes to bucket i % len(bucket_sizes), latents of its size.

    edit: optional (key, values) -> values applied to each record after its values are drawn
    (the draws, hence every other record, stay the same as without it)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if stage == "anchor":
        items = [[{"key": f"img{i}.png", "caption": "a photo"}] for i in range(units)]
    else:
        items = [[{"key": f"{name}/{j}.png", "identity": name, "source": src, "face_prompt": "a face"}
                  for j in range(n)] for name, (src, n) in sorted(units.items())]
    run_config = {"stage": stage, "num_shards": num_shards, "num_inputs": sum(len(u) for u in items),
                  "inputs_sha256": "synthetic", "features": records.specs_to_json(specs),
                  "models": models or {"kind": "synthetic"}, "settings": {}}
    per_bucket = [specs]
    if bucket_sizes is not None:
        run_config["settings"]["buckets"] = [list(size) for size in bucket_sizes]
        f = bucket_sizes[0][0] // next(s for s in specs if s.name == "vae_mean").shape[0]
        per_bucket = [records.with_latent_hw(specs, (h // f, w // f)) for h, w in bucket_sizes]
    if stage == "anchor":
        run_config["null_features"] = records.specs_to_json(null_specs)
        values = {s.name: _values(s, rng, vocab, "") for s in null_specs}
        with open(folder / shards.NULL_FEATURES, "wb") as f:
            records.write_record(f, records.encode_example(null_specs, values))
    shards.check_or_write_run_config(folder, run_config)
    index_fields = ("key",) if stage == "anchor" else ("key", "identity", "source")
    n = 0
    for i, (start, stop) in enumerate(shards.shard_slices(len(items), num_shards)):
        with shards.AtomicShardWriter(folder, shards.shard_name(stage, i, num_shards)) as writer:
            for unit in items[start:stop]:
                for info in unit:
                    k, n = n % len(per_bucket), n + 1
                    values = {s.name: info[s.name] if s.dtype == records.STRING else _values(s, rng, vocab, "")
                              for s in per_bucket[k]}
                    index = {f: info[f] for f in index_fields}
                    if bucket_sizes is not None:
                        values["bucket"], index["bucket"] = np.asarray(k, np.int32), k
                    if edit is not None:
                        values = edit(info["key"], values)
                    writer.write(records.encode_example(per_bucket[k], values), **index)
            writer.commit()
    shards.finalize_dataset(folder)
    return folder


def null_specs_for(specs):
    by_name = {s.name: s for s in specs}
    out = [records.FeatureSpec("input_ids", by_name["input_ids"].shape, "int32"),
           records.FeatureSpec("clip_image_features", by_name["clip_image_features"].shape, "float16")]
    if "text_states" in by_name:
        out.append(records.FeatureSpec("text_states", by_name["text_states"].shape, "float32"))
    return out


def compile_anchor_step(modules, config, folder, devices=None):
    """trainer.compile_step for `config`'s anchor step on `folder`'s shards and a (1, n) mesh
    over `devices` (default: all, the trainer's own mesh), after the trainer's checks of the
    batch layout and the shards -> (compiled, abstract state, abstract fixed, mesh, tx)."""
    from dynamicid_jax import sharding
    from dynamicid_jax.training import data, stages, trainer
    from dynamicid_jax.training.step import make_optimizer

    stage = stages.get("anchor")
    mesh = sharding.make_mesh(1, -1, devices)
    trainer.check_batch_layout(config, mesh)
    manifest = data.check_dataset(folder, stage, modules, config)
    tx = make_optimizer(config.optimizer, config.total_steps)
    return trainer.compile_step(stage, modules, config, tx, mesh, manifest) + (mesh, tx)


@contextlib.contextmanager
def compile_step_replaced(replacement):
    """trainer.compile_step is `replacement` inside (for module fixtures, which cannot use
    monkeypatch); yields the original."""
    from dynamicid_jax.training import trainer

    compile_step = trainer.compile_step
    trainer.compile_step = replacement
    try:
        yield compile_step
    finally:
        trainer.compile_step = compile_step


def train_keeping_step(config, workdir, folder, stage: str = "anchor"):
    """trainer.train(config, workdir, folder, stage=stage), keeping the step it compiled ->
    (last metrics, (compiled, abstract state, abstract fixed, mesh, tx)): the tests that run
    that step again reuse it instead of tracing it and reading it back from the compile cache
    (about 10 CPU-s for the tiny model)."""
    from dynamicid_jax.training import trainer

    kept = []

    def keep(stage, modules, config, tx, mesh, manifest, *bucket):
        kept.append(compile_step(stage, modules, config, tx, mesh, manifest, *bucket) + (mesh, tx))
        return kept[-1][:3]

    with compile_step_replaced(keep) as compile_step:
        metrics = trainer.train(config, workdir, folder, stage=stage)
    return metrics, kept[0]


def finish_in_process(compiled_step, config, workdir, folder) -> dict:
    """trainer.train(config, workdir, folder, stage="anchor") handed `compiled_step` (what
    `trainer.compile_step` returned for the same config, mesh and shards) instead of compiling
    its step again; returns the run's last metrics."""
    from dynamicid_jax.training import trainer

    with compile_step_replaced(lambda *args: compiled_step):
        return trainer.train(config, workdir, folder, stage="anchor")


def assert_same_trained_params(workdir, reference_workdir, modules) -> dict:
    """The newest checkpoints of two runs hold bit-identical parameters; returns the
    reference's, flat ({path tuple: array})."""
    from flax import traverse_util

    from dynamicid_jax.training import checkpoints

    reference = traverse_util.flatten_dict(checkpoints.load_trained_params(reference_workdir, modules))
    ours = traverse_util.flatten_dict(checkpoints.load_trained_params(workdir, modules))
    for path, value in reference.items():
        np.testing.assert_array_equal(ours[path], value, err_msg="/".join(path))
    return reference
