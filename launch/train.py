"""Train DynamicID: stage `anchor` (face projection + LoRA + identity projections) or stage
`reconfig` (IMR + KeyPointEncoder) on precomputed shards, on every visible device.

  python launch/train.py --stage=anchor --config=configs/anchor.py --data=SHARDS --workdir=DIR \
      [--config.key=value ...]

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dynamicid_jax import distributed  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("stage", None, ["anchor", "reconfig"], "Which training stage to run.", required=True)
config_flags.DEFINE_config_file("config", None, "Stage config file (configs/anchor.py[:tiny] ...).", lock_config=True)
flags.DEFINE_string("data", None, "Folder of precomputed shards for this stage.", required=True)
flags.DEFINE_string("workdir", None, "Output folder: checkpoints, TensorBoard events, config.", required=True)
flags.DEFINE_bool("multihost", False, distributed.FLAG_HELP["multihost"] + ".")
flags.DEFINE_string("coordinator_address", None, distributed.FLAG_HELP["coordinator_address"] + ".")
flags.DEFINE_integer("num_processes", None, distributed.FLAG_HELP["num_processes"] + ".")
flags.DEFINE_integer("process_id", None, distributed.FLAG_HELP["process_id"] + ".")


def initialize_distributed() -> None:
    """jax.distributed.initialize when the flags or the environment describe a multi-process job."""
    from dynamicid_jax.sampling import InputError

    try:
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.multihost)
    except InputError as e:
        raise app.UsageError(str(e)) from None


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required (e.g. --config=configs/anchor.py)")
    initialize_distributed()
    from dynamicid_jax.training import trainer

    trainer.train(FLAGS.config, FLAGS.workdir, FLAGS.data, stage=FLAGS.stage)


if __name__ == "__main__":
    app.run(main)
