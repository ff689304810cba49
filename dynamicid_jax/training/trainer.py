"""The DynamicID trainer: one linear function, `train(config, workdir, data_dir)`.

Sections, in order: setup, mesh, input, model and parameters, optimizer and sharding,
update step (compiled ahead of time), checkpoint (resume or fresh start), loop (log, save,
SIGTERM, non-finite guard). `launch/train.py` parses flags and calls `train`.

Multi-host: call `jax.distributed.initialize` before `train` (launch/train.py does); every
process runs this same function, reads its own disjoint shard files, and the global batch
is assembled from the per-host batches.
"""

from __future__ import annotations

import json
import pathlib
import signal
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dynamicid_jax import base_models, modeling, sharding
from dynamicid_jax.data import pipeline, records
from dynamicid_jax.errors import ConfigError, UserError
from dynamicid_jax.training import checkpoints, data, init, partition, stages
from dynamicid_jax.training.step import init_state, learning_rate_schedule, make_optimizer, make_step_fn


SUMMARY = "summary.json"


class NonFiniteError(UserError, FloatingPointError):
    """A NaN/Inf loss or gradient with `nonfinite = "stop"`; the message names the step and the
    way on (a setting the user can change, so a UserError: one line, exit 2)."""


def compute_dtype(name: str):
    if name not in ("float32", "bfloat16"):
        raise ConfigError(f"config.dtype must be 'float32' or 'bfloat16', got {name!r}")
    return jnp.dtype(name)


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying their target shardings (for AOT lowering and restores)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def check_batch_layout(config, mesh) -> None:
    """The global batch must split evenly into micro-batches and over every device."""
    b, k, n = config.data.global_batch_size, config.optimizer.accumulation_steps, mesh.size
    if b % k or (b // k) % n:
        raise ConfigError(f"data.global_batch_size={b} must be a multiple of optimizer.accumulation_steps={k} "
                         f"x {n} devices")


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (then saves and exits)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        """True when any process got SIGTERM (all processes must save the same step)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train(config: ml_collections.ConfigDict, workdir, data_dir, *, stage: Optional[str] = None) -> dict[str, Any]:
    """Run (or resume) training until `config.total_steps`; returns the last logged metrics.

    Logged every `config.log_every_steps` steps, over the steps since the last log (the
    window): loss, grad_norm, learning_rate, steps_per_second, images_per_second,
    skipped_updates, and `input_share` = the input stall: seconds the loop spent blocked in
    `next(batches)` with the devices idle (the previous step finished and nothing else
    queued), over the window's wall time. Reading, decoding and placing batches run in the
    iterator's threads while steps compute and count only when the next batch is not ready
    when the loop asks for it. On hosts whose cores also run the step (CPU) that work can
    still slow the step down without any stall; `benchmarks/input_share.py` measures that
    against a run with no input at all.

    Faults: a corrupt record stops the run with RecordFormatError naming file and offset
    (`config.data.skip_corrupt_records=True`: skipped and counted instead, see
    `pipeline.CorruptRecords`); a failed checkpoint write raises StorageError naming the
    newest complete step, which a rerun resumes from. DIR/summary.json gets the last logged
    metrics (and the skipped records) at the end of a run.
    """
    # ------------------------------------------------------------------ setup
    name = config.stage if stage is None else stage
    if name != config.stage:
        raise ConfigError(f"--stage={name} but the config is for stage {config.stage!r}")
    stage = stages.get(name)
    if config.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"config.nonfinite must be 'stop' or 'skip', got {config.nonfinite!r}")
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0

    # ------------------------------------------------------------------ mesh
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    check_batch_layout(config, mesh)
    batch_sharding = sharding.batch_sharding(mesh)

    # ------------------------------------------------------------------ input (checked against the model)
    config = with_base_model_files(config)
    modules = modeling.build_modules(config.model, dtype=compute_dtype(config.dtype), remat=config.get("remat", False))
    manifest = data.check_dataset(data_dir, stage, modules, config)
    workdir.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to fit: no stray workdirs
    mngr = checkpoints.manager(workdir, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep,
                               async_save=config.checkpoint.async_save)
    latest = mngr.latest_step()
    if latest is not None and latest >= config.total_steps:  # a finished run: rerunning it compiles nothing
        mngr.close()
        if is_main:
            print(f"train: {workdir} is already at step {latest} of {config.total_steps}: nothing to do", flush=True)
        return {"step": latest, "compile_seconds": 0.0}

    # ------------------------------------------------------------------ model, optimizer, sharding, update step
    tx = make_optimizer(config.optimizer, config.total_steps)
    schedule = learning_rate_schedule(config.optimizer, config.total_steps)
    compile_start = time.perf_counter()
    compiled, abs_state, abs_fixed = compile_step(stage, modules, config, tx, mesh, manifest)
    compile_seconds = time.perf_counter() - compile_start
    steps = BucketSteps(lambda k: compile_step(stage, modules, config, tx, mesh, manifest, bucket=k)[0],
                        [data.abstract_batch(manifest, stage, config, k) for k in range(_num_buckets(manifest))],
                        compiled)
    fixed_shardings = jax.tree.map(lambda a: a.sharding, abs_fixed)
    state_shardings = jax.tree.map(lambda a: a.sharding, abs_state)

    # ------------------------------------------------------------------ checkpoint: resume or start
    if latest is not None:
        fixed = checkpoints.restore_frozen(workdir, abs_fixed)
        state, data_state = checkpoints.restore(mngr, latest, abs_state)
    else:
        params = init.initial_params(stage, config, modules)
        constants = stage.constants(config, modules, params, data_dir, manifest)
        trainable, frozen, model_state = partition.split_params(params, stage)
        checkpoints.check_compatible(trainable, abs_state.trainable, "initial trainable parameters")
        checkpoints.check_compatible(model_state, abs_state.model_state, "initial model state")
        fixed = {"params": frozen, "constants": constants}
        checkpoints.check_compatible(fixed, abs_fixed, "initial frozen parameters and constants")
        fixed = jax.device_put(fixed, fixed_shardings)
        state = jax.jit(lambda t, m: init_state(t, m, tx, config.seed), out_shardings=state_shardings)(
            trainable, model_state)
        del params
        with checkpoints.storage_errors("writing the frozen parameters", workdir):
            checkpoints.save_frozen(workdir, fixed)
        if is_main:
            checkpoints.write_config(workdir, config)
        data_state = None

    corrupt = pipeline.CorruptRecords() if config.data.get("skip_corrupt_records", False) else None
    dataset = data.dataset(data_dir, stage, modules, config, corrupt=corrupt)
    batches = pipeline.GlobalBatchIterator(dataset, mesh, num_threads=config.data.num_threads,
                                           prefetch=config.data.prefetch, sharding=batch_sharding)
    if data_state is not None:
        batches.set_state(data_state)

    # ------------------------------------------------------------------ loop
    step = int(jax.device_get(state.step))
    images_per_step = config.data.global_batch_size * stage.images_per_example(config)
    writer = _summary_writer(workdir) if is_main else None
    bar = _progress(config, step, is_main)
    preemption = _Preemption()
    last: dict[str, Any] = {"step": step, "compile_seconds": compile_seconds}
    window_start, window_steps, skipped, input_seconds = time.perf_counter(), 0, 0, 0.0
    batch = None

    try:
        while step < config.total_steps:
            # The previous step has finished (its metrics were read below), so the devices are
            # idle for as long as this blocks: that is the input stall. The iterator's threads
            # read, decode and place the next batches while steps run; next() hands over ready
            # arrays, or waits for them.
            wait_start = time.perf_counter()
            previous = batch  # kept alive until this step is dispatched (freed by `del` below)
            try:
                batch = next(batches)
            except records.RecordFormatError as e:
                raise records.RecordFormatError(
                    f"{e} (read for step {step + 1}; checkpoints so far are kept: "
                    f"`python data_pipelines/precompute.py --verify {data_dir}` lists every bad record, "
                    "--config.data.skip_corrupt_records=True skips them)") from None
            input_seconds += time.perf_counter() - wait_start
            consumed = batches.get_state()  # just after this batch: where a checkpoint of this step resumes
            step_fn, seconds = steps.for_batch(batch)  # another bucket: its step compiles on first use
            compile_seconds, window_start = compile_seconds + seconds, window_start + seconds
            state, metrics = step_fn(state, fixed, batch)  # dispatched asynchronously
            # Free the previous batch while this step computes: freed as soon as its own step had
            # finished (at `batch = next(...)`), its buffers' release blocked the loop before the
            # next dispatch (figure: benchmarks/input_share_report.md).
            del previous
            step += 1
            window_steps += 1
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not metrics["finite"]:
                message = f"step {step}: non-finite loss {metrics['loss']} or gradient norm {metrics['grad_norm']}"
                if config.nonfinite == "stop":
                    raise NonFiniteError(message + " (the update was not applied; set nonfinite='skip' to go on)")
                skipped += 1
                print(f"skipping the update of {message}", file=sys.stderr)
            if step % config.log_every_steps == 0 or step == config.total_steps:
                elapsed = time.perf_counter() - window_start
                metrics.update(learning_rate=float(schedule(step - 1)), steps_per_second=window_steps / elapsed,
                               images_per_second=window_steps * images_per_step / elapsed, skipped_updates=skipped,
                               input_share=input_seconds / elapsed)
                if is_main:  # one log per job, not one per process
                    _log(writer, bar, step, metrics)
                window_start, window_steps, input_seconds = time.perf_counter(), 0, 0.0
                last = dict(metrics, step=step, compile_seconds=compile_seconds)
            if bar is not None:
                bar.update(1)
            saving = f"saving checkpoints (up to step {step}; saves are asynchronous)"  # which one failed: the path
            with checkpoints.storage_errors(saving, workdir):
                saved = checkpoints.save(mngr, step, state, consumed, force=step == config.total_steps)
            if preemption.agreed():
                if not saved:  # a step the interval just saved must not be saved twice
                    with checkpoints.storage_errors(saving, workdir):
                        checkpoints.save(mngr, step, state, consumed, force=True)
                print(f"SIGTERM: saved step {step} and stopping", file=sys.stderr)
                break
    finally:
        preemption.restore()
        batches.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        with checkpoints.storage_errors("finishing the last checkpoint save", workdir):
            mngr.wait_until_finished()
            mngr.close()
    if corrupt is not None:
        last["corrupt_records_skipped"] = len(corrupt)
    if is_main:
        _write_summary(workdir, last, corrupt)
    return last


def with_base_model_files(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` whose model sections the base model's files define (a fine-tune's VAE scale, its
    scheduler) are read from `init.base_model`, so the run trains with what the files say and
    its config.json records it. A random-init run, or one without a base model, is unchanged."""
    if config.init.random or not config.init.base_model:
        return config
    config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy: the caller's stays as given
    family = base_models.of(config.model)
    config.model = family.model_from_files(config.model, config.init.base_model)
    return config


def _num_buckets(manifest) -> int:
    return len(manifest.get("buckets", {}).get("sizes", ())) or 1


class BucketSteps:
    """The update step compiled ahead of time once per aspect-ratio bucket (each bucket's
    batches have their own latent shapes), each compiled when a batch of it first comes.

    `compile_bucket(k)` -> the executable for bucket k; `abstract_batches[k]` its batch's
    ShapeDtypeStructs (`data.abstract_batch`); `first` the already compiled step of bucket 0.
    """

    def __init__(self, compile_bucket, abstract_batches, first):
        self._compile = compile_bucket
        self._bucket_of = {self._key(b): k for k, b in enumerate(abstract_batches)}
        self._compiled = {0: first}

    @staticmethod
    def _key(batch) -> tuple:
        return tuple(sorted((name, tuple(a.shape)) for name, a in batch.items() if hasattr(a, "dtype")
                            and np.dtype(a.dtype).kind not in "USO"))

    def for_batch(self, batch) -> tuple[Any, float]:
        """-> (the compiled step for this batch's bucket, seconds spent compiling it now)."""
        key = self._key(batch)
        if key not in self._bucket_of:
            raise ValueError(f"a batch of shapes {dict(key)} matches none of the dataset's buckets")
        k = self._bucket_of[key]
        if k in self._compiled:
            return self._compiled[k], 0.0
        start = time.perf_counter()
        self._compiled[k] = self._compile(k)
        return self._compiled[k], time.perf_counter() - start


def compile_step(stage, modules, config, tx, mesh, manifest, bucket: int = 0):
    """Shard and compile the update step ahead of time for `mesh` (and a batch of `bucket`).

    Returns (compiled, abstract_state, abstract_fixed): the executable
    `compiled(state, fixed, batch) -> (state, metrics)` (state donated; fixed = {"params":
    frozen, "constants": ...}) and the ShapeDtypeStructs, with their shardings, of its first
    two arguments. Parameters and optimizer state follow the sharding rules (fsdp-split above
    `config.sharding.min_size` elements); batches are split over (data, fsdp).
    """
    lowered, abs_state, abs_fixed = lower_step(stage, modules, config, tx, mesh, manifest, bucket)
    return lowered.compile(), abs_state, abs_fixed


def lower_step(stage, modules, config, tx, mesh, manifest, bucket: int = 0):
    """`compile_step` up to the lowering: (jax.stages.Lowered, abstract_state, abstract_fixed).

    Lowering is cheap next to XLA's compile, and `lowered.cost_analysis()` already gives the
    step's FLOPs (used by the benchmark where a full compile does not fit the machine).
    """
    rules, min_size = sharding.DEFAULT_RULES, config.sharding.min_size
    abs_trainable, abs_frozen, abs_model_state = partition.split_params(modeling.abstract_params(modules), stage)
    abs_state = jax.eval_shape(lambda t, m: init_state(t, m, tx, config.seed), abs_trainable, abs_model_state)
    abs_fixed = {"params": abs_frozen, "constants": stage.abstract_constants(modules, manifest)}
    state_shardings = sharding.param_shardings(abs_state, mesh, rules, min_size)
    fixed_shardings = sharding.param_shardings(abs_fixed, mesh, rules, min_size)
    batch_sharding = sharding.batch_sharding(mesh)
    abs_batch = data.abstract_batch(manifest, stage, config, bucket)
    step_fn = make_step_fn(stage, modules, config, tx, mesh)
    jitted = jax.jit(
        lambda state, fixed, batch: step_fn(state, fixed["params"], fixed["constants"], batch),
        in_shardings=(state_shardings, fixed_shardings, batch_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    abs_state = with_shardings(abs_state, state_shardings)
    abs_fixed = with_shardings(abs_fixed, fixed_shardings)
    lowered = jitted.lower(abs_state, abs_fixed, with_shardings(abs_batch, jax.tree.map(lambda _: batch_sharding,
                                                                                        abs_batch)))
    return lowered, abs_state, abs_fixed


def _write_summary(workdir: pathlib.Path, last: dict, corrupt) -> None:
    """DIR/summary.json: the last logged metrics, and the corrupt records skipped (if skipping)."""
    from dynamicid_jax.data.shards import write_json_atomic

    summary = dict(last)
    if corrupt is not None:
        summary["corrupt_records"] = corrupt.to_json()
    with checkpoints.storage_errors("writing summary.json", workdir):
        write_json_atomic(workdir / SUMMARY, summary)


def _summary_writer(workdir):
    from dynamicid_jax.torchless import import_hiding_torch

    return import_hiding_torch("tensorboardX").SummaryWriter(str(workdir))


def _progress(config, step: int, is_main: bool):
    if not (config.progress_bar and is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=config.total_steps, initial=step, desc=f"train {config.stage}", unit="step", file=sys.stderr)


def _log(writer, bar, step: int, metrics: dict) -> None:
    if writer is not None:
        for name, value in metrics.items():
            writer.add_scalar(f"train/{name}", value, step)
        writer.flush()
    line = {k: round(metrics[k], 5) for k in ("loss", "grad_norm", "learning_rate", "steps_per_second",
                                              "images_per_second", "input_share")}
    if bar is not None:
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", gnorm=f"{metrics['grad_norm']:.3f}",
                        img_s=f"{metrics['images_per_second']:.1f}")
    text = json.dumps({"step": step, **line})  # one line per interval: step, loss, lr, grad norm, img/s, stall
    if bar is not None:
        bar.write(text, file=sys.stderr)  # above the progress bar, not through it
    else:
        print(text, flush=True)
