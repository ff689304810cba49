"""The base-model seam (`dynamicid_jax.base_models`): a family's sections come from the base
model's own files, and what the files say reaches training and sampling.

Costs: no XLA program is compiled (the loss is intercepted before it runs); diffusers and
transformers write tiny configs in about 1 s after their import (~5 s).
"""

from __future__ import annotations

import numpy as np
import pytest

from dynamicid_jax import base_models, loading, modeling, schedulers
from dynamicid_jax.training import losses, stages, step
from parity import TINY_DEMO_UNET, TINY_DEMO_VAE

# A fine-tune whose files say other things than SD1.5's defaults.
SCALING = 0.5
BETA_END = 0.02


def _write_configs(folder):
    """A diffusers pipeline folder's config files (the family reads no weights for them)."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    diffusers.UNet2DConditionModel(**TINY_DEMO_UNET).save_config(folder / "unet")
    diffusers.AutoencoderKL(**TINY_DEMO_VAE, scaling_factor=SCALING).save_config(folder / "vae")
    transformers.CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, max_position_embeddings=77).save_pretrained(folder / "text_encoder")
    diffusers.DDIMScheduler(beta_start=0.00085, beta_end=BETA_END, beta_schedule="scaled_linear",
                            steps_offset=1).save_config(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory):
    return _write_configs(tmp_path_factory.mktemp("fine_tune"))


def test_sections_come_from_the_files(fine_tune):
    config = loading.sampling_config(False, None, str(fine_tune))
    model = config.model
    assert model.family == "sd15"
    assert model.vae.scaling_factor == SCALING  # not SD1.5's 0.18215
    assert model.scheduler.beta_end == BETA_END
    assert tuple(model.unet.block_out_channels) == TINY_DEMO_UNET["block_out_channels"]
    assert model.text.hidden_size == 32
    # The DynamicID sections and the UNet's DynamicID fields stay the config's.
    assert model.lora_rank == base_models.default_config().model.lora_rank
    modules = modeling.build_modules(model)
    assert modules.vae.config.scaling_factor == SCALING
    assert modules.scheduler.beta_end == BETA_END


def test_training_scales_latents_by_the_files_factor(fine_tune, monkeypatch):
    """The anchor step's latent scale and noise table are the base model's, not constants:
    the loss is intercepted with the arguments the step gives it."""
    modules = modeling.build_modules(loading.sampling_config(False, None, str(fine_tune)).model)
    seen = {}

    def anchor_loss(*args, **kwargs):
        seen.update(kwargs)
        return 0.0, {}

    monkeypatch.setattr(losses, "anchor_loss", anchor_loss)
    config = base_models.default_config()
    config.loss = dict(face_drop=0.05, text_drop=0.05, both_drop=0.05)
    loss_fn, _ = step._loss_fn(stages.get("anchor"), modules, config, None)
    loss_fn({}, {}, {}, {}, {}, {})
    assert seen["scaling"] == SCALING
    expected = schedulers.noise_table(schedulers.SchedulerConfig(**{**base_models.sd15.SCHEDULER, "beta_end": BETA_END}))
    sd15 = schedulers.noise_table(schedulers.SchedulerConfig(**base_models.sd15.SCHEDULER))
    np.testing.assert_array_equal(np.asarray(seen["table"].alphas_cumprod), np.asarray(expected.alphas_cumprod))
    assert not np.allclose(np.asarray(expected.alphas_cumprod), np.asarray(sd15.alphas_cumprod))  # a real difference


def test_a_single_file_keeps_the_familys_sections(tmp_path):
    """A single checkpoint carries no config: the family's own sections stand."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")  # never read for its config
    model = base_models.get("sd15").model_from_files(base_models.default_config().model, path)
    assert model.to_dict() == base_models.default_config().model.to_dict()


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="unknown base-model family 'flux'.*sd15"):
        base_models.get("flux")


def test_old_training_configs_without_family_are_sd15():
    """A run's config.json from before `family`/`scheduler` were model fields was an SD1.5 run."""
    model = base_models.default_config(tiny=True).model
    del model["family"], model["scheduler"]
    modules = modeling.build_modules(model)
    assert modules.family is base_models.get("sd15")
    assert modules.scheduler == schedulers.SchedulerConfig(**base_models.sd15.SCHEDULER)


@pytest.mark.parametrize("vae_dtype", ["float32", "bfloat16"])
def test_the_vae_keeps_float32_under_a_bfloat16_model_unless_asked(vae_dtype):
    """--dtype bfloat16 halves the UNet and encoders; the VAE follows --vae_dtype (float32 by
    default). Loading only: nothing is compiled but the tiny random init (cached on disk)."""
    import jax
    import jax.numpy as jnp

    _, pipeline = loading.load_pipeline(demo=True, dtype="bfloat16", vae_dtype=vae_dtype)
    want = jnp.dtype(vae_dtype)
    assert pipeline.modules.vae.dtype == want
    assert {a.dtype for a in jax.tree.leaves(pipeline.params["vae"])} == {want}
    assert {a.dtype for a in jax.tree.leaves(pipeline.params["unet"])} == {jnp.dtype(jnp.bfloat16)}
    assert pipeline.modules.unet.dtype == jnp.bfloat16


def test_training_reads_the_base_models_files(fine_tune):
    """A run from a fine-tune trains with its files' VAE scale and schedule (and records them);
    a random-init run keeps its config."""
    from dynamicid_jax.training import trainer
    from dynamicid_jax.training.defaults import common_config

    config = common_config(None)
    config.init.base_model = str(fine_tune)
    resolved = trainer.with_base_model_files(config)
    assert resolved.model.vae.scaling_factor == SCALING and resolved.model.scheduler.beta_end == BETA_END
    assert config.model.vae.scaling_factor != SCALING  # the caller's config is left as given
    tiny = common_config("tiny")
    tiny.init.base_model = str(fine_tune)  # ignored: init.random
    assert trainer.with_base_model_files(tiny).model.to_dict() == tiny.model.to_dict()
