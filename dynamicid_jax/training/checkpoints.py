"""Checkpoints of a training workdir (orbax), and reading one back for sampling.

Layout of a workdir:
    DIR/config.json          the run's config (written at the start of a fresh run)
    DIR/frozen/              {"params": the stage's frozen parameters, "constants": null
                             features / prompt states}, written once before step 1
    DIR/checkpoints/<step>/  orbax CheckpointManager steps, each with two items:
        state   TrainState (step, rng, trainable, opt_state, model_state), sharded arrays
        data    the input iterator's position (grain state, JSON)
    DIR/events.out.tfevents.*  TensorBoard

Saves are asynchronous (the next steps run while arrays are written); an interrupted save
leaves no committed step, so a restart picks the newest complete one. A restore whose saved
tree differs from the model being trained (names, shapes, dtypes) raises
CheckpointMismatchError listing the differences: it never falls back to a fresh start.

`load_trained_params(path, modules)` merges frozen + trainable + model_state of the newest
step into modeling.py's params dict, so `launch/sample.py --dynamicid WORKDIR` samples with it.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from dynamicid_jax.errors import MissingFileError, StorageError, UserError
from dynamicid_jax.sharding import path_name
from dynamicid_jax.training.partition import merge

CHECKPOINTS = "checkpoints"
FROZEN = "frozen"
CONFIG = "config.json"
# orbax splits the writing of each replicated array over its replicas (except on GPU), one
# device slice per replica, each an eager program; for the many small leaves of a LoRA/adapter
# state (biases, norms, projections) that dispatch costs more than the bytes it spreads
# (benchmarks/design_choices_report.md). Arrays whose per-replica slice is under 1 MiB are
# written whole by one replica; large ones stay parallel.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _use_array_handler() -> None:
    """Register the jax.Array handler with our replica-parallel threshold (process-wide: orbax
    keeps one registry; idempotent), before any save."""
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint does not fit the model/config it is restored into (differences named)."""


def manager(workdir, *, every_steps: int, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """CheckpointManager over DIR/checkpoints: saves every `every_steps`, keeps the last `keep`.

    Only the interval decides (the trainer forces the last step and SIGTERM saves): orbax's
    default policy would also save the first step of a fresh run (InitialSavePolicy)."""
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([policies.FixedIntervalPolicy(every_steps),
                                                     policies.PreemptionCheckpointingPolicy()]),
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    _use_array_handler()
    return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / CHECKPOINTS, options=options,
                                 item_handlers=_item_handlers())


def _item_handlers() -> dict:
    # Named up front so a fresh process can read a step's metadata before restoring it.
    return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: Mapping[str, Any], *, force: bool = False) -> bool:
    """Save (asynchronously) when the interval says so or `force`; returns whether it saved."""
    return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(dict(data_state))), force=force)


def committed_steps(workdir) -> list[int]:
    """Steps whose checkpoint is complete on disk (orbax renames a step's temporary folder to
    its number only once every item is written), oldest first."""
    folder = pathlib.Path(workdir) / CHECKPOINTS
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []


def _os_error_in(error: BaseException) -> Optional[OSError]:
    """The OSError behind `error` (itself, or along its cause/context chain), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and not isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def storage_errors(what: str, workdir):
    """Turn a failed write (disk full, read-only, permissions: an OSError, also when orbax
    re-raises it from its save thread) into a StorageError saying what is still usable."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        cause = _os_error_in(e)
        if cause is None:
            raise
        steps = committed_steps(workdir)
        kept = (f"the newest complete checkpoint, step {steps[-1]}, is intact and a rerun of the same command "
                "resumes from it" if steps else "no checkpoint was completed yet; a rerun starts afresh")
        raise StorageError(f"{what} in {pathlib.Path(workdir) / CHECKPOINTS} failed: {cause}; {kept} "
                           "(free space first)") from e


def _saved_leaves(metadata) -> dict[str, tuple[tuple[int, ...], str]]:
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {path_name(p, sep="."): (tuple(m.shape), str(np.dtype(m.dtype))) for p, m in leaves if hasattr(m, "shape")}


def check_compatible(found, expected, where: str) -> None:
    """Raise CheckpointMismatchError naming every leaf missing, extra, re-shaped or re-typed.

    found: a tree of arrays / ShapeDtypeStructs or orbax metadata (what is there);
    expected: a tree of the same kinds (what the model being trained needs)."""
    saved = _saved_leaves(found)
    wanted = {path_name(p, sep="."): (tuple(x.shape), str(np.dtype(x.dtype)))
              for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    problems = [f"missing {n}" for n in sorted(set(wanted) - set(saved))]
    problems += [f"unexpected {n}" for n in sorted(set(saved) - set(wanted))]
    problems += [f"{n}: found {saved[n][1]}{list(saved[n][0])}, expected {wanted[n][1]}{list(wanted[n][0])}"
                 for n in sorted(set(saved) & set(wanted)) if saved[n] != wanted[n]]
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointMismatchError(f"{where} does not match the model being trained ({len(problems)} "
                                      f"differences; missing = expected but not found): {shown}")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict]:
    """Restore `step` into the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
    check_compatible(mngr.item_metadata(step)["state"], abstract_state, f"checkpoint step {step} in {mngr.directory}")
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                          data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]


def save_frozen(workdir, frozen) -> None:
    """Write {"params": frozen params, "constants": ...} once (synchronously) under DIR/frozen.

    Overwrites a copy left by a run that died before its first checkpoint (same init)."""
    path = pathlib.Path(workdir).absolute() / FROZEN
    _use_array_handler()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, frozen, force=True)
    checkpointer.wait_until_finished()


def restore_frozen(workdir, abstract_frozen) -> Any:
    path = pathlib.Path(workdir).absolute() / FROZEN
    checkpointer = ocp.StandardCheckpointer()
    check_compatible(checkpointer.metadata(path).item_metadata, abstract_frozen, str(path))
    return checkpointer.restore(path, abstract_frozen)


def write_config(workdir, config) -> None:
    path = pathlib.Path(workdir) / CONFIG
    path.write_text(config.to_json(indent=1, sort_keys=True) if hasattr(config, "to_json") else json.dumps(config))


# --------------------------------------------------------------------------- for sampling


def find_workdir(path) -> pathlib.Path:
    """A workdir (holding frozen/ and checkpoints/) from itself, its checkpoints/ or a step folder."""
    path = pathlib.Path(path).absolute()
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / FROZEN).is_dir() and (candidate / CHECKPOINTS).is_dir():
            return candidate
    raise MissingFileError(f"{path} is not a training workdir (no {FROZEN}/ and {CHECKPOINTS}/ beside it)")


def _step_from_path(path: pathlib.Path, workdir: pathlib.Path) -> Optional[int]:
    """The step folder the caller named (DIR/checkpoints/<step>), or None for the newest."""
    if path.parent == workdir / CHECKPOINTS and path.name.isdigit():
        return int(path.name)
    return None


def _as_numpy_tree(tree):
    return jax.tree.map(lambda x: np.asarray(x), tree)


def _local_target(metadata):
    """Restore target for saved arrays on this process's first device, whatever topology
    (device ids, process count) wrote them: orbax restores without a target only onto the
    saving topology ("Topology mismatch detected" for a multi-host or other-device run)."""
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree,
                        is_leaf=lambda x: hasattr(x, "shape"))


def load_trained_params(workdir_or_checkpoint_dir, modules) -> dict:
    """A training workdir (or its checkpoints/ or one step folder) -> params dict for sampling.

    Returns modeling.py's {component: tree} for the components the stage holds (anchor:
    unet, text_encoder, face_projection; reconfig: unet, face_projection, imr,
    keypoint_encoder {"params", "batch_stats"}), as float32 numpy arrays, from the newest
    step unless a step folder is named. Every returned component is checked leaf by leaf
    against `modules` (modeling.abstract_params) and a difference is an error naming it.
    The caller loads the remaining components (vae, vision_encoder, ...) from the base model.
    """
    from dynamicid_jax import modeling

    path = pathlib.Path(workdir_or_checkpoint_dir).absolute()
    workdir = find_workdir(path)
    step = _step_from_path(path, workdir)
    checkpointer = ocp.StandardCheckpointer()
    frozen_path = workdir / FROZEN
    frozen = checkpointer.restore(frozen_path, _local_target(checkpointer.metadata(frozen_path).item_metadata))["params"]
    # The state item read as the PyTree it is on disk (StandardSave writes one), so that only
    # the parameters are read: the optimizer state (twice the trainable bytes) and the RNG are
    # for resuming, and reading them cost a sampler start twice the time.
    mngr = ocp.CheckpointManager(workdir / CHECKPOINTS, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise MissingFileError(f"{workdir / CHECKPOINTS} holds no finished checkpoint yet")
    saved = mngr.item_metadata(step)["state"]
    saved = saved.tree if hasattr(saved, "tree") else saved
    target = _local_target({k: saved[k] for k in ("trainable", "model_state")})
    restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype),
                                target)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=restore_args, partial_restore=True)))["state"]
    mngr.close()
    params = merge(_as_numpy_tree(frozen), _as_numpy_tree(state["trainable"]), _as_numpy_tree(state["model_state"]))
    shapes = modeling.abstract_params(modules)
    for component, tree in params.items():
        if component not in shapes:
            raise CheckpointMismatchError(f"{workdir}: unknown component {component!r}")
        check_compatible(tree, shapes[component], f"{workdir} ({component}, step {step})")
    return params
