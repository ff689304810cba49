"""DDPM noising (training), the noise schedule config and DDIM steps as pure JAX functions, diffusers-compatible.

Everything that varies per step (timesteps, samples, noise) is an array, so `ddim_step` and
`ddpm_add_noise` run inside `jit` and `lax.scan`; everything static (prediction type,
clipping) lives in the `NoiseTable`'s static fields or in `SchedulerConfig`.

Typical sampling loop:

    table = noise_table(config)
    ts = ddim_timesteps(config, 50)
    prev = ddim_prev_timesteps(config, ts)
    def body(x, t_prev):
        t, p = t_prev
        x, _ = ddim_step(table, unet(x, t), t, p, x)
        return x, None
    x, _ = jax.lax.scan(body, x_T, (ts, prev))
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dynamicid_jax.errors import MissingFileError

_BETA_SCHEDULES = ("linear", "scaled_linear")
_SPACINGS = ("leading", "trailing", "linspace")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# diffusers' DDIMScheduler.__init__ defaults (not SD1.5's values).
_DIFFUSERS_DDIM_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "steps_offset": 0,
    "set_alpha_to_one": True,
    "timestep_spacing": "leading",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Noise schedule and DDIM settings, as a base model's scheduler config states them (no
    defaults: the values come from the files, `from_diffusers`, or from the base-model family,
    e.g. `base_models.sd15.SCHEDULER`)."""

    num_train_timesteps: int
    beta_start: float
    beta_end: float
    beta_schedule: str  # "linear" or "scaled_linear" (linear in sqrt(beta))
    steps_offset: int
    set_alpha_to_one: bool  # alpha_cumprod "before" step 0: 1, or alphas_cumprod[0]
    timestep_spacing: str  # "leading", "trailing" or "linspace" (diffusers' names)
    clip_sample: bool
    clip_sample_range: float
    prediction_type: str  # "epsilon", "v_prediction" or "sample"
    # timestep_spacing as the config file states it; None (SD1.5's file names none): each
    # sampler takes its diffusers class's default (samplers.timestep_spacing).
    stated_spacing: Optional[str] = None

    def __post_init__(self):
        for name, value, allowed in (
            ("beta_schedule", self.beta_schedule, _BETA_SCHEDULES),
            ("timestep_spacing", self.timestep_spacing, _SPACINGS),
            ("prediction_type", self.prediction_type, _PREDICTION_TYPES),
            ("stated_spacing", self.stated_spacing, _SPACINGS + (None,)),
        ):
            if value not in allowed:
                raise ValueError(f"SchedulerConfig.{name}={value!r} is not supported; choose one of {allowed}")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "SchedulerConfig":
        """From a diffusers `scheduler_config.json` dict (any scheduler class; SD1.5 ships PNDM's).

        Keys that define the noise schedule or the DDIM update are read; settings we do not
        implement (trained betas, zero-SNR rescaling, dynamic thresholding) raise when enabled;
        keys that only concern other samplers (e.g. PNDM's `skip_prk_steps`) are ignored.
        """
        unsupported = {"trained_betas": None, "rescale_betas_zero_snr": False, "thresholding": False}
        for key, inert in unsupported.items():
            if config.get(key, inert) != inert:
                raise ValueError(f"scheduler config: {key}={config[key]!r} is not supported")
        # A key the file omits takes DDIMScheduler's default, as DDIMScheduler.from_config would.
        kwargs = {name: config.get(name, default) for name, default in _DIFFUSERS_DDIM_DEFAULTS.items()}
        return cls(**kwargs, stated_spacing=config.get("timestep_spacing"))

    @classmethod
    def from_folder(cls, path: Union[str, os.PathLike]) -> "SchedulerConfig":
        """From a pipeline folder (`scheduler/scheduler_config.json`) or the scheduler folder itself."""
        path = pathlib.Path(path)
        for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json", path):
            if candidate.is_file():
                with open(candidate) as f:
                    return cls.from_diffusers(json.load(f))
        raise MissingFileError(f"{path}: no scheduler/scheduler_config.json")


@struct.dataclass
class NoiseTable:
    """The arrays a scheduler step needs, plus its static options (a pytree; jit-friendly).

    alphas_cumprod:      (T,) float32, alpha-bar per training timestep.
    final_alpha_cumprod: () float32, alpha-bar used when the previous timestep is < 0.
    """

    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    clip_sample: bool = struct.field(pytree_node=False, default=False)
    clip_sample_range: float = struct.field(pytree_node=False, default=1.0)


def alphas_cumprod64(config: SchedulerConfig) -> np.ndarray:
    """alpha-bar_t = prod_{s<=t} (1 - beta_s), t = 0..T-1. -> (T,) float64 numpy (host-side tables)."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
    else:  # scaled_linear: linear in sqrt(beta), SD's schedule
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def alphas_cumprod(config: SchedulerConfig) -> jax.Array:
    """alpha-bar_t as a (T,) float32 array (computed in float64)."""
    return jnp.asarray(alphas_cumprod64(config).astype(np.float32))


def noise_table(config: SchedulerConfig) -> NoiseTable:
    """Precompute the schedule of `config` once; pass the table to the step functions."""
    cumprod = alphas_cumprod(config)
    final = jnp.float32(1.0) if config.set_alpha_to_one else cumprod[0]
    return NoiseTable(
        alphas_cumprod=cumprod,
        final_alpha_cumprod=jnp.asarray(final, jnp.float32),
        prediction_type=config.prediction_type,
        clip_sample=config.clip_sample,
        clip_sample_range=config.clip_sample_range,
    )


def _as_table(config_or_table: Union[SchedulerConfig, NoiseTable]) -> NoiseTable:
    if isinstance(config_or_table, NoiseTable):
        return config_or_table
    if isinstance(config_or_table, SchedulerConfig):
        return noise_table(config_or_table)
    raise TypeError(f"expected a SchedulerConfig or NoiseTable, got {type(config_or_table).__name__}")


def _per_sample(values: jax.Array, ndim: int) -> jax.Array:
    """A scalar stays a scalar; a (B,) vector becomes (B, 1, ..., 1) to broadcast over a sample."""
    values = jnp.asarray(values)
    if values.ndim == 0:
        return values
    if values.ndim != 1:
        raise ValueError(f"timesteps must be a scalar or (batch,), got shape {values.shape}")
    return values.reshape(values.shape + (1,) * (ndim - 1))


def ddpm_add_noise(
    config_or_table: Union[SchedulerConfig, NoiseTable], x0: jax.Array, noise: jax.Array, t: jax.Array
) -> jax.Array:
    """Forward diffusion q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise.

    x0, noise (B, ...); t int scalar or (B,) in [0, T). Returns x0's shape and dtype.
    """
    table = _as_table(config_or_table)
    a = _per_sample(table.alphas_cumprod[t], x0.ndim)
    noisy = jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a) * noise.astype(jnp.float32)
    return noisy.astype(x0.dtype)


def training_target(
    config_or_table: Union[SchedulerConfig, NoiseTable], x0: jax.Array, noise: jax.Array, t: jax.Array
) -> jax.Array:
    """What the model is trained to predict: the noise (epsilon, SD1.5), the velocity
    sqrt(a_t) noise - sqrt(1 - a_t) x0 (v_prediction), or x0 (sample). Shapes as `ddpm_add_noise`."""
    table = _as_table(config_or_table)
    if table.prediction_type == "epsilon":
        return noise
    if table.prediction_type == "sample":
        return x0
    a = _per_sample(table.alphas_cumprod[t], x0.ndim)
    velocity = jnp.sqrt(a) * noise.astype(jnp.float32) - jnp.sqrt(1.0 - a) * x0.astype(jnp.float32)
    return velocity.astype(x0.dtype)


def ddim_timesteps(config: SchedulerConfig, num_steps: int) -> jax.Array:
    """The descending timesteps of a `num_steps` DDIM run, as diffusers' `set_timesteps`. -> (num_steps,) int32.

    SD1.5 ("leading", offset 1), 50 steps: 981, 961, ..., 21, 1.
    """
    return jnp.asarray(ddim_timesteps_host(config, num_steps))


def ddim_timesteps_host(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    """`ddim_timesteps` as a numpy array (no device op: building a schedule compiles nothing)."""
    n = config.num_train_timesteps
    if not 1 <= num_steps <= n:
        raise ValueError(f"num_steps must be in [1, {n}], got {num_steps}")
    if config.timestep_spacing == "leading":
        ratio = n // num_steps
        ts = (np.arange(num_steps) * ratio)[::-1] + config.steps_offset
    elif config.timestep_spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
    else:  # linspace
        ts = np.linspace(0, n - 1, num_steps).round()[::-1]
    return ts.astype(np.int32)


def ddim_prev_timesteps(config: SchedulerConfig, timesteps: jax.Array) -> jax.Array:
    """The timestep each DDIM step lands on: t - T // num_steps (negative after the last step),
    diffusers' rule for every spacing. (S,) int32 -> (S,) int32."""
    return timesteps - config.num_train_timesteps // timesteps.shape[0]


def ddim_step(
    table: NoiseTable,
    model_output: jax.Array,
    t: jax.Array,
    prev_t: jax.Array,
    sample: jax.Array,
    eta: float = 0.0,
    noise: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update x_t -> x_{prev_t} (DDIM paper eqs. 12 and 16, as diffusers' DDIMScheduler.step).

    model_output, sample (B, ...); t, prev_t int scalars or (B,); prev_t < 0 uses
    `final_alpha_cumprod`. eta 0 is deterministic; eta > 0 adds `eta * sigma_t * noise`
    (noise (B, ...) required). Returns (prev_sample, pred_original_sample), sample's dtype.
    """
    ndim = sample.ndim
    prev_t = jnp.asarray(prev_t)
    a_t = _per_sample(table.alphas_cumprod[t], ndim)
    a_prev = jnp.where(prev_t >= 0, table.alphas_cumprod[jnp.maximum(prev_t, 0)], table.final_alpha_cumprod)
    a_prev = _per_sample(a_prev, ndim)
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    if table.prediction_type == "epsilon":
        pred_x0 = (x - jnp.sqrt(1.0 - a_t) * out) / jnp.sqrt(a_t)
        pred_eps = out
    elif table.prediction_type == "sample":
        pred_x0 = out
        pred_eps = (x - jnp.sqrt(a_t) * pred_x0) / jnp.sqrt(1.0 - a_t)
    else:  # v_prediction
        pred_x0 = jnp.sqrt(a_t) * x - jnp.sqrt(1.0 - a_t) * out
        pred_eps = jnp.sqrt(a_t) * out + jnp.sqrt(1.0 - a_t) * x
    if table.clip_sample:
        pred_x0 = jnp.clip(pred_x0, -table.clip_sample_range, table.clip_sample_range)
    deterministic = isinstance(eta, (int, float)) and eta == 0
    if deterministic:
        std = 0.0
    else:
        if noise is None:
            raise ValueError("ddim_step with eta != 0 needs `noise` shaped like the sample")
        variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
        std = eta * jnp.sqrt(variance)
    prev = jnp.sqrt(a_prev) * pred_x0 + jnp.sqrt(1.0 - a_prev - std**2) * pred_eps
    if not deterministic:
        prev = prev + std * noise.astype(jnp.float32)
    return prev.astype(sample.dtype), pred_x0.astype(sample.dtype)
