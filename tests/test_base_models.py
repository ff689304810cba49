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


def test_family_detected_from_the_files(fine_tune, tmp_path):
    """detect(): an SD1.5 diffusers folder; a folder with text_encoder_2/ or a text_time UNet
    (SDXL); single files by their keys (SGM's bigG key), never by name; nothing there is one
    clear error. Reads configs and safetensors headers only."""
    import json
    import shutil

    from safetensors.numpy import save_file

    from dynamicid_jax.errors import MissingFileError

    assert base_models.detect(fine_tune) == "sd15"
    with_second_encoder = tmp_path / "sdxl_folder"
    shutil.copytree(fine_tune, with_second_encoder)
    (with_second_encoder / "text_encoder_2").mkdir()
    assert base_models.detect(with_second_encoder) == "sdxl"
    text_time = tmp_path / "text_time"
    shutil.copytree(fine_tune, text_time)
    unet_config = json.loads((text_time / "unet" / "config.json").read_text())
    unet_config.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=80)
    (text_time / "unet" / "config.json").write_text(json.dumps(unet_config))
    assert base_models.detect(text_time) == "sdxl"
    sgm = tmp_path / "v1-5-pruned.safetensors"  # an SD1.5 name: the keys decide
    save_file({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": np.ones(4, np.float32)},
              str(sgm))
    assert base_models.detect(sgm) == "sdxl"
    ldm = tmp_path / "sd_xl_base.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(4, np.float32)}, str(ldm))
    assert base_models.detect(ldm) == "sd15"
    with pytest.raises(MissingFileError, match="nowhere: no such file or folder"):
        base_models.detect(tmp_path / "nowhere")


def test_sdxl_sizes_dynamicid_by_the_seam():
    """SDXL's full-size modules (no parameters built): identity tokens as wide as the UNet's
    context (2048), IMR's text side CLIP-L's 768, two text encoders, SDXL's VAE scale and
    native size (and the negative prompt a code-built request draws); without DynamicID
    weights the UNet has no SAA and no LoRA."""
    config = base_models.default_config(family="sdxl")
    assert config.sampling.height == config.sampling.width == 1024
    modules = modeling.build_modules(config.model)
    assert modules.face_projection.width == modules.imr.id_dim == modules.unet.config.cross_attention_dim == 2048
    assert modules.imr.text_dim == modules.text_encoder.config.hidden_size == 768
    assert modules.text_encoder_2.config.projection_dim == 1280 and modules.components[-1] == "text_encoder_2"
    assert modules.vae.config.scaling_factor == 0.13025 and modules.identity_branch
    plain = modeling.build_modules(config.model, identity_branch=False)
    assert plain.unet.config.saa is None and plain.unet.config.lora_rank == 0 and not plain.identity_branch
    sd15 = modeling.build_modules(base_models.default_config(tiny=True).model)
    assert sd15.text_encoder_2 is None and sd15.components == modeling.COMPONENTS
    # A request built without a size draws each family's native one (the pipeline's rule, on
    # the modules alone: no weights, no compile).
    from types import SimpleNamespace

    from dynamicid_jax.pipeline import DynamicIDPipeline
    from dynamicid_jax.request import SampleRequest

    full_sd15 = modeling.build_modules(base_models.default_config().model)
    for built, side in ((modules, 1024), (full_sd15, 512)):
        request = DynamicIDPipeline.complete(SimpleNamespace(modules=built), SampleRequest(identities=[]))
        assert (request.height, request.width) == (side, side)
    # ... and each family's negative prompt (SDXL none, so its zeros rule applies; SD1.5
    # DynamicID's), with a textual-inversion file's name appended after it is resolved; a
    # negative prompt given is kept.
    from dynamicid_jax.request import DEFAULT_NEGATIVE_PROMPT

    complete = lambda built, **kw: DynamicIDPipeline.complete(SimpleNamespace(modules=built),  # noqa: E731
                                                              SampleRequest(identities=[], **kw)).negative_prompt
    assert complete(modules) == "" and complete(full_sd15) == DEFAULT_NEGATIVE_PROMPT
    assert complete(modules, negative_embeddings=["emb/bad_hands.pt"]) == "bad_hands"
    assert complete(full_sd15, negative_embeddings=["bad_hands.pt"]) == f"{DEFAULT_NEGATIVE_PROMPT}, bad_hands"
    assert complete(modules, negative_prompt="blurry") == "blurry"


def test_sdxl_negative_zeroing_follows_model_index():
    """diffusers' force_zeros_for_empty_prompt: zeros for an empty negative prompt only, and
    only when the folder's model_index.json says so (the family object a model configures)."""
    from dynamicid_jax.base_models import TextConditioning

    encoded = TextConditioning(context=np.ones((77, 4), np.float32), extras={"text_embeds": np.ones(3, np.float32)})
    model = base_models.default_config(tiny=True, family="sdxl").model
    family = modeling.build_modules(model).family
    zeroed = family.negative_conditioning(encoded, "")
    assert not zeroed.context.any() and not zeroed.extras["text_embeds"].any()
    assert family.negative_conditioning(encoded, "blurry") is encoded
    model.force_zeros_for_empty_prompt = False
    assert modeling.build_modules(model).family.negative_conditioning(encoded, "") is encoded
    assert base_models.get("sd15").negative_conditioning(encoded, "") is encoded
    np.testing.assert_array_equal(family.request_extras(832, 1216)["time_ids"], [832, 1216, 0, 0, 832, 1216])
def test_the_vae_keeps_float32_under_a_bfloat16_model_unless_asked():
    """--dtype bfloat16 halves the UNet and encoders; the VAE follows --vae_dtype (float32 by
    default). One demo load (~20 s: face models and the cached tiny init, nothing compiled);
    the asked-for bfloat16 VAE is the same cast on the module and its params."""
    import jax
    import jax.numpy as jnp

    _, pipeline = loading.load_pipeline(demo=True, dtype="bfloat16")
    assert pipeline.modules.vae.dtype == jnp.float32
    assert {a.dtype for a in jax.tree.leaves(pipeline.params["vae"])} == {jnp.dtype(jnp.float32)}
    assert {a.dtype for a in jax.tree.leaves(pipeline.params["unet"])} == {jnp.dtype(jnp.bfloat16)}
    assert pipeline.modules.unet.dtype == jnp.bfloat16
    asked = modeling.build_modules(base_models.default_config(tiny=True).model, dtype=jnp.bfloat16,
                                   vae_dtype=jnp.bfloat16)
    assert asked.vae.dtype == jnp.bfloat16


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
