"""CPU seconds per test, for budgeting the suite: `CPU_PROFILE_DIR=DIR make test`.

Wall times on a shared 2-core machine say more about the other jobs than about a test; CPU
seconds do not. Per test (its setup, call and teardown, so a module fixture is charged to the
first test that uses it): the process's own CPU plus that of the child processes it waited for
(the subprocess runs of launch/*.py). Beside it, this process's wall seconds in jax's three
program stages (tracing to a jaxpr, lowering to MLIR, XLA compiling or reading the persistent
cache), from jax.monitoring's events, the persistent cache's hits and misses, and the jitted
functions that took 2 s or more to compile: what a cut would save (a cached compile still
traces and lowers). One JSON line per test in
DIR/<xdist worker>.jsonl; `python tests/cpu_profile.py DIR` sums them per file, costliest first.
Loaded by tests/conftest.py only when CPU_PROFILE_DIR is set.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import resource
import sys
import time

import pytest

# jax.monitoring event -> the column it adds to (tracing is recorded for top-level traces only).
_STAGES = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
           "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
           "/jax/core/compile/backend_compile_duration": "compile_s"}
_COUNTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_stages: collections.Counter = collections.Counter()
_compiles: collections.Counter = collections.Counter()  # XLA compile seconds per jitted function


def _listen() -> None:
    import jax.monitoring

    def duration(event, seconds, fun_name="?", **_):
        if event in _STAGES:
            _stages[_STAGES[event]] += seconds
        if _STAGES.get(event) == "compile_s":
            _compiles[fun_name] += seconds

    def count(event, **_):
        if event in _COUNTS:
            _stages[_COUNTS[event]] += 1

    jax.monitoring.register_event_duration_secs_listener(duration)
    jax.monitoring.register_event_listener(count)


def pytest_configure(config):
    _listen()


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall = _cpu_seconds(), time.time()
    _stages.clear()
    _compiles.clear()
    yield
    folder = pathlib.Path(os.environ["CPU_PROFILE_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    line = {"test": item.nodeid, "cpu_s": round(_cpu_seconds() - cpu, 1), "wall_s": round(time.time() - wall, 1),
            **{k: round(v, 1) for k, v in _stages.items()},
            "slow_compiles": {name: round(v, 1) for name, v in _compiles.most_common(5) if v >= 2}}
    with open(folder / f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


COLUMNS = ("cpu_s", "trace_s", "lower_s", "compile_s", "hits", "misses")


def summary(folder) -> list[tuple[str, int, collections.Counter]]:
    """[(file, tests, {column: sum})] over every worker's lines, costliest CPU first."""
    tests, sums = collections.Counter(), collections.defaultdict(collections.Counter)
    for path in pathlib.Path(folder).glob("*.jsonl"):
        for row in map(json.loads, path.read_text().splitlines()):
            name = row["test"].split("::")[0]
            tests[name] += 1
            sums[name].update({k: row.get(k, 0) for k in COLUMNS})
    return sorted(((f, tests[f], sums[f]) for f in sums), key=lambda r: -r[2]["cpu_s"])


if __name__ == "__main__":
    rows = summary(sys.argv[1])
    print("".join(f"{c:>10}" for c in COLUMNS) + "  tests  file")
    total = collections.Counter()
    for name, count, sums in rows:
        total.update(sums)
        print("".join(f"{sums[c]:10.1f}" for c in COLUMNS) + f"  {count:5d}  {name}")
    print("".join(f"{total[c]:10.1f}" for c in COLUMNS) + f"  {sum(r[1] for r in rows):5d}  all")
