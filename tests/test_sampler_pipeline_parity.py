"""End to end, per sampler: a tiny random SD1.5 UNet + VAE saved by diffusers, sampled by
diffusers' `StableDiffusionPipeline` from given latents, equals our whole sampling loop
(`DynamicIDPipeline`'s jitted denoise + decode, with the schedule and noise `generate` makes;
identity branch off: gating off, identity scale 0, zero DynamicID LoRA) on the decoded image.

One shape for every sampler (the demo model's 64 px, 3 steps, CFG on) and the sampler is a
traced index: the loop compiles once for all six.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dynamicid_jax import denoising, modeling  # noqa: E402
from dynamicid_jax import schedulers as S  # noqa: E402
from dynamicid_jax.dynamicid import published_weights as pw  # noqa: E402
from dynamicid_jax.models import load_unet, load_vae  # noqa: E402
from dynamicid_jax.base_models import TextConditioning, default_config  # noqa: E402
from dynamicid_jax.pipeline import DynamicIDPipeline  # noqa: E402
from parity import TINY_DEMO_UNET, TINY_DEMO_VAE, rel_l2  # noqa: E402
from test_samplers import REFERENCE  # noqa: E402
from test_schedulers import SD15_SCHEDULER_JSON  # noqa: E402
from test_single_file import randomise_  # noqa: E402

STEPS, GUIDANCE, SIZE = 3, 5.0, 64
# Relative L2 on the decoded image (float32 both sides): the 1e-4 bound.
IMAGE_RTOL = 1e-4


class _NoFaces:  # the loop needs no face models; the pipeline checks the embedding size only
    def __init__(self, dim):
        self.embedding_dim, self.name = dim, "none"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("tiny_sd15_pipeline"))


def build_models(folder):
    """Torch UNet/VAE, our pipeline with the same weights, text states (also for benchmarks/schedulers.py)."""
    unet = diffusers.UNet2DConditionModel(**TINY_DEMO_UNET).eval()
    vae = diffusers.AutoencoderKL(**TINY_DEMO_VAE).eval()
    randomise_(unet, 0)
    randomise_(vae, 1)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    model = default_config(tiny=True).model
    model.scheduler = dataclasses.asdict(S.SchedulerConfig.from_diffusers(SD15_SCHEDULER_JSON))
    modules = modeling.build_modules(model)
    _, unet_base = load_unet(folder)
    _, vae_params = load_vae(folder)
    shapes = modeling.abstract_params(modules)["unet"]
    params = {"unet": pw.init_dynamicid_unet_params(unet_base, jax.random.PRNGKey(0), modules.unet.config.lora_rank,
                                                    abstract_params=shapes), "vae": vae_params}
    ours = DynamicIDPipeline(modules, jax.device_put(params), None, _NoFaces(modules.id_dim))
    rng = np.random.default_rng(0)
    width = modules.unet.config.cross_attention_dim
    context = rng.standard_normal((2, 77, width)).astype(np.float32)  # [negative; positive] text states
    return dict(unet=unet, vae=vae, ours=ours, context=context)


def _our_images(models, name, noise, step_key):
    """What `generate` runs for a one-identity request with the identity branch off."""
    ours = models["ours"]
    schedule = S.make_schedule(name, ours.scheduler, STEPS)
    # One image's row (batching.py's per-image layout): [negative, positive] on axis 1.
    tokens = jnp.zeros((1, 2, 1, ours.modules.face_projection.num_tokens, models["context"].shape[-1]))
    boxes = jnp.asarray([[[0.0, 0.0, 1.0, 1.0]]])
    row = lambda v, dtype=jnp.float32: jnp.asarray([v], dtype)  # noqa: E731  (N,) = (1,)
    rows = dict(noise=noise, conditioning=TextConditioning(context=jnp.asarray(models["context"])[None]),
                id_tokens=tokens, boxes=boxes, step_key=step_key, guidance=row(GUIDANCE), alpha_count=row(1, jnp.int32),
                beta=row(4.0), id_scale=row(0.0), mix=row(0.0))
    images = denoising.denoise(
        {"unet": ours.params["unet"], "vae": ours.params["vae"]}, rows, jnp.int32(S.sampler_index(name)), schedule,
        None, jnp.int32(0), modules=ours.modules, gating=False, use_boxes=False, with_mix=False)
    return np.asarray(images) * 0.5 + 0.5


def _diffusers_images(models, name, noise, step_key):
    cls, extra = REFERENCE[name]
    scheduler = cls.from_config({**SD15_SCHEDULER_JSON, **extra})
    pipe = diffusers.StableDiffusionPipeline(
        vae=models["vae"], text_encoder=None, tokenizer=None, unet=models["unet"], scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    draws = iter(range(STEPS))
    # The ancestral samplers' per-step noise: ours, fed to diffusers' scheduler in NCHW.
    fake_randn = lambda shape, **kw: torch.from_numpy(  # noqa: E731
        np.asarray(S.step_noise(step_key, next(draws), noise.shape)).transpose(0, 3, 1, 2).copy())
    module = __import__(cls.__module__, fromlist=["randn_tensor"])
    original = module.randn_tensor
    module.randn_tensor = fake_randn
    try:
        with torch.no_grad():
            out = pipe(prompt_embeds=torch.from_numpy(models["context"][1:]),
                       negative_prompt_embeds=torch.from_numpy(models["context"][:1]),
                       latents=torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy()),
                       num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                       output_type="np")
    finally:
        module.randn_tensor = original
    return out.images  # (1, H, W, 3) in [0, 1]


_PROGRAMS: dict = {}


@pytest.mark.parametrize("name", S.SCHEDULERS)
def test_whole_loop_matches_stable_diffusion_pipeline(models, name):
    f = models["ours"].modules.vae_scale_factor
    noise, step_key = DynamicIDPipeline.initial_noise(3, (1, SIZE // f, SIZE // f, 4))
    ours = _our_images(models, name, noise, step_key)
    theirs = _diffusers_images(models, name, noise, step_key)
    assert rel_l2(ours, theirs) <= IMAGE_RTOL
    # Every sampler shares one program (the count is per process: taken after the first sampler).
    assert denoising.compiled_programs() == _PROGRAMS.setdefault("after the first", denoising.compiled_programs())
