"""One demo pipeline (configs/tiny.py, random weights) per test process, shared by modules.

Loading it costs ~25-45 s on 2 cores and its sampling loop compiles again in every process
(~30-45 s; an executable with host callbacks is not reused from the persistent cache), so
test_sampling.py and test_app.py share one object: the second module's requests of the same
shape (64x64, two people with boxes) reuse the first one's compiled program.
"""

import functools


@functools.cache
def demo_pipeline(expression_model: str):
    """-> (config, DynamicIDPipeline), loaded once per process."""
    from dynamicid_jax.loading import load_pipeline

    return load_pipeline(demo=True, expression_model=expression_model)
