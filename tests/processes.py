"""Subprocesses of the multi-process tests (jax.distributed jobs of the CLIs on CPU)."""

from __future__ import annotations

import subprocess


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
