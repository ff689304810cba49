"""Test session setup: 8 fake CPU devices for the sharding tests, a persistent compile cache.

These must be set before jax initialises its backend, hence at import time of conftest.
"""

import contextlib
import gc
import os
import pathlib
import re
import tempfile

_ROOT = pathlib.Path(__file__).resolve().parents[1]

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Outside the clone (as the Makefile sets it): later runs and later clones reuse compiled programs.
_CACHE_HOME = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE_HOME / "dynamicid_jax" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Tiny random weights and their inits' shapes, made once per machine (dynamicid_jax/random_init.py).
os.environ.setdefault("DYNAMICID_JAX_INIT_CACHE_DIR", str(_CACHE_HOME / "dynamicid_jax" / "random_init"))
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
# XLA's fast-compile setting (fewer optimisation passes) for every program of the suite, in this
# process and in every subprocess it starts: compiling dominates the suite on 2 cores (about
# 17% less time for the generation, sharding and sampling files, measured cold), and the tests
# check our computation, not XLA's optimiser; both sides of every comparison are compiled alike.
# `make demo`, `make app`, the CLIs and the benchmarks keep XLA's defaults.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
os.environ.setdefault("TEST_ASSETS", str(_ROOT / "test_assets"))
# gradio's servers (uploads) and clients (downloads) of this process and its subprocesses use
# a folder of this process, removed at its end, instead of leaving their files in /tmp/gradio;
# each test process its own (an xdist worker replaces its controller's): two servers sharing a
# cache share files by content hash, and one stopping deletes its uploads (ui.launch).
if "GRADIO_TEMP_DIR" not in os.environ or "DYNAMICID_TESTS_GRADIO_PID" in os.environ:
    import atexit
    import shutil

    os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="dynamicid-tests-gradio-")
    os.environ["DYNAMICID_TESTS_GRADIO_PID"] = str(os.getpid())
    atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], ignore_errors=True)

import pytest  # noqa: E402

# Python's cycle collector, tuned for a test process: tracing and lowering allocate millions of
# short-lived objects, and each full collection walks every object alive, torch's, gradio's and
# jax's modules included. Fewer collections of the young generations, and the objects alive
# after collection (imports, the test modules) frozen out of them; garbage cycles are still
# collected, later (benchmarks/design_choices_report.md).
gc.set_threshold(10_000, 50, 100)


def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()


_TEMP_BEFORE = pytest.StashKey[set]()

if os.environ.get("CPU_PROFILE_DIR"):  # CPU seconds per test (tests/cpu_profile.py)
    pytest_plugins = ["cpu_profile"]


@pytest.fixture(scope="session")
def test_assets() -> pathlib.Path:
    """Folder of real photos fetched by tests/fetch_test_assets.py (make assets)."""
    path = pathlib.Path(os.environ["TEST_ASSETS"])
    if not (path / "MANIFEST.json").exists():
        pytest.fail(f"test assets missing under {path}: run `make assets` (tests/fetch_test_assets.py)")
    return path


# Modules by their cold cost on 2 cores, heaviest first: `make test` runs two xdist workers
# with whole files per worker (--dist loadfile --no-loadscope-reorder), each taking the next
# file when it is done, so the long training files must start first or they finish alone at
# the end. test_dynamicid_sdxl_run samples with the programs test_train_sdxl's last test (the
# SDXL story) compiles: started after test_sdxl_pipeline, it finds them in the persistent cache
# instead of compiling them on the other worker at the same time. Files not named keep their
# order after these.
HEAVIEST_FIRST = (
    "test_tiny_run", "test_train_paths", "test_train_sdxl", "test_train", "test_evaluation", "test_generation",
    "test_train_faults", "test_sdxl_pipeline", "test_dynamicid_sdxl_run", "test_app", "test_saa_sdxl", "test_sampling",
    "test_masks", "test_input_pipeline", "test_app_load", "test_sampler_pipeline_parity", "test_sharding",
    "test_unet_parity", "test_lora_files", "test_request_forms", "test_precompute",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: test order within a file kept


# gradio_client downloads each file into an empty folder it makes in the system temp folder
# (secrets.token_hex(20): 40 hex digits), moves the file out and leaves the folder: the
# controller process removes the empty ones the session made (rmdir removes nothing else).
_CLIENT_TEMP = re.compile(r"[0-9a-f]{40}")


def pytest_sessionstart(session):
    session.config.stash[_TEMP_BEFORE] = set(os.listdir(tempfile.gettempdir()))


def pytest_sessionfinish(session):
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller sweeps once
        return
    root = tempfile.gettempdir()
    for name in set(os.listdir(root)) - session.config.stash.get(_TEMP_BEFORE, set()):
        if _CLIENT_TEMP.fullmatch(name):
            with contextlib.suppress(OSError):  # not empty (not gradio_client's) or gone
                os.rmdir(os.path.join(root, name))
