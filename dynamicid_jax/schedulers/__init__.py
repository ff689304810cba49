"""Noise schedules and samplers as pure JAX functions, diffusers-compatible.

`ddim`: the schedule config, DDPM noising and training targets (training), DDIM steps.
`samplers`: every sampler of the sampling loop (DDIM, DPM-Solver++ 2M, Euler, Euler
ancestral, LCM) behind one host-side `make_schedule` and one device-side `step`.
"""

from dynamicid_jax.schedulers.ddim import (  # noqa: F401
    NoiseTable,
    SchedulerConfig,
    alphas_cumprod,
    alphas_cumprod64,
    ddim_prev_timesteps,
    ddim_step,
    ddim_timesteps,
    ddpm_add_noise,
    noise_table,
    training_target,
)
from dynamicid_jax.schedulers.samplers import (  # noqa: F401
    SCHEDULERS,
    Schedule,
    describe,
    init_state,
    make_schedule,
    max_steps,
    needs_noise,
    sampler_index,
    scale_model_input,
    scale_model_input_by_index,
    step,
    step_by_index,
    step_noise,
    step_noise_key,
)
