"""Multi-process (multi-host) start-up shared by training and generation.

One process per host runs the same command. `initialize` calls `jax.distributed.initialize`
when the flags or the environment describe a multi-process job:
  --coordinator_address host:port --num_processes N --process_id I   (multi-node GPU), or
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or
  --multihost: auto-detection (TPU pods, SLURM, Open MPI).
Nothing given: a single process, jax untouched.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

FLAG_HELP = {
    "multihost": "call jax.distributed.initialize() with auto-detection (TPU pods, SLURM, MPI)",
    "coordinator_address": "host:port of process 0 (multi-node GPU)",
    "num_processes": "number of processes of the job",
    "process_id": "this process's index in [0, num_processes)",
}


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a coordinator (or server) of a local
    multi-process run: tests and benchmarks. Another process may take it before it is used."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    multihost: bool = False,
) -> bool:
    """jax.distributed.initialize for a multi-process job; returns whether it was called.

    Raises ConfigError (a UserError) when a coordinator is named without the process count and index.
    """
    import jax

    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        count = num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
        index = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
        if count is None or index is None:
            from dynamicid_jax.errors import ConfigError

            raise ConfigError("a coordinator address needs --num_processes and --process_id "
                             "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address=address, num_processes=int(count), process_id=int(index))
        return True
    if multihost:
        jax.distributed.initialize()
        return True
    return False


def add_argparse_flags(parser) -> None:
    """The multi-process flags of launch/train.py on an argparse parser (launch/sample.py, evaluate.py)."""
    parser.add_argument("--multihost", action="store_true", help=FLAG_HELP["multihost"])
    parser.add_argument("--coordinator_address", default=None, help=FLAG_HELP["coordinator_address"])
    parser.add_argument("--num_processes", type=int, default=None, help=FLAG_HELP["num_processes"])
    parser.add_argument("--process_id", type=int, default=None, help=FLAG_HELP["process_id"])


def initialize_from_args(args) -> bool:
    """`initialize` with the flags `add_argparse_flags` defined."""
    return initialize(args.coordinator_address, args.num_processes, args.process_id, args.multihost)
