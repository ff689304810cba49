"""dynamicid_jax/random_init.py: random parameters from the initializers alone, the shapes from
the same trace, and the on-disk cache (hits are read, torn files recomputed, keys distinct)."""

import json

import jax
import numpy as np
import pytest

from configs import tiny
from dynamicid_jax import modeling, random_init


@pytest.fixture(scope="module")
def projection():
    modules = modeling.build_modules(tiny.get_config().model)
    return modules.face_projection, modeling._dummy_inputs(modules)["face_projection"]


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_values_are_the_jitted_inits_and_shapes_its_eval_shape(projection, monkeypatch):
    monkeypatch.delenv(random_init.CACHE_ENV, raising=False)
    module, args = projection
    rng = jax.random.key(3, impl=modeling.TINY_PRNG_IMPL)
    ours = random_init.evaluate(module, rng, *args)
    reference = jax.jit(module.init)(rng, *args)
    assert jax.tree.structure(ours) == jax.tree.structure(reference)
    # The same random bits and initializer arithmetic, fused and rounded differently by XLA
    # (the jitted init is one program; a cold suite run measured 4 ulp on some values). An
    # initializer is a handful of float32 operations (uniform bits -> [0, 1) -> scale and shift,
    # erfinv for normals) on values of the tensor's own magnitude, so each value is within a few
    # roundings of that magnitude: 64 float32 epsilons of the tensor's largest value is far
    # above that, and far below what a wrong key or a wrong scale moves (the whole magnitude).
    for a, b in zip(_leaves(ours), _leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=0, atol=64 * np.finfo(np.float32).eps * float(np.abs(b).max()))
    other = random_init.evaluate(module, jax.random.key(4, impl=modeling.TINY_PRNG_IMPL), *args)
    flat = lambda tree: np.concatenate([x.ravel() for x in _leaves(tree)])  # noqa: E731
    assert np.mean(flat(other) != flat(ours)) > 0.5
    shapes = jax.eval_shape(module.init, rng, *args)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), random_init.abstract(module, rng, *args)) == \
        jax.tree.map(lambda s: (s.shape, s.dtype), shapes)
    ours["params"].clear()  # fresh containers: a caller's edit never reaches the memo
    assert random_init.evaluate(module, rng, *args)["params"]


def test_disk_cache_is_read_and_torn_files_are_recomputed(projection, tmp_path, monkeypatch):
    module, args = projection
    monkeypatch.setenv(random_init.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(random_init, "_VALUES", {})
    rng = jax.random.key(7, impl=modeling.TINY_PRNG_IMPL)
    computed = _leaves(random_init.evaluate(module, rng, *args))
    [entry] = list(tmp_path.glob("*.npz"))

    # A hit is what is read: plant other values of the same shapes, and they come back.
    planted = [x + 1 for x in computed]
    np.savez(entry, *planted)
    monkeypatch.setattr(random_init, "_VALUES", {})
    for a, b in zip(_leaves(random_init.evaluate(module, rng, *args)), planted):
        np.testing.assert_array_equal(a, b)

    # A torn file is not used: recomputed (the op-by-op values, bit for bit) and rewritten.
    entry.write_bytes(entry.read_bytes()[:100])
    monkeypatch.setattr(random_init, "_VALUES", {})
    for a, b in zip(_leaves(random_init.evaluate(module, rng, *args)), computed):
        np.testing.assert_array_equal(a, b)
    with np.load(entry) as f:
        np.testing.assert_array_equal(f["arr_0"], computed[0])

    # Another key is another entry.
    random_init.evaluate(module, jax.random.key(8, impl=modeling.TINY_PRNG_IMPL), *args)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_trace_summary_on_disk_spares_the_next_process_its_trace(projection, tmp_path, monkeypatch):
    """What a process traced, the next one reads: shapes (and, with its values on disk too, the
    parameters) without running flax at all. The key holds the module's fields and the code:
    another depth or another source digest is another entry (a key without them would hand the
    other module these shapes); a torn summary is traced again and rewritten."""
    module, args = projection
    monkeypatch.setenv(random_init.CACHE_ENV, str(tmp_path))
    rng = jax.random.key(5, impl=modeling.TINY_PRNG_IMPL)
    shape_of = lambda tree: jax.tree.map(lambda s: (s.shape, s.dtype), tree)  # noqa: E731

    def new_process():
        for memo in ("_TRACES", "_SUMMARIES", "_VALUES"):
            monkeypatch.setattr(random_init, memo, {})

    new_process()
    shapes = shape_of(random_init.abstract(module, rng, *args))
    values = _leaves(random_init.evaluate(module, rng, *args))
    [summary] = list((tmp_path / "traces").glob("*.json"))

    new_process()
    trace = random_init._trace
    monkeypatch.setattr(random_init, "_trace", lambda *a: pytest.fail("traced although its summary is on disk"))
    assert shape_of(random_init.abstract(module, rng, *args)) == shapes
    for a, b in zip(_leaves(random_init.evaluate(module, rng, *args)), values):
        np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(random_init, "_trace", trace)

    shallower = module.clone(depth=1)
    assert shape_of(random_init.abstract(shallower, rng, *args)) == shape_of(jax.eval_shape(shallower.init, rng, *args))
    assert shape_of(random_init.abstract(shallower, rng, *args)) != shapes
    new_process()
    digest = random_init._code_digest
    monkeypatch.setattr(random_init, "_code_digest", lambda: "another version of the package")
    assert shape_of(random_init.abstract(module, rng, *args)) == shapes
    assert len(list((tmp_path / "traces").glob("*.json"))) == 3

    summary.write_text(summary.read_text()[:50])
    monkeypatch.setattr(random_init, "_code_digest", digest)
    new_process()
    assert shape_of(random_init.abstract(module, rng, *args)) == shapes
    assert json.loads(summary.read_text())["leaves"]
