"""Parity of our DDPM noising / DDIM sampling with diffusers' schedulers (SD1.5 config)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dynamicid_jax import schedulers as S
from dynamicid_jax.base_models import sd15
from parity import rel_l2

# SD1.5's scheduler/scheduler_config.json as shipped (a PNDM config; no timestep_spacing key).
SD15_SCHEDULER_JSON = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# The sd15 family's scheduler config (the values of the file above).
SD15_SCHEDULER = S.SchedulerConfig(**sd15.SCHEDULER)
SHAPE = (2, 4, 8, 8)


@pytest.fixture(scope="module")
def config():
    return S.SchedulerConfig.from_diffusers(SD15_SCHEDULER_JSON)


def test_from_diffusers_reads_sd15_and_defaults_match(config, tmp_path):
    assert config == SD15_SCHEDULER  # the sd15 family's table is SD1.5's file
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_JSON))
    assert S.SchedulerConfig.from_folder(tmp_path) == config
    # An omitted key takes DDIMScheduler's default, exactly as DDIMScheduler.from_config does.
    partial = {"beta_schedule": "scaled_linear"}
    ours = S.SchedulerConfig.from_diffusers(partial)
    ref = DDIMScheduler.from_config(partial).config
    for field in ("beta_start", "beta_end", "steps_offset", "set_alpha_to_one", "clip_sample", "timestep_spacing"):
        assert getattr(ours, field) == ref[field], field


@pytest.mark.parametrize("bad", [{"thresholding": True}, {"trained_betas": [0.1, 0.2]}, {"prediction_type": "flow"}])
def test_from_diffusers_rejects_unsupported_settings(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        S.SchedulerConfig.from_diffusers({**SD15_SCHEDULER_JSON, **bad})


def test_alphas_cumprod_matches_diffusers(config):
    ref = DDIMScheduler.from_config(SD15_SCHEDULER_JSON).alphas_cumprod.numpy()
    ours = np.asarray(S.alphas_cumprod(config))
    assert ours.shape == (1000,)
    # Ours is a float64 product rounded once; diffusers multiplies 1000 float32 factors, each
    # product rounded by up to half an ulp: relative error up to 1000 x 6e-8 = 6e-5 at the end
    # (a random walk gives ~2e-6; measured 1e-6). A wrong schedule (linear for scaled_linear,
    # an off-by-one in t) moves alpha-bar by percents.
    np.testing.assert_allclose(ours, ref, rtol=1e-4)


def test_add_noise_and_velocity_match_ddpm(config):
    ref = DDPMScheduler.from_config(SD15_SCHEDULER_JSON)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([3, 977])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    table = S.noise_table(config)
    got = jax.jit(S.ddpm_add_noise)(table, x0, noise, t)
    assert rel_l2(got, want) <= 1e-5
    assert rel_l2(S.ddpm_add_noise(config, x0, noise, 500), ref.add_noise(
        torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor([500])).numpy()) <= 1e-5
    np.testing.assert_array_equal(S.training_target(table, x0, noise, t), noise)  # epsilon prediction
    v_table = S.noise_table(dataclasses.replace(SD15_SCHEDULER, prediction_type="v_prediction"))
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert rel_l2(S.training_target(v_table, x0, noise, t), want_v) <= 1e-5


def _diffusers_loop(num_steps, x_T, outputs, eta=0.0, noises=None):
    ref = DDIMScheduler.from_config(SD15_SCHEDULER_JSON)
    ref.set_timesteps(num_steps)
    x = torch.from_numpy(x_T)
    samples, x0s = [], []
    for i, t in enumerate(ref.timesteps):
        kw = {} if noises is None else {"variance_noise": torch.from_numpy(noises[i])}
        out = ref.step(torch.from_numpy(outputs[i]), t, x, eta=eta, **kw)
        x = out.prev_sample
        samples.append(x.numpy())
        x0s.append(out.pred_original_sample.numpy())
    return ref.timesteps.numpy(), samples, x0s


@pytest.mark.parametrize("num_steps", [50, 20, 1])
def test_ddim_loop_matches_diffusers(config, num_steps):
    rng = np.random.default_rng(num_steps)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    outputs = rng.standard_normal((num_steps, *SHAPE)).astype(np.float32)  # a fixed "model output" per step
    ref_ts, ref_samples, ref_x0s = _diffusers_loop(num_steps, x_T, outputs)

    ts = S.ddim_timesteps(config, num_steps)
    prev = S.ddim_prev_timesteps(config, ts)
    assert ts.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ts), ref_ts)
    table = S.noise_table(config)

    # Python loop, one call per step.
    x = jnp.asarray(x_T)
    for i in range(num_steps):
        x, x0 = S.ddim_step(table, jnp.asarray(outputs[i]), ts[i], prev[i], x)
        assert rel_l2(x, ref_samples[i]) <= 1e-4, f"step {i} (t={int(ts[i])})"
        assert rel_l2(x0, ref_x0s[i]) <= 1e-4, f"pred_original_sample at step {i}"

    # The same inside a jitted lax.scan.
    @jax.jit
    def run(table, x_T, outputs, ts, prev):
        def body(x, step):
            out, t, p = step
            x, _ = S.ddim_step(table, out, t, p, x)
            return x, x

        return jax.lax.scan(body, x_T, (outputs, ts, prev))[1]

    scanned = np.asarray(run(table, jnp.asarray(x_T), jnp.asarray(outputs), ts, prev))
    for i in range(num_steps):
        assert rel_l2(scanned[i], ref_samples[i]) <= 1e-4, f"scan step {i}"


def test_ddim_eta_and_per_sample_timesteps(config):
    num_steps = 5
    rng = np.random.default_rng(7)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    outputs = rng.standard_normal((num_steps, *SHAPE)).astype(np.float32)
    noises = rng.standard_normal((num_steps, *SHAPE)).astype(np.float32)
    _, ref_samples, _ = _diffusers_loop(num_steps, x_T, outputs, eta=0.7, noises=noises)
    table = S.noise_table(config)
    ts = S.ddim_timesteps(config, num_steps)
    prev = S.ddim_prev_timesteps(config, ts)
    x = jnp.asarray(x_T)
    for i in range(num_steps):
        # (B,) timesteps broadcast per sample and give the same result as scalars.
        t_b, p_b = jnp.full((SHAPE[0],), ts[i]), jnp.full((SHAPE[0],), prev[i])
        x, _ = S.ddim_step(table, jnp.asarray(outputs[i]), t_b, p_b, x, eta=0.7, noise=jnp.asarray(noises[i]))
        assert rel_l2(x, ref_samples[i]) <= 1e-4, f"eta step {i}"
    with pytest.raises(ValueError, match="noise"):
        S.ddim_step(table, jnp.asarray(outputs[0]), ts[0], prev[0], jnp.asarray(x_T), eta=0.5)


def test_other_spacings_match_diffusers():
    for spacing in ("trailing", "linspace"):
        cfg = dataclasses.replace(SD15_SCHEDULER, timestep_spacing=spacing)
        ref = DDIMScheduler.from_config({**SD15_SCHEDULER_JSON, "timestep_spacing": spacing})
        for n in (1, 7, 50):
            ref.set_timesteps(n)
            np.testing.assert_array_equal(np.asarray(S.ddim_timesteps(cfg, n)), ref.timesteps.numpy())
    with pytest.raises(ValueError, match="num_steps"):
        S.ddim_timesteps(SD15_SCHEDULER, 0)
