"""Train DynamicID: stage `anchor` (face projection + LoRA + identity projections) or stage
`reconfig` (IMR + KeyPointEncoder) on precomputed shards, on every visible device.

  python launch/train.py --stage=anchor --config=configs/anchor.py --data=SHARDS --workdir=DIR \
      [--config.key=value ...]

Errors in flags, config values, shards (a corrupt record: file and offset) or storage (a
failed checkpoint save) stop with one line on stderr and status 2; earlier checkpoints stay
and a rerun resumes. `--config.data.skip_corrupt_records=True` skips and counts corrupt
records instead (DIR/summary.json). Library INFO logs are off unless --verbose.

Checkpoints go to DIR/checkpoints (orbax: asynchronous, every `checkpoint.every_steps`, the
last `checkpoint.keep` kept, one more on SIGTERM), TensorBoard events to DIR. Rerunning the
same command after a crash or preemption resumes from the newest checkpoint: same step,
RNG, optimizer state and input position. The configs' docstrings hold full commands.

Devices and mesh: the step runs on a (data, fsdp) mesh over all devices (config.mesh; one
size may be -1 for "the rest"); parameters and optimizer state are split over `fsdp`,
batches over both axes.

Multi-host (one process per host, same command everywhere):
  TPU pods (v4/v5p slices): pass --multihost; jax.distributed.initialize() reads the
    topology from the TPU environment. Example:
      gcloud compute tpus tpu-vm ssh NAME --worker=all --command \
        "python launch/train.py --multihost --stage=anchor --config=configs/anchor.py --data=gs-fuse/shards --workdir=..."
  Multi-node GPU: give the coordinator explicitly on every node
      python launch/train.py --coordinator_address=host0:1234 --num_processes=4 --process_id=$RANK ...
    or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; under SLURM or Open
    MPI, --multihost lets jax.distributed.initialize() detect them.
  The workdir must be shared storage (all hosts write their parts of each checkpoint); each
  host reads a disjoint subset of the shard files (precompute at least one shard per host).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from dynamicid_jax import distributed

FLAGS = flags.FLAGS
flags.DEFINE_enum("stage", None, ["anchor", "reconfig"], "Which training stage to run.", required=True)
config_flags.DEFINE_config_file("config", None, "Stage config file (configs/anchor.py[:tiny] ...).", lock_config=True)
flags.DEFINE_string("data", None, "Folder of precomputed shards for this stage.", required=True)
flags.DEFINE_string("workdir", None, "Output folder: checkpoints, TensorBoard events, config.", required=True)
flags.DEFINE_bool("multihost", False, distributed.FLAG_HELP["multihost"] + ".")
flags.DEFINE_string("coordinator_address", None, distributed.FLAG_HELP["coordinator_address"] + ".")
flags.DEFINE_integer("num_processes", None, distributed.FLAG_HELP["num_processes"] + ".")
flags.DEFINE_integer("process_id", None, distributed.FLAG_HELP["process_id"] + ".")
flags.DEFINE_bool("verbose", False, "Show the libraries' INFO logs (orbax, absl, jax); default: warnings only.")


def initialize_distributed() -> None:
    """jax.distributed.initialize when the flags or the environment describe a multi-process job
    (`dynamicid_jax.distributed`; a coordinator without count and index is a ConfigError)."""
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.multihost)


def _run(argv) -> None:
    from dynamicid_jax.cli import check_output_folder
    from dynamicid_jax.errors import ConfigError
    from dynamicid_jax.training import config_checks

    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise ConfigError("--config is required (e.g. --config=configs/anchor.py)")
    config_checks.check_config(FLAGS.config)  # values: before any compile or workdir
    check_output_folder(FLAGS.workdir, "--workdir", inputs={"--data": FLAGS.data})
    initialize_distributed()
    from dynamicid_jax.training import trainer

    last = trainer.train(FLAGS.config, FLAGS.workdir, FLAGS.data, stage=FLAGS.stage)
    print(f"train: {FLAGS.stage} run at step {last['step']} of {FLAGS.config.total_steps}: checkpoints in "
          f"{os.path.join(FLAGS.workdir, 'checkpoints')}, config.json and TensorBoard events in {FLAGS.workdir}",
          flush=True)


def main(argv) -> int:
    """0 on success; 2 with one stderr line on a user error (bad flag, data, disk); else a traceback."""
    from dynamicid_jax import cli

    cli.quiet_logs(FLAGS.verbose)
    return cli.run_main(_run, argv)


def parse_flags(argv):
    """absl's flag parsing with the project's error style: one line, status 2 (absl: usage, 1).
    The config file and the override names are checked first (`config_checks`): ml_collections
    reports those as tracebacks."""
    from dynamicid_jax import cli
    from dynamicid_jax.errors import ConfigError
    from dynamicid_jax.training import config_checks

    try:
        config_checks.check_config_argv(argv)
    except ConfigError as e:
        sys.exit(cli.report_user_error(e))
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(cli.report_user_error(f"{e} (see --helpfull)"))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
