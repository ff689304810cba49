"""The samplers of `launch/sample.py --scheduler`: DDIM, DPM-Solver++ 2M (+ Karras sigmas),
Euler, Euler ancestral and LCM, each as diffusers' class configured from SD1.5's
scheduler_config.json computes it.

Two halves, so one compiled loop serves every step count:
  host side  `make_schedule(name, config, num_steps)` -> `Schedule`: numpy-built per-step
             arrays (timesteps, sigmas, alpha-bar indices) padded to a fixed length.
  device     `init_state`, `scale_model_input`, `step`: pure JAX, indexed by the traced step
             `i` of a `lax.fori_loop`, the name static; `*_by_index` take the sampler as a
             traced index into SCHEDULERS (`lax.switch`), so one compiled loop serves them all.

    schedule = make_schedule("dpmpp_2m_karras", config, 20)
    x = noise * schedule.init_sigma
    def body(i, carry):
        x, state = carry
        eps = unet(scale_model_input(name, schedule, i, x), schedule.timesteps[i])
        return step(name, table, schedule, i, eps, x, state, noise=step_noise(keys, i, x.shape))  # keys (B, 2)
    x, _ = lax.fori_loop(0, schedule.num_steps, body, (x, init_state(name, x)))

Sigma-space samplers (Euler, DPM++) use sigma_t = sqrt((1 - a_t) / a_t). Only epsilon
prediction (SD1.5) is implemented for the new samplers; anything else raises.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dynamicid_jax.schedulers.ddim import (
    NoiseTable,
    SchedulerConfig,
    alphas_cumprod64,
    ddim_prev_timesteps,
    ddim_step,
    ddim_timesteps_host,
)

SCHEDULERS = ("ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "lcm")
# diffusers' class default `timestep_spacing` (used when the config file names none, as SD1.5's):
# DDIMScheduler "leading", DPMSolverMultistep/EulerDiscrete/EulerAncestralDiscrete "linspace".
# LCMScheduler ignores spacing: its own schedule over `original_inference_steps`.
_CLASS_SPACING = {"ddim": "leading", "dpmpp_2m": "linspace", "dpmpp_2m_karras": "linspace",
                  "euler": "linspace", "euler_a": "linspace", "lcm": None}
_ANCESTRAL = ("euler_a", "lcm")  # draw fresh noise every step
LCM_ORIGINAL_STEPS = 50  # LCMScheduler's original_inference_steps (the distillation schedule)
LCM_TIMESTEP_SCALING = 10.0
LCM_SIGMA_DATA = 0.5
KARRAS_RHO = 7.0


@struct.dataclass
class Schedule:
    """Per-step arrays of one run, padded to a fixed length L (a pytree; traced in the loop).

    timesteps:   (L,) float32, the UNet's timestep at step i (Euler's are fractional).
    t_index:     (L,) int32, training timestep of step i (alpha-bar lookups of DDIM/LCM).
    prev_index:  (L,) int32, the timestep step i lands on (< 0: the final alpha-bar).
    sigmas:      (L + 1,) float32, sigma at step i (Euler/DPM++); sigmas[i + 1] is the target.
    init_sigma:  () float32, the initial noise's scale.
    num_steps:   () int32, the real step count (<= L).
    """

    timesteps: jax.Array
    t_index: jax.Array
    prev_index: jax.Array
    sigmas: jax.Array
    init_sigma: jax.Array
    num_steps: jax.Array


def check_name(name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def max_steps(name: str, config: SchedulerConfig) -> int:
    """Largest step count the sampler allows (LCM: its 50-step distillation schedule)."""
    check_name(name)
    return LCM_ORIGINAL_STEPS if name == "lcm" else config.num_train_timesteps


def timestep_spacing(name: str, config: SchedulerConfig) -> Optional[str]:
    """The spacing `name` uses: the config file's when it states one, else the class default."""
    check_name(name)
    if name == "ddim":
        return config.timestep_spacing
    if name == "lcm":
        return None
    return config.stated_spacing or _CLASS_SPACING[name]


def describe(name: str, config: SchedulerConfig) -> dict:
    """The sampler's resolved settings, for the sidecar."""
    out = {"name": name, "timestep_spacing": timestep_spacing(name, config),
           "beta_schedule": config.beta_schedule, "beta_start": config.beta_start, "beta_end": config.beta_end,
           "num_train_timesteps": config.num_train_timesteps, "steps_offset": config.steps_offset,
           "prediction_type": config.prediction_type}
    if name.startswith("dpmpp"):
        out.update(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                   final_sigmas_type="zero", use_karras_sigmas=name.endswith("karras"))
    if name == "lcm":
        out.update(original_inference_steps=LCM_ORIGINAL_STEPS, timestep_scaling=LCM_TIMESTEP_SCALING)
    return out


# ----------------------------------------------------------------------------- host side


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log sigma between the
    two neighbouring training sigmas (diffusers' `_sigma_to_t`). log_sigmas (T,) ascending."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def _dpm_timesteps(n: int, spacing: str, config: SchedulerConfig) -> np.ndarray:
    """DPMSolverMultistepScheduler.set_timesteps without clipping (lambda_min_clipped = -inf)."""
    T = config.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = T // (n + 1)
        return (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    return np.arange(T, 0, -T / n).round().astype(np.int64) - 1  # trailing


def _euler_timesteps(n: int, spacing: str, config: SchedulerConfig) -> np.ndarray:
    """Euler(Ancestral)DiscreteScheduler.set_timesteps (float32; linspace ones are fractional)."""
    T = config.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(n) * (T // n)).round()[::-1].astype(np.float32) + config.steps_offset
    return np.arange(T, 0, -T / n).round().astype(np.float32) - 1  # trailing


def _lcm_timesteps(n: int, config: SchedulerConfig) -> np.ndarray:
    """LCMScheduler.set_timesteps: n evenly picked from the 50-step distillation schedule."""
    k = config.num_train_timesteps // LCM_ORIGINAL_STEPS
    origin = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * k - 1)[::-1]
    picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[picks]


def make_schedule(name: str, config: SchedulerConfig, num_steps: int, length: Optional[int] = None) -> Schedule:
    """Per-step arrays of a `num_steps` run of sampler `name`, padded to `length` (default the
    training length, so every allowed step count shares one compiled loop)."""
    check_name(name)
    if name != "ddim" and config.prediction_type != "epsilon":
        raise ValueError(f"scheduler {name!r} is implemented for epsilon prediction only, "
                         f"the config says {config.prediction_type!r}")
    limit = max_steps(name, config)
    if not 1 <= num_steps <= limit:
        raise ValueError(f"scheduler {name!r} takes 1 to {limit} steps, got {num_steps}")
    length = config.num_train_timesteps if length is None else length
    if length < num_steps:
        raise ValueError(f"schedule length {length} < {num_steps} steps")
    a = alphas_cumprod64(config)
    train_sigmas = np.sqrt((1.0 - a) / a)  # ascending in t
    spacing = timestep_spacing(name, config)
    sigmas = np.zeros(num_steps + 1)  # final sigma 0 (final_sigmas_type="zero")
    init_sigma = 1.0
    if name == "ddim":
        ts = ddim_timesteps_host(config, num_steps)  # numpy throughout: no eager op per step count
        t_index, prev_index = ts, ddim_prev_timesteps(config, ts)
        timesteps = ts.astype(np.float32)
    elif name == "lcm":
        t_index = _lcm_timesteps(num_steps, config)
        prev_index = np.append(t_index[1:], t_index[-1])  # the last step returns its denoised x0
        timesteps = t_index.astype(np.float32)
    elif name.startswith("dpmpp"):
        if name == "dpmpp_2m_karras":
            # Karras et al. (2022) eq. 5 between the extreme training sigmas, rho 7; timesteps
            # are the rounded fractional training steps of those sigmas.
            lo, hi = train_sigmas[0] ** (1 / KARRAS_RHO), train_sigmas[-1] ** (1 / KARRAS_RHO)
            sigmas[:-1] = (hi + np.linspace(0, 1, num_steps) * (lo - hi)) ** KARRAS_RHO
            t_index = _sigma_to_t(sigmas[:-1], np.log(train_sigmas)).round().astype(np.int64)
        else:
            t_index = _dpm_timesteps(num_steps, spacing, config)
            sigmas[:-1] = train_sigmas[t_index]
        prev_index = np.append(t_index[1:], -1)
        timesteps = t_index.astype(np.float32)
    else:  # euler, euler_a
        timesteps = _euler_timesteps(num_steps, spacing, config)
        sigmas[:-1] = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        t_index = np.round(timesteps).astype(np.int64)
        prev_index = np.append(t_index[1:], -1)
        top = sigmas.max()
        # diffusers' init_noise_sigma: the largest sigma, or sqrt(sigma^2 + 1) for "leading".
        init_sigma = top if spacing in ("linspace", "trailing") else np.sqrt(top**2 + 1.0)
    pad = length - num_steps
    return Schedule(
        timesteps=jnp.asarray(np.pad(timesteps.astype(np.float32), (0, pad))),
        t_index=jnp.asarray(np.pad(t_index.astype(np.int32), (0, pad))),
        prev_index=jnp.asarray(np.pad(prev_index.astype(np.int32), (0, pad))),
        sigmas=jnp.asarray(np.pad(sigmas.astype(np.float32), (0, pad))),
        init_sigma=jnp.float32(init_sigma),
        num_steps=jnp.int32(num_steps),
    )


# ----------------------------------------------------------------------------- device side


def needs_noise(name: str) -> bool:
    """Whether `step` consumes fresh noise (Euler ancestral, multi-step LCM)."""
    return name in _ANCESTRAL


# Threefry whatever the default PRNG: a vmapped threefry draw equals the row's draw alone; an
# "rbg" draw under vmap does not (JAX documents it), which would tie a picture to its batch.
STEP_NOISE_IMPL = "threefry2x32"


def step_noise_key(seed: int, index: int = 0) -> np.ndarray:
    """(2,) uint32: the per-step noise key of image `index` of a `seed` request."""
    key = jax.random.key(seed, impl=STEP_NOISE_IMPL)
    return np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, 1), index)))


def step_noise(keys: jax.Array, i, shape) -> jax.Array:
    """The standard normal noise (float32, `shape` = (N, ...)) of step i: row r from
    fold_in(keys[r], i), keys (N, 2) uint32 `step_noise_key`s, one per image, so every image's
    draw is fixed by its own key whatever the step count or the batch around it."""
    keys = jax.random.wrap_key_data(jnp.asarray(keys, jnp.uint32), impl=STEP_NOISE_IMPL)
    draw = lambda key: jax.random.normal(jax.random.fold_in(key, i), tuple(shape[1:]), jnp.float32)  # noqa: E731
    return jax.vmap(draw)(keys)


def init_state(name: str, sample: jax.Array) -> Any:
    """Multistep memory carried through the loop: DPM++ 2M keeps the previous x0 prediction."""
    return jnp.zeros(sample.shape, jnp.float32) if name.startswith("dpmpp") else ()


def scale_model_input(name: str, schedule: Schedule, i, sample: jax.Array) -> jax.Array:
    """The UNet's input at step i: Euler-type samplers hold x_0 + sigma * eps and feed the
    model x / sqrt(sigma^2 + 1) (the variance-preserving sample); the others feed x as is."""
    if name not in ("euler", "euler_a"):
        return sample
    sigma = schedule.sigmas[i]
    return (sample.astype(jnp.float32) / jnp.sqrt(sigma**2 + 1.0)).astype(sample.dtype)


def _alpha_sigma(sigma):
    """sigma-space -> (alpha_t, sigma_t) of the VP process: alpha = 1/sqrt(sigma^2+1)."""
    alpha = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def _dpmpp_2m(schedule: Schedule, i, eps, x, prev_x0):
    """DPM-Solver++(2M) midpoint (Lu et al. 2022, data prediction), first order on the first
    and on the last step (diffusers: lower_order_final with final sigma 0)."""
    alpha_s0, sigma_s0 = _alpha_sigma(schedule.sigmas[i])
    alpha_t, sigma_t = _alpha_sigma(schedule.sigmas[i + 1])
    alpha_s1, sigma_s1 = _alpha_sigma(schedule.sigmas[jnp.maximum(i - 1, 0)])
    x0 = (x - sigma_s0 * eps) / alpha_s0
    lam_t, lam_s0, lam_s1 = (jnp.log(alpha_t) - jnp.log(sigma_t), jnp.log(alpha_s0) - jnp.log(sigma_s0),
                             jnp.log(alpha_s1) - jnp.log(sigma_s1))
    h = lam_t - lam_s0
    decay = alpha_t * (jnp.exp(-h) - 1.0)
    first = (sigma_t / sigma_s0) * x - decay * x0
    first_order = (i == 0) | (i == schedule.num_steps - 1)
    r0 = jnp.where(first_order, 1.0, (lam_s0 - lam_s1) / h)  # unused (and 0/inf) on first-order steps
    d1 = (1.0 / r0) * (x0 - prev_x0)
    second = (sigma_t / sigma_s0) * x - decay * x0 - 0.5 * decay * d1
    return jnp.where(first_order, first, second), x0


def _euler(schedule: Schedule, i, eps, x, noise, ancestral: bool):
    sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
    x0 = x - sigma * eps
    derivative = (x - x0) / sigma
    if not ancestral:
        return x + derivative * (sigma_next - sigma)
    # Ancestral split of the move to sigma_next: deterministic down to sigma_down, then noise sigma_up.
    sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = jnp.sqrt(sigma_next**2 - sigma_up**2)
    return x + derivative * (sigma_down - sigma) + noise * sigma_up


def _lcm(table: NoiseTable, schedule: Schedule, i, eps, x, noise):
    """Latent consistency step (Luo et al. 2023): boundary-condition x0, then re-noise to the
    next timestep except on the last step."""
    t = schedule.t_index[i]
    prev = schedule.prev_index[i]
    a_t = table.alphas_cumprod[t]
    a_prev = jnp.where(prev >= 0, table.alphas_cumprod[jnp.maximum(prev, 0)], table.final_alpha_cumprod)
    scaled = t.astype(jnp.float32) * LCM_TIMESTEP_SCALING
    c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
    c_out = scaled / jnp.sqrt(scaled**2 + LCM_SIGMA_DATA**2)
    x0 = (x - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
    if table.clip_sample:
        x0 = jnp.clip(x0, -table.clip_sample_range, table.clip_sample_range)
    denoised = c_out * x0 + c_skip * x
    renoised = jnp.sqrt(a_prev) * denoised + jnp.sqrt(1.0 - a_prev) * noise
    return jnp.where(i == schedule.num_steps - 1, denoised, renoised)


def step(
    name: str, table: NoiseTable, schedule: Schedule, i, model_output: jax.Array, sample: jax.Array, state: Any,
    noise: Optional[jax.Array] = None,
) -> tuple[jax.Array, Any]:
    """One update of sampler `name` at step i. model_output, sample (B, ...); noise shaped like
    the sample for `needs_noise(name)`. Returns (next sample in sample's dtype, next state)."""
    if needs_noise(name) and noise is None:
        raise ValueError(f"scheduler {name!r} needs `noise` shaped like the sample")
    eps = model_output.astype(jnp.float32)
    x = sample.astype(jnp.float32)
    if name == "ddim":
        out, _ = ddim_step(table, eps, schedule.t_index[i], schedule.prev_index[i], x)
    elif name.startswith("dpmpp"):
        out, state = _dpmpp_2m(schedule, i, eps, x, state)
    elif name in ("euler", "euler_a"):
        out = _euler(schedule, i, eps, x, noise, ancestral=name == "euler_a")
    elif name == "lcm":
        out = _lcm(table, schedule, i, eps, x, noise)
    else:
        check_name(name)
    return out.astype(sample.dtype), state


# ----------------------------------------------------------------------------- traced choice


def sampler_index(name: str) -> int:
    check_name(name)
    return SCHEDULERS.index(name)


def scale_model_input_by_index(index: jax.Array, schedule: Schedule, i, sample: jax.Array) -> jax.Array:
    """`scale_model_input` of SCHEDULERS[index], index traced."""
    branches = [functools.partial(scale_model_input, name, schedule, i) for name in SCHEDULERS]
    return jax.lax.switch(index, branches, sample)


def step_by_index(
    index: jax.Array, table: NoiseTable, schedule: Schedule, i, model_output: jax.Array, sample: jax.Array,
    state: jax.Array, key: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """`step` of SCHEDULERS[index] with the sampler a traced index: `lax.switch` runs only the
    chosen branch, so the cost per step is that sampler's. state: `init_state("dpmpp_2m", x)`
    (the one multistep memory; the other samplers pass it through). key: (N, 2) per-image
    noise keys (`step_noise(key, i, shape)`, drawn only by the ancestral branches)."""

    def branch(name):
        def run(eps, x, memory):
            noise = step_noise(key, i, x.shape) if needs_noise(name) else None
            multistep = name.startswith("dpmpp")
            out, new = step(name, table, schedule, i, eps, x, memory if multistep else (), noise=noise)
            return out, (new if multistep else memory)

        return run

    return jax.lax.switch(index, [branch(name) for name in SCHEDULERS], model_output, sample, state)
