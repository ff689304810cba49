"""Single-file SD1.5 checkpoints: our torch-free renaming against diffusers' own converters,
and the whole file through `load_unet` / `load_vae` / `load_text_encoder` against the
PyTorch models whose weights it holds.

The original (CompVis/LDM) key layout is written here, test-side, from tiny diffusers and
transformers models with random weights; diffusers' converters then check that rename too.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from dynamicid_jax.models import torch_import  # noqa: E402
from dynamicid_jax.models.single_file import extract_component  # noqa: E402
from dynamicid_jax.models.unet import UNetConfig, load_unet  # noqa: E402
from dynamicid_jax.models.vae import AutoencoderKL, VAEConfig, load_vae  # noqa: E402
from ldm_layout import unet_to_ldm, vae_to_ldm  # noqa: E402
from parity import TINY_SD15_UNET as TINY_UNET, TINY_VAE, rel_l2  # noqa: E402

TINY_CLIP = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                 bos_token_id=97, eos_token_id=98, pad_token_id=1)


def randomise_(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms and biases matter too
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0)
                        + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p[0].numel()))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Tiny torch models and an original-layout single file holding all three."""
    unet = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    vae = diffusers.AutoencoderKL(**TINY_VAE).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_CLIP)).eval()
    for seed, model in enumerate((unet, vae, text)):
        randomise_(model, seed)
    ldm = {}
    ldm.update(unet_to_ldm(unet.state_dict(), TINY_UNET["layers_per_block"],
                           ["CrossAttn" in t for t in TINY_UNET["up_block_types"]]))
    ldm.update(vae_to_ldm(vae.state_dict(), len(TINY_VAE["block_out_channels"])))
    # SD1.5 files keep transformers' `text_model.` level and the position_ids buffer.
    text_sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.state_dict().items()}
    text_sd["text_model.embeddings.position_ids"] = torch.arange(TINY_CLIP["max_position_embeddings"])[None]
    ldm.update({"cond_stage_model.transformer." + k: v for k, v in text_sd.items()})
    ldm["alphas_cumprod"] = torch.linspace(1, 0, 10)  # other top-level entries real files carry
    ldm = {k: v.contiguous() for k, v in ldm.items()}
    root = tmp_path_factory.mktemp("single_file")
    path = root / "tiny_sd15.safetensors"
    save_file(ldm, str(path))
    return dict(unet=unet, vae=vae, text=text, text_sd=text_sd, ldm=ldm, path=path, root=root)


def assert_same_state_dict(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)


def test_unet_keys_match_diffusers_converter(reference):
    ours = extract_component(reference["path"], "unet")
    theirs = sfu.convert_ldm_unet_checkpoint(reference["ldm"], dict(reference["unet"].config))
    assert_same_state_dict(ours, theirs)
    assert_same_state_dict(ours, reference["unet"].state_dict())  # and the test-side rename is right


def test_vae_keys_match_diffusers_converter(reference):
    ours = extract_component(reference["path"], "vae")
    theirs = sfu.convert_ldm_vae_checkpoint(reference["ldm"], dict(reference["vae"].config))
    assert_same_state_dict(ours, theirs)
    assert_same_state_dict(ours, reference["vae"].state_dict())
    assert ours["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2  # 1x1 conv squeezed to Linear


def test_text_encoder_keys_match_diffusers_converter(reference):
    ours = extract_component(reference["path"], "text_encoder")
    theirs = sfu.convert_ldm_clip_checkpoint(reference["ldm"])
    assert_same_state_dict(ours, theirs)
    assert_same_state_dict(ours, reference["text_sd"])


def test_ckpt_pickle_reads_the_same(reference):
    path = reference["root"] / "tiny_sd15.ckpt"
    vae_only = {k: v for k, v in reference["ldm"].items() if k.startswith("first_stage_model.")}
    torch.save({"state_dict": vae_only, "global_step": 1}, path)
    jax.tree.map(np.testing.assert_array_equal, extract_component(path, "vae"),
                 extract_component(reference["path"], "vae"))


def test_text_model_level_added_when_absent(reference, tmp_path):
    older = {k.replace("transformer.text_model.", "transformer."): v for k, v in reference["ldm"].items()}
    save_file(older, str(tmp_path / "old.safetensors"))
    assert sorted(extract_component(tmp_path / "old.safetensors", "text_encoder")) == sorted(reference["text_sd"])


def test_missing_component_is_named(reference, tmp_path):
    unet_only = {k: v for k, v in reference["ldm"].items() if k.startswith("model.diffusion_model.")}
    save_file(unet_only, str(tmp_path / "unet_only.safetensors"))
    with pytest.raises(torch_import.WeightImportError, match="no vae weights.*first_stage_model"):
        extract_component(tmp_path / "unet_only.safetensors", "vae")
    with pytest.raises(torch_import.WeightImportError, match="no vae weights"):
        load_vae(tmp_path / "unet_only.safetensors", config=VAEConfig.from_diffusers(TINY_VAE))
    with pytest.raises(ValueError, match="component must be one of"):
        extract_component(tmp_path / "unet_only.safetensors", "safety_checker")


def test_unknown_key_is_an_error_not_dropped(reference, tmp_path):
    extra = dict(reference["ldm"])
    # (not label_emb: that is SDXL's add_embedding, and its presence makes the file SDXL's)
    extra["model.diffusion_model.extra_emb.0.0.weight"] = torch.zeros(4, 4)
    extra["first_stage_model.encoder.mid.attn_1.rel_pos"] = torch.zeros(3)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(torch_import.WeightImportError, match="extra_emb.0.0.weight"):
        extract_component(tmp_path / "extra.safetensors", "unet")
    with pytest.raises(torch_import.WeightImportError, match="rel_pos"):
        extract_component(tmp_path / "extra.safetensors", "vae")


def test_vae_from_single_file_matches_diffusers(reference):
    module, params = load_vae(reference["path"], config=VAEConfig.from_diffusers(TINY_VAE))
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
    mean, _ = jax.jit(lambda p, x: module.apply({"params": p}, x, method=AutoencoderKL.encode))(params, images)
    decoded = jax.jit(lambda p, z: module.apply({"params": p}, z, method=AutoencoderKL.decode))(params, mean)
    with torch.no_grad():
        vae = reference["vae"]
        ref_mean = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean
        ref_decoded = vae.decode(ref_mean).sample
    assert rel_l2(mean, ref_mean.permute(0, 2, 3, 1).numpy()) <= 1e-4
    assert rel_l2(decoded, ref_decoded.permute(0, 2, 3, 1).numpy()) <= 1e-4


def test_unet_from_single_file_matches_diffusers(reference):
    config = UNetConfig.from_diffusers(dict(reference["unet"].config))
    module, params = load_unet(reference["path"], config=config)
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, 16, 24, 4), dtype=np.float32)
    context = rng.standard_normal((2, 7, 32), dtype=np.float32)
    timesteps = np.array([10.0, 700.0], np.float32)
    out = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))(params, sample, timesteps, context)
    with torch.no_grad():
        ref = reference["unet"](torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(timesteps),
                                torch.from_numpy(context)).sample.permute(0, 2, 3, 1).numpy()
    assert rel_l2(out, ref) <= 1e-4


def test_text_encoder_from_single_file_matches_transformers(reference):
    from dynamicid_jax.models import clip, clip_weights
    config = clip.CLIPTextConfig.from_transformers(reference["text"].config.to_dict())
    module, params = clip_weights.load_text_encoder(reference["path"], config=config)
    ids = np.array([[97, 5, 17, 42, 98, 1, 1, 1], [97, 63, 98, 1, 1, 1, 1, 1]], np.int32)
    outputs = module.apply({"params": params}, ids)
    hidden = outputs[0] if isinstance(outputs, (tuple, list)) else getattr(outputs, "last_hidden_state", outputs)
    with torch.no_grad():
        ref = reference["text"](torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert rel_l2(hidden, ref) <= 1e-4


def test_half_precision_files_widen_exactly(reference, tmp_path):
    """fp16 and bf16 single files (common for fine-tunes) read torch-free, widened to float32."""
    for dtype in (torch.float16, torch.bfloat16):
        half = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in reference["ldm"].items()
                if k.startswith("first_stage_model.")}
        path = tmp_path / f"{str(dtype)[6:]}.safetensors"
        save_file(half, str(path))
        theirs = sfu.convert_ldm_vae_checkpoint({k: v.float() for k, v in half.items()},
                                                dict(reference["vae"].config))
        ours = extract_component(path, "vae")
        assert all(v.dtype == np.float32 for v in ours.values())
        assert_same_state_dict(ours, theirs)


def test_the_family_supplies_a_single_files_config(reference, tmp_path):
    """An SD1.5 single file carries no config: the loaders (models/, which knows no family)
    refuse to guess; `base_models.single_file_config` gives SD1.5's, a folder's is its own.
    Costs < 1 s (no compile)."""
    from dynamicid_jax import base_models
    from dynamicid_jax.base_models import sd15

    assert base_models.single_file_config(reference["path"], "unet") == sd15.unet_config()
    assert base_models.single_file_config(reference["path"], "vae") == sd15.vae_config()
    assert base_models.single_file_config(tmp_path, "unet") is None
    with pytest.raises(ValueError, match="carries no config: pass config="):
        load_vae(reference["path"])
