"""How many XLA programs this process has compiled: `compiles()`.

Counts jax's backend-compile event (`jax.monitoring`), which fires for every jit and every
eager op that lowers a program, persistent-cache hits included, so a server can check (and
its tests assert) that a request after start-up compiled nothing.
"""

from __future__ import annotations

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_count = [0]


def _listen(event: str, _seconds: float, **_) -> None:
    if event == _EVENT:
        _count[0] += 1


jax.monitoring.register_event_duration_secs_listener(_listen)


def compiles() -> int:
    """XLA programs compiled so far in this process (since this module was imported)."""
    return _count[0]
