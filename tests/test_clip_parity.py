"""CLIP towers against transformers: tiny random models saved by transformers, loaded by our loaders."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from dynamicid_jax.base_models import sd15
from dynamicid_jax.models import clip, clip_weights
from dynamicid_jax.models.torch_import import WeightImportError
from parity import rel_l2

TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=998, pad_token_id=999)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=4, projection_dim=16, hidden_act="gelu")


def token_ids() -> np.ndarray:
    """Batch of 3 prompts: BOS 998, random tokens, EOS 999 (the largest id, as in CLIP's vocabulary),
    then padding with the EOS id (as SD1.5's tokenizer)."""
    ids = np.random.default_rng(0).integers(0, 990, (3, 77))
    ids[:, 0] = 998
    for row, n in enumerate((10, 40, 76)):
        ids[row, n:] = 999
    return ids


@pytest.fixture(scope="module", params=[2, 999], ids=["legacy_eos2_argmax", "eos_first_match"])
def text_case(request, tmp_path_factory):
    """(reference torch model, our loaded module, params, input ids) for one EOS rule: config
    eos_token_id 2 (SD1.5's legacy value: argmax of the ids) or the real EOS id (first match)."""
    eos = request.param
    torch.manual_seed(eos)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(eos_token_id=eos, **TEXT)).eval()
    pipeline = tmp_path_factory.mktemp(f"text{eos}")
    ref.save_pretrained(pipeline / "text_encoder")  # transformers 5 writes keys without `text_model.`
    module, params = clip_weights.load_text_encoder(pipeline)
    return ref, module, params, token_ids()


@pytest.fixture(scope="module")
def vision_case(tmp_path_factory):
    torch.manual_seed(1)
    ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION)).eval()
    folder = tmp_path_factory.mktemp("image_encoder")
    ref.save_pretrained(folder)  # keys `vision_model.*` plus `visual_projection.weight`
    module, params = clip_weights.load_vision_encoder(folder)
    pixels = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    return ref, module, params, pixels, folder


def test_text_tower_matches_transformers(text_case):
    ref, module, params, ids = text_case
    with torch.no_grad():
        want = ref(torch.from_numpy(ids))
    last, pooled = jax.jit(module.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
    assert last.shape == (3, 77, 32) and pooled.shape == (3, 32)
    assert rel_l2(last, want.last_hidden_state) <= 1e-4
    assert rel_l2(pooled, want.pooler_output) <= 1e-4
    # Pooling really reads the EOS row: it equals last_hidden_state at the expected positions.
    positions = np.asarray(clip.eos_positions(jnp.asarray(ids), module.config.eos_token_id))
    np.testing.assert_array_equal(positions, [10, 40, 76])
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(last)[np.arange(3), positions])


def test_text_tower_single_file_and_bfloat16(text_case, tmp_path):
    ref, module, params, ids = text_case
    # A single-file SD checkpoint stores the text encoder as cond_stage_model.transformer.text_model.*
    ldm = {f"cond_stage_model.transformer.text_model.{k}": v.numpy() for k, v in ref.state_dict().items()}
    ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None].astype(np.int64)
    save_file(ldm, str(tmp_path / "model.safetensors"))
    single, single_params = clip_weights.load_text_encoder(tmp_path / "model.safetensors", config=module.config)
    jax.tree.map(np.testing.assert_array_equal, single_params, params)

    bf16, _ = clip_weights.load_text_encoder(tmp_path / "model.safetensors", dtype=jnp.bfloat16, config=module.config)
    last32, _ = jax.jit(module.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
    last16, _ = jax.jit(bf16.apply)({"params": single_params}, jnp.asarray(ids, jnp.int32))
    assert jax.tree.leaves(single_params)[0].dtype == np.float32  # params stay float32
    assert last16.dtype == jnp.bfloat16
    assert rel_l2(last16, last32) <= 3e-2


def test_vision_tower_matches_transformers(vision_case):
    ref, module, params, pixels, _ = vision_case
    with torch.no_grad():
        want = ref(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
        want_pooled = ref.vision_model(torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output
    last, pooled, hidden = jax.jit(module.apply)({"params": params}, jnp.asarray(pixels))
    assert last.shape == (2, 65, 32) and len(hidden) == 3 == len(want.hidden_states)
    assert rel_l2(last, want.last_hidden_state) <= 1e-4
    assert rel_l2(pooled, want_pooled) <= 1e-4
    for i, (ours, theirs) in enumerate(zip(hidden, want.hidden_states)):
        assert rel_l2(ours, theirs) <= 1e-4, f"hidden_states[{i}]"
    assert "visual_projection" not in params  # the projection head is deliberately not imported


def test_vision_loader_layouts_and_shape_check(vision_case, tmp_path):
    ref, module, params, _, folder = vision_case
    # transformers 5's CLIPVisionModel writes keys without `vision_model.`: same params.
    ref.vision_model.save_pretrained(tmp_path / "image_encoder")
    _, plain = clip_weights.load_vision_encoder(tmp_path)  # a folder holding image_encoder/
    jax.tree.map(np.testing.assert_array_equal, plain, params)
    with pytest.raises(ValueError, match=r"pixels must be \(batch, 32, 32, 3\)"):
        module.apply({"params": params}, jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(FileNotFoundError, match="not found"):
        clip_weights.load_vision_encoder(tmp_path / "nowhere")


def test_import_errors_name_the_key(text_case):
    ref, module, _, _ = text_case
    good = {f"text_model.{k}": v.numpy() for k, v in ref.state_dict().items()}
    good["text_model.embeddings.position_ids"] = np.arange(77)[None]  # a known buffer: ignored
    clip_weights.import_text_params(module.config, good)

    missing = dict(good)
    del missing["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(WeightImportError, match=r"1 missing: text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        clip_weights.import_text_params(module.config, missing)
    unexpected = {**good, "text_model.encoder.layers.2.self_attn.q_proj.weight": np.zeros((32, 32), np.float32)}
    with pytest.raises(WeightImportError, match=r"unexpected: text_model\.encoder\.layers\.2\.self_attn\.q_proj"):
        clip_weights.import_text_params(module.config, unexpected)
    misshaped = {**good, "text_model.final_layer_norm.weight": np.ones(33, np.float32)}
    with pytest.raises(WeightImportError, match=r"mis-shaped: text_model\.final_layer_norm\.weight"):
        clip_weights.import_text_params(module.config, misshaped)
    mixed = {**good, "embeddings.token_embedding.weight": good["text_model.embeddings.token_embedding.weight"]}
    with pytest.raises(WeightImportError, match="mixes keys"):
        clip_weights.import_text_params(module.config, mixed)
    with pytest.raises(ValueError, match="exceeds max_positions 77"):
        module.init(jax.random.PRNGKey(0), jnp.zeros((1, 78), jnp.int32))


def test_configs_from_transformers(text_case, vision_case):
    ref_text, text_module, _, _ = text_case
    assert clip.CLIPTextConfig.from_transformers(ref_text.config.to_dict()) == text_module.config
    ref_vision, vision_module, *_ = vision_case
    assert clip.CLIPVisionConfig.from_transformers(json.loads(ref_vision.config.to_json_string())) == (
        vision_module.config
    )
    with pytest.raises(ValueError, match="hidden_act 'swish'"):
        clip.CLIPTextConfig.from_transformers({**ref_text.config.to_dict(), "hidden_act": "swish"})


def test_full_size_parameter_counts():
    def count(module, x):
        shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
        return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))

    # Published sizes: SD1.5's text encoder 123,060,480; ViT-H/14 vision tower without its projection.
    assert count(clip.CLIPTextModel(sd15.text_config()), jax.ShapeDtypeStruct((1, 77), jnp.int32)) == 123_060_480
    vit_h = clip.CLIPVisionModel(clip.CLIPVisionConfig.vit_h14())
    assert round(count(vit_h, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)) / 1e6, 1) == 630.8
    assert vit_h.config.num_positions == 257


@pytest.mark.parametrize("size", [(300, 260), (150, 200), (224, 224)], ids=["down_tall", "up_wide", "same"])
def test_clip_preprocess_matches_clip_image_processor(size):
    """Against the PIL-backed CLIPImageProcessor (transformers' choice without torchvision, and
    the processor IP-Adapter was trained with)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    h, w = size
    rng = np.random.default_rng(h)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = 127 + 100 * np.sin(xx[..., None] / 9.0 + np.arange(3)) * np.cos(yy[..., None] / 13.0)
    images = np.clip(smooth + rng.normal(0, 20, (2, h, w, 3)), 0, 255).astype(np.uint8)  # saturates: worst case
    ref = CLIPImageProcessorPil()(list(images), return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
    ours = np.asarray(clip.clip_preprocess(images))
    assert ours.shape == ref.shape == (2, 224, 224, 3)
    # Tolerance in uint8 levels (difference x std x 255): kernel weights are float here and
    # fixed-point in PIL, so a value near .5 may round the other way: at most 1 level.
    levels = np.abs(ours - ref) * np.asarray(clip.CLIP_STD) * 255
    assert levels.max() <= 1.0 + 1e-3 and levels.mean() <= 0.02, (levels.mean(), levels.max())
    if size == (224, 224):
        np.testing.assert_allclose(ours, ref, atol=1e-5)  # no resampling: exact up to float rounding
    # The host (PIL) version the sampler uses is transformers' own resize: equal up to float rounding.
    np.testing.assert_allclose(np.stack([clip.clip_preprocess_host(i) for i in images]), ref, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        clip.clip_preprocess(images.astype(np.float32))


def test_vision_tower_sharded_forward_equals_unsharded(vision_case):
    """The generic path/shape sharding rules place the CLIP tower on the 8 fake devices (fsdp 4)."""
    from dynamicid_jax import sharding

    _, module, params, _, _ = vision_case
    pixels = np.random.default_rng(2).standard_normal((8, 32, 32, 3)).astype(np.float32)
    forward = lambda p, x: module.apply({"params": p}, x)[0]  # noqa: E731
    expected = np.asarray(jax.jit(forward)(params, pixels))
    mesh = sharding.make_mesh(2, -1)
    shardings = sharding.param_shardings(params, mesh, min_size=512)  # tiny model: split kernels of >= 512
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings))
    batch = sharding.batch_sharding(mesh)
    out = jax.jit(forward, in_shardings=(shardings, batch), out_shardings=batch)(
        jax.device_put(params, shardings), jax.device_put(pixels, batch)
    )
    assert rel_l2(out, expected) <= 1e-5


def test_clip_skip_matches_transformers_hidden_states(text_case):
    """clip_skip N = hidden_states[-(N + 1)] through the final LayerNorm (diffusers' rule for
    StableDiffusionPipeline(clip_skip=N)); pooled stays the last layer's."""
    ref, module, params, ids = text_case
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
        tower = getattr(ref, "text_model", ref)  # transformers 5 dropped the text_model level
        want = tower.final_layer_norm(out.hidden_states[-2]).numpy()
    skipped, pooled = jax.jit(module.apply, static_argnums=2)({"params": params}, jnp.asarray(ids, jnp.int32), 1)
    assert rel_l2(skipped, want) <= 1e-4
    assert rel_l2(skipped, out.last_hidden_state) > 1e-2  # a different layer indeed
    assert rel_l2(pooled, out.pooler_output) <= 1e-4
    with pytest.raises(ValueError, match="clip_skip"):
        module.apply({"params": params}, jnp.asarray(ids, jnp.int32), module.config.num_layers)
