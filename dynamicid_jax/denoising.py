"""The denoising program: classifier-free guidance with SAA identities over a whole sampler
loop, then the VAE decode, as ONE jitted function shared by every pipeline of a process.

Why a module-level function with the modules as a static argument, not a method: two
pipelines built from the same config (the CLI's, the app's, an evaluation's in one process)
then share one compiled program, and the program does not capture any object. Why host
callbacks only when asked (`report_steps`, `capture_maps`): XLA programs with host callbacks
are never written to the persistent compilation cache, so a batch run or a `--requests` job
(no per-step progress) starts from the cache on the next process.

Callbacks reach their pipeline through a small registry: the program gets an int32 `sink`
operand naming the receiver (`host_sink`), since the callback runs on a runtime thread, not
the caller's.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax import schedulers
from dynamicid_jax.dynamicid.activation_maps import identity_activation_maps
from dynamicid_jax.dynamicid.saa import IdentityConditioning

_SINKS: dict[int, tuple[Optional[Callable[[], None]], Optional[dict]]] = {}
_NEXT = itertools.count(1)
_LOCK = threading.Lock()


@contextlib.contextmanager
def host_sink(on_step: Optional[Callable[[], None]] = None, maps: Optional[dict] = None):
    """Registers the receivers of one `denoise` call; yields its int32 `sink` operand.

    on_step: called after every denoising step (it may raise to cancel: the error aborts the
    loop between steps); maps: filled with {step: (N, n, h, w) float32} activation maps."""
    with _LOCK:
        key = next(_NEXT) % (2 ** 31)
        _SINKS[key] = (on_step, maps)
    try:
        yield jnp.int32(key)
    finally:
        with _LOCK:
            _SINKS.pop(key, None)


def _step_reached(sink, step):
    on_step = _SINKS.get(int(sink), (None, None))[0]
    if on_step is not None:
        on_step()


def _maps_reached(sink, step, maps):
    sink_maps = _SINKS.get(int(sink), (None, None))[1]
    if sink_maps is not None:
        sink_maps[int(step)] = np.asarray(maps)


@functools.partial(jax.jit, static_argnames=("modules", "gating", "use_boxes", "with_mix", "capture_maps",
                                             "report_steps"))
def denoise(
    params, rows, sampler, schedule, map_steps, sink, *, modules, gating: bool, use_boxes: bool, with_mix: bool,
    capture_maps: bool = False, report_steps: bool = False,
):
    """params: {"unet", "vae"}; rows: `batching.assemble`'s per-image arrays (N rows):
      noise (N, h, w, C) standard normal; conditioning: a `base_models.TextConditioning` of
      (N, 2, ...) [negative, positive]; id_tokens (N, 2, n, T, D) likewise; boxes (N, n, 4);
      step_key (N, 2): each image's key of the ancestral samplers' per-step noise; guidance,
      alpha_count, beta, id_scale, mix (N,); masks (N, n, H, W) bool, on the picture's pixels,
      and mask_used (N, n) when a person's region is a mask (batching.mask_rows; their
      presence is another program).
      Without the identity branch (`modules.identity_branch` False: plain text-to-image)
      id_tokens and boxes are absent and the UNet is called with identity None.
    sampler: () int32 index into schedulers.SCHEDULERS; schedule: its `schedulers.Schedule`
    padded to the training length (num_steps traced). capture_maps: at the steps in map_steps
    (K,), -1 padded, send the positive rows' per-identity activation maps (N, n, h, w) to
    `sink`'s dict (map_steps None otherwise). report_steps: call `sink`'s on_step after each
    step. Each flag is a separate program. modules: `modeling.DynamicIDModules` (hashable);
    the model call is its family's `denoiser`, the noise schedule its `scheduler`.
    Returns images (N, H, W, 3) float32 in [-1, 1].

    The model batch is 2N rows [neg_0, pos_0, neg_1, pos_1, ...]: (N, 2, ...) reshaped, so
    with the image axis split over devices every CFG pair stays on its image's device."""
    with jax.ensure_compile_time_eval():  # the table as constants of the program, computed once
        table = schedulers.noise_table(modules.scheduler)
    pairs = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731  (N, 2, ...) -> (2N, ...)
    per_row = lambda v: jnp.repeat(v, 2)[:, None]  # noqa: E731  (N,) -> (2N, 1): broadcasts over queries
    conditioning = jax.tree.map(pairs, rows["conditioning"])
    if modules.identity_branch:
        id_tokens, boxes = pairs(rows["id_tokens"]), jnp.repeat(rows["boxes"], 2, axis=0)
    guidance = rows["guidance"][:, None, None, None]
    masks = jnp.repeat(rows["masks"], 2, axis=0) if "masks" in rows else None  # (2N, n, H, W): regions.py
    mask_used = jnp.repeat(rows["mask_used"], 2, axis=0) if "masks" in rows else None

    def body(i, carry):
        x, state = carry
        t = schedule.timesteps[i]
        identity = None  # a base model alone (static: the UNet has no SAA to take it)
        if modules.identity_branch:
            identity = IdentityConditioning(
                tokens=id_tokens, boxes=boxes, layout_active=per_row(i < rows["alpha_count"]),
                beta=per_row(rows["beta"]), id_scale=per_row(rows["id_scale"]),
                mix=per_row(rows["mix"])[..., None, None] if with_mix else None, masks=masks,
                mask_used=mask_used, use_boxes=use_boxes, gating=gating,
            )
        x_in = schedulers.scale_model_input_by_index(sampler, schedule, i, x)
        x2 = jnp.repeat(x_in, 2, axis=0)  # [neg_0, pos_0, neg_1, pos_1, ...]
        t2 = jnp.broadcast_to(t, (x2.shape[0],))
        if capture_maps:
            eps, variables = modules.family.denoiser(modules, params["unet"], x2, t2, conditioning, identity,
                                                     capture=True)
            maps = identity_activation_maps(variables["intermediates"], x.shape[1:3], id_tokens.shape[2])
            jax.lax.cond(jnp.any(map_steps == i), lambda: jax.debug.callback(_maps_reached, sink, i, maps[1::2]),
                         lambda: None)
        else:
            eps = modules.family.denoiser(modules, params["unet"], x2, t2, conditioning, identity)
        eps = eps.reshape((-1, 2) + eps.shape[1:])
        uncond, cond = eps[:, 0], eps[:, 1]
        guided = uncond + guidance * (cond - uncond)
        x, state = schedulers.step_by_index(sampler, table, schedule, i, guided, x, state, rows["step_key"])
        if report_steps:
            jax.debug.callback(_step_reached, sink, i)
        return x, state

    start = rows["noise"] * schedule.init_sigma
    memory = schedulers.init_state("dpmpp_2m", start)  # the only multistep state; others pass it on
    latents, _ = jax.lax.fori_loop(0, schedule.num_steps, body, (start, memory))
    scale = modules.vae.config.scaling_factor
    images = modules.vae.apply({"params": params["vae"]}, latents / scale, method="decode")
    return jnp.clip(images, -1.0, 1.0)


def compiled_programs() -> int:
    """Programs `denoise` holds in this process (tests: a new request must not add one)."""
    return denoise._cache_size()
