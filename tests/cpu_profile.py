"""CPU seconds per test, for budgeting the suite: `CPU_PROFILE_DIR=DIR make test`.

Wall times on a shared 2-core machine say more about the other jobs than about a test; CPU
seconds do not. Per test (its setup, call and teardown, so a module fixture is charged to the
first test that uses it): the process's own CPU plus that of the child processes it waited for
(the subprocess runs of launch/*.py). One JSON line per test in DIR/<xdist worker>.jsonl;
`python tests/cpu_profile.py DIR` sums them per file, costliest first.
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


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall = _cpu_seconds(), time.time()
    yield
    folder = pathlib.Path(os.environ["CPU_PROFILE_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    line = {"test": item.nodeid, "cpu_s": round(_cpu_seconds() - cpu, 1), "wall_s": round(time.time() - wall, 1)}
    with open(folder / f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def summary(folder) -> list[tuple[str, int, float]]:
    """[(file, tests, CPU seconds)] over every worker's lines, costliest first."""
    tests, cpu = collections.Counter(), collections.Counter()
    for path in pathlib.Path(folder).glob("*.jsonl"):
        for row in map(json.loads, path.read_text().splitlines()):
            name = row["test"].split("::")[0]
            tests[name] += 1
            cpu[name] += row["cpu_s"]
    return sorted(((f, tests[f], cpu[f]) for f in cpu), key=lambda r: -r[2])


if __name__ == "__main__":
    rows = summary(sys.argv[1])
    for name, count, seconds in rows:
        print(f"{seconds:8.1f}  {count:4d}  {name}")
    print(f"{sum(r[2] for r in rows):8.1f}  {sum(r[1] for r in rows):4d}  all")
