"""Test session setup: 8 fake CPU devices for the sharding tests, a persistent compile cache.

These must be set before jax initialises its backend, hence at import time of conftest.
"""

import os
import pathlib

_ROOT = pathlib.Path(__file__).resolve().parents[1]

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_ROOT / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
os.environ.setdefault("TEST_ASSETS", str(_ROOT / "test_assets"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def test_assets() -> pathlib.Path:
    """Folder of real photos fetched by tests/fetch_test_assets.py (make assets)."""
    path = pathlib.Path(os.environ["TEST_ASSETS"])
    if not (path / "MANIFEST.json").exists():
        pytest.fail(f"test assets missing under {path}: run `make assets` (tests/fetch_test_assets.py)")
    return path
