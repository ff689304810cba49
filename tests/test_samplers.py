"""Every sampler of `schedulers.samplers` against diffusers' class configured from SD1.5's
scheduler_config.json: whole loops on one deterministic "model" (a cheap function of x and t,
no UNet), timesteps and sigmas equal, every step's sample within 1e-5 relative.

Our side runs as the sampler does: one jitted `fori_loop` with a traced trip count over the
padded schedule, so the step counts of one sampler share a program (and this file compiles
once per sampler).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

from dynamicid_jax import schedulers as S
from parity import rel_l2
from test_schedulers import SD15_SCHEDULER, SD15_SCHEDULER_JSON

SHAPE = (1, 4, 8, 8)
REFERENCE = {
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler,
                        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "lcm": (LCMScheduler, {}),
}
# diffusers builds its sigma table from float32 alpha-bars, we from float64 ones: the smallest
# sigmas (t near 0, where 1 - alpha-bar ~ 1e-3 amplifies the float32 rounding) differ by up to
# 1.3e-5 relative (measured); 5e-5 leaves a 4x margin and still fails on a one-step shift.
SIGMA_RTOL = 5e-5
# Per-step sample tolerance, the bound; measured worst 2.5e-6 (LCM 50 steps, DPM++ Karras),
# most loops below 8e-7.
SAMPLE_RTOL = 1e-5
# One Euler step lands on t = 0 alone: the sample is sigma_0 * (...) and carries diffusers'
# 1.3e-5 error in sigma_0 (see SIGMA_RTOL), measured 1.24e-5; 4e-5 is 3x that.
SAMPLE_RTOL_ONE_EULER_STEP = 4e-5


def model_fn(xp, x, t):
    """A deterministic stand-in for the UNet's epsilon: depends on x and on t (so a wrong
    timestep or a wrong input scaling shows), unit-sized like real noise predictions."""
    return 0.9 * xp.tanh(x) * xp.cos(t / 700.0) + 0.3 * xp.sin(0.7 * x + t / 97.0)


def _diffusers_loop(name, num_steps, x_T, noises):
    cls, extra = REFERENCE[name]
    ref = cls.from_config({**SD15_SCHEDULER_JSON, **extra})
    ref.set_timesteps(num_steps)
    draws = iter(noises)
    x = torch.from_numpy(x_T) * ref.init_noise_sigma
    samples = []
    fake_randn = lambda shape, **kw: torch.from_numpy(next(draws))  # noqa: E731  the noise we feed
    module = __import__(cls.__module__, fromlist=["randn_tensor"])
    original = getattr(module, "randn_tensor", None)
    module.randn_tensor = fake_randn
    try:
        for t in ref.timesteps:
            inp = ref.scale_model_input(x, t)
            eps = model_fn(torch, inp, t.float())
            x = ref.step(eps, t, x).prev_sample
            samples.append(x.numpy())
    finally:
        if original is not None:
            module.randn_tensor = original
    sigmas = getattr(ref, "sigmas", None)
    return ref.timesteps.numpy(), (None if sigmas is None else sigmas.numpy()), np.stack(samples)


@functools.lru_cache(maxsize=None)
def _our_loop(name):
    """One jitted loop per sampler; trip count and schedule traced. Returns every step's sample."""
    table = S.noise_table(S.SchedulerConfig.from_diffusers(SD15_SCHEDULER_JSON))

    @jax.jit
    def run(schedule, x_T, key):
        def body(i, carry):
            x, state, history = carry
            eps = model_fn(jnp, S.scale_model_input(name, schedule, i, x), schedule.timesteps[i])
            noise = S.step_noise(key, i, x.shape) if S.needs_noise(name) else None
            x, state = S.step(name, table, schedule, i, eps, x, state, noise=noise)
            return x, state, history.at[i].set(x)

        x = x_T * schedule.init_sigma
        history = jnp.zeros((schedule.timesteps.shape[0],) + x.shape, jnp.float32)
        return jax.lax.fori_loop(0, schedule.num_steps, body, (x, S.init_state(name, x), history))[2]

    return run


CASES = [(name, n) for name in S.SCHEDULERS for n in (1, 4, 20, 50)]


@pytest.mark.parametrize("name,num_steps", CASES)
def test_loop_matches_diffusers(name, num_steps):
    config = S.SchedulerConfig.from_diffusers(SD15_SCHEDULER_JSON)
    rng = np.random.default_rng(num_steps)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    key = np.stack([S.step_noise_key(num_steps, b) for b in range(SHAPE[0])])  # (B, 2): one key per image
    noises = [np.asarray(S.step_noise(key, i, SHAPE)) for i in range(num_steps)]
    ref_ts, ref_sigmas, ref_samples = _diffusers_loop(name, num_steps, x_T, noises)

    schedule = S.make_schedule(name, config, num_steps)
    assert schedule.timesteps.shape == (config.num_train_timesteps,)  # padded: one program for all counts
    np.testing.assert_array_equal(np.asarray(schedule.timesteps[:num_steps]), ref_ts.astype(np.float32))
    if name != "ddim" and name != "lcm":
        np.testing.assert_allclose(np.asarray(schedule.sigmas[: num_steps + 1]), ref_sigmas, rtol=SIGMA_RTOL)
    ours = np.asarray(_our_loop(name)(schedule, jnp.asarray(x_T), key))
    bound = SAMPLE_RTOL_ONE_EULER_STEP if name.startswith("euler") and num_steps == 1 else SAMPLE_RTOL
    for i in range(num_steps):
        assert rel_l2(ours[i], ref_samples[i]) <= bound, f"{name} step {i}/{num_steps}"


def test_spacing_defaults_follow_each_class_and_a_stated_one_wins():
    config = S.SchedulerConfig.from_diffusers(SD15_SCHEDULER_JSON)
    assert config.stated_spacing is None
    assert [S.samplers.timestep_spacing(n, config) for n in S.SCHEDULERS] == [
        "leading", "linspace", "linspace", "linspace", "linspace", None]
    stated = S.SchedulerConfig.from_diffusers({**SD15_SCHEDULER_JSON, "timestep_spacing": "trailing"})
    ours = S.make_schedule("euler", stated, 7)
    ref = EulerDiscreteScheduler.from_config({**SD15_SCHEDULER_JSON, "timestep_spacing": "trailing"})
    ref.set_timesteps(7)
    np.testing.assert_array_equal(np.asarray(ours.timesteps[:7]), ref.timesteps.numpy())
    assert float(ours.init_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=SIGMA_RTOL)


def test_bad_names_and_step_counts_raise():
    config = SD15_SCHEDULER
    with pytest.raises(ValueError, match="unknown scheduler"):
        S.make_schedule("heun", config, 10)
    with pytest.raises(ValueError, match="1 to 50"):
        S.make_schedule("lcm", config, 51)
    with pytest.raises(ValueError, match="epsilon"):
        S.make_schedule("euler", dataclasses.replace(SD15_SCHEDULER, prediction_type="v_prediction"), 10)
