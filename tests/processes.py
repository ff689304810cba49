"""Subprocesses of the multi-process tests (jax.distributed jobs of the CLIs on CPU), and
waiting for what a thread or a server does in the background."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time


def finish_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every process (stdout piped, text); returns their outputs. Each must exit 0
    (the assertion names the process and shows its output's end); any still running when
    this returns or fails is killed, so a failed test leaves no job behind."""
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{outputs[i][-3000:]}"
    return outputs


def kill_once_saved(proc: subprocess.Popen, checkpoint: pathlib.Path, timeout: float) -> str:
    """SIGKILL a training run (stdout piped, text) as soon as `checkpoint` (a committed step's
    folder) exists; returns its output. The run must still have been running then (else the
    test would not interrupt anything): the assertion shows the output's end."""
    deadline = time.time() + timeout
    while not checkpoint.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    still_running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0]
    assert still_running, f"the run ended before it could be killed:\n{output[-3000:]}"
    return output


def wait_for(condition, seconds: float = 30.0) -> bool:
    """Poll `condition()` until it holds or `seconds` pass; returns its last value."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()
