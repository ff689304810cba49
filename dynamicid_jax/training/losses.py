"""The two training objectives, as pure functions of (modules, parameters, batch, draws).

anchor (stage 1), per example:
    z0 = sample(VAE moments) * scaling;  t ~ U{0..T-1};  z_t = sqrt(a_t) z0 + sqrt(1-a_t) eps
    one uniform draw u decides the classifier-free drop, mutually exclusive:
      u < p_face                    face dropped (zero ID vector, null CLIP image features)
      p_face <= u < p_face+p_text   text dropped (empty caption)
      next p_both                   both dropped
    loss = mean((denoiser(z_t, t, text, FaceProjection(id, clip)) - target)^2)   (the family's model call)

reconfig (stage 2), per example one identity with a source and T targets:
    src = FaceProjection(source), tgt = FaceProjection(targets) (frozen, (T, 4, D))
    pred = IMR(src, KPE(src landmarks), src face prompt, KPE(tgt landmarks), tgt face prompt)
    loss = mean((pred - tgt)^2) + lambda * mean((UNet(z_t; pred) - UNet(z_t; tgt))^2)
    with one noisy latent z_t of each target image, one t, the fixed prompt's text states;
    the second UNet call is a target (no gradient); gradients reach pred through the first.

Randomness: `anchor_draws` / `reconfig_draws` draw every random number of one update for the
whole global batch, as arrays with the batch's leading axis (latent sample noise, diffusion
noise, timesteps, the drop uniform). The losses take those arrays, not a key, so splitting
a batch into micro-batches (gradient accumulation) splits the draws with the rows and the
update is the same as without accumulation. (Per-example keys under `vmap` would not do:
with the rbg PRNG, vmap of a draw over a batch of keys uses only the first key.)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from dynamicid_jax.base_models import TextConditioning
from dynamicid_jax.dynamicid.saa import identity_conditioning
from dynamicid_jax.schedulers import NoiseTable, ddpm_add_noise, training_target

Batch = Mapping[str, jax.Array]


def drops_from_uniform(u: jax.Array, p_face: float, p_text: float, p_both: float):
    """Uniform draws (B,) in [0, 1) -> (drop_face (B,) bool, drop_text (B,) bool), exclusive bins."""
    if min(p_face, p_text, p_both) < 0 or p_face + p_text + p_both > 1:
        raise ValueError(f"drop probabilities must be >= 0 and sum to <= 1: {p_face}, {p_text}, {p_both}")
    face_only = u < p_face
    text_only = (u >= p_face) & (u < p_face + p_text)
    both = (u >= p_face + p_text) & (u < p_face + p_text + p_both)
    return face_only | both, text_only | both


def _per_example(mask: jax.Array, ndim: int) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (ndim - 1))


def latent_draws(rng: jax.Array, latent_shape: tuple[int, ...], num_timesteps: int) -> dict[str, jax.Array]:
    """The draws of `noisy_latents` for latents of `latent_shape` (B, ..., h, w, C): the VAE
    sample's standard normal, the diffusion noise and one timestep per latent (shape[:-3])."""
    k_latent, k_noise, k_t = jax.random.split(rng, 3)
    return {"latent_eps": jax.random.normal(k_latent, latent_shape, jnp.float32),
            "noise": jax.random.normal(k_noise, latent_shape, jnp.float32),
            "t": jax.random.randint(k_t, latent_shape[:-3], 0, num_timesteps)}


def noisy_latents(table: NoiseTable, mean, logvar, scaling: float, draws: Mapping[str, jax.Array]):
    """Cached VAE moments (B, h, w, C) + `latent_draws` of that shape -> (z_t, t (B,), target)."""
    z0 = (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * draws["latent_eps"]) * scaling
    noise, t = draws["noise"], draws["t"]
    return ddpm_add_noise(table, z0, noise, t), t, training_target(table, z0, noise, t)


def anchor_draws(rng: jax.Array, batch: Batch, num_timesteps: int) -> dict[str, jax.Array]:
    """Every random number of one anchor update, per example (leading axis = the batch's)."""
    k_noise, k_drop = jax.random.split(rng)
    draws = latent_draws(k_noise, batch["vae_mean"].shape, num_timesteps)
    draws["drop_uniform"] = jax.random.uniform(k_drop, batch["vae_mean"].shape[:1])
    return draws


def reconfig_draws(rng: jax.Array, batch: Batch, num_timesteps: int) -> dict[str, jax.Array]:
    """Every random number of one reconfig update: one noisy latent per target, (B, T, ...)."""
    return latent_draws(rng, batch["target_vae_mean"].shape, num_timesteps)


def _single_identity(tokens: jax.Array):
    """(B, T, D) tokens of one identity per image -> SAA conditioning (one full-image box)."""
    return identity_conditioning(tokens[:, None])


def text_conditioning(modules, params: Mapping[str, Any], input_ids: jax.Array) -> TextConditioning:
    """The base model's conditioning (context (B, L, D), extras) of token ids (B, L), with the
    frozen text encoder(s)."""
    return modules.family.text_conditioning(modules, params, input_ids)[0]


def with_record_extras(modules, conditioning: TextConditioning, fields: Mapping[str, jax.Array],
                       latents: jax.Array) -> TextConditioning:
    """`conditioning` plus the family's extras of a batch's record fields (SDXL: the time ids
    from original_size, crop_top_left and the trained size, the latents' (h, w) times the VAE
    factor); SD1.5 adds none."""
    f = modules.vae_scale_factor
    extras = modules.family.training_extras(fields, (latents.shape[-3] * f, latents.shape[-2] * f))
    return conditioning.replace(extras={**conditioning.extras, **extras}) if extras else conditioning


def _predict(modules, params: Mapping[str, Any], z_t, t, conditioning: TextConditioning, tokens) -> jax.Array:
    """The base model's prediction (float32) with one identity's tokens (B, T, D) per image."""
    return modules.family.denoiser(modules, params["unet"], z_t, t, conditioning,
                                   _single_identity(tokens)).astype(jnp.float32)


def anchor_loss(modules, params: Mapping[str, Any], batch: Batch, constants: Mapping[str, Any],
                draws: Mapping[str, jax.Array], *, table: NoiseTable, scaling: float,
                drops: tuple[float, float, float]):
    """Stage-1 loss. params: merged trainable+frozen {"unet", "text_encoder", "face_projection"};
    batch: vae_mean, vae_logvar (B, h, w, C), id_embedding (B, D), clip_image_features (B, N, W),
    input_ids (B, L) [or text_states (B, L, Dt)]; constants["null"]: the dataset's null inputs;
    draws: `anchor_draws` of this batch. Returns (loss, metrics)."""
    z_t, t, target = noisy_latents(table, batch["vae_mean"], batch["vae_logvar"], scaling, draws)
    drop_face, drop_text = drops_from_uniform(draws["drop_uniform"], *drops)
    null = constants["null"]

    clip = batch["clip_image_features"].astype(jnp.float32)
    clip = jnp.where(_per_example(drop_face, 3), null["clip_image_features"].astype(jnp.float32)[None], clip)
    id_embedding = jnp.where(drop_face[:, None], 0.0, batch["id_embedding"].astype(jnp.float32))
    if "text_states" in batch:
        text = TextConditioning(
            context=jnp.where(_per_example(drop_text, 3), null["text_states"][None], batch["text_states"]))
    else:  # ids (B, L), or (B, 2, L) on SDXL
        ids = jnp.where(_per_example(drop_text, batch["input_ids"].ndim), null["input_ids"][None], batch["input_ids"])
        text = text_conditioning(modules, params, ids)
    text = with_record_extras(modules, text, batch, z_t)

    tokens = modules.face_projection.apply({"params": params["face_projection"]}, id_embedding, clip)
    pred = _predict(modules, params, z_t, t, text, tokens)
    loss = jnp.mean(jnp.square(pred - target.astype(jnp.float32)))
    metrics = {"face_dropped": drop_face.mean(), "text_dropped": drop_text.mean()}
    return loss, metrics


def _flatten_targets(x: jax.Array) -> jax.Array:
    """(B, T, ...) -> (B*T, ...)."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def reconfig_loss(modules, params: Mapping[str, Any], model_state: Mapping[str, Any], batch: Batch,
                  constants: Mapping[str, Any], draws: Mapping[str, jax.Array], *, table: NoiseTable,
                  scaling: float, consistency_weight: float):
    """Stage-2 loss. params: merged {"unet", "face_projection", "imr", "keypoint_encoder"
    (params only)}; model_state: {"keypoint_encoder": {"batch_stats"}}; batch: source_* (B, ...)
    and target_* (B, T, ...) of id_embedding, clip_image_features, landmark_image,
    face_prompt_embedding, vae_mean, vae_logvar; constants["prompt"]: the fixed prompt's
    TextConditioning, batch 1; draws:
    `reconfig_draws` of this batch. Returns (loss, (metrics, new model_state))."""
    b, n_targets = batch["target_id_embedding"].shape[:2]
    project = lambda i, c: modules.face_projection.apply(  # noqa: E731
        {"params": params["face_projection"]}, i.astype(jnp.float32), c.astype(jnp.float32))
    src_tokens = project(batch["source_id_embedding"], batch["source_clip_image_features"])
    tgt_tokens = jax.lax.stop_gradient(project(_flatten_targets(batch["target_id_embedding"]),
                                               _flatten_targets(batch["target_clip_image_features"])))

    # One BatchNorm pass over source and target landmarks together (training-mode statistics).
    landmarks = jnp.concatenate(
        [batch["source_landmark_image"], _flatten_targets(batch["target_landmark_image"])], axis=0)
    kpe_vars = {"params": params["keypoint_encoder"]["params"], **model_state["keypoint_encoder"]}
    features, updates = modules.keypoint_encoder.apply(kpe_vars, landmarks, train=True, mutable=["batch_stats"])
    src_landmark, tgt_landmark = features[:b], features[b:]

    repeat = lambda x: jnp.repeat(x, n_targets, axis=0)  # noqa: E731  one source row per target
    pred = modules.imr.apply(
        {"params": params["imr"]},
        repeat(src_tokens),
        repeat(src_landmark),
        repeat(batch["source_face_prompt_embedding"].astype(jnp.float32)),
        tgt_landmark,
        _flatten_targets(batch["target_face_prompt_embedding"]).astype(jnp.float32),
    )
    feature_loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - tgt_tokens.astype(jnp.float32)))

    z_t, t, _ = noisy_latents(table, _flatten_targets(batch["target_vae_mean"]),
                              _flatten_targets(batch["target_vae_logvar"]), scaling,
                              jax.tree.map(_flatten_targets, dict(draws)))
    prompt = jax.tree.map(lambda a: jnp.broadcast_to(a, (z_t.shape[0],) + a.shape[1:]), constants["prompt"])
    targets = {k[len("target_"):]: _flatten_targets(v) for k, v in batch.items() if k.startswith("target_")}
    prompt = with_record_extras(modules, prompt, targets, z_t)  # each target image's own time ids (SDXL)
    unet = lambda tokens: _predict(modules, params, z_t, t, prompt, tokens)  # noqa: E731
    consistency = jnp.mean(jnp.square(unet(pred) - jax.lax.stop_gradient(unet(tgt_tokens))))
    loss = feature_loss + consistency_weight * consistency
    metrics = {"feature_loss": feature_loss, "consistency_loss": consistency}
    return loss, (metrics, {"keypoint_encoder": {"batch_stats": updates["batch_stats"]}})
