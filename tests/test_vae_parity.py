"""VAE parity with diffusers' AutoencoderKL: a tiny random model saved by diffusers, loaded
through `load_vae`, encode moments and decode compared in float32 (relative L2 <= 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dynamicid_jax.base_models import sd15  # noqa: E402
from dynamicid_jax.models import torch_import  # noqa: E402
from dynamicid_jax.models.vae import (  # noqa: E402
    LOGVAR_MAX,
    LOGVAR_MIN,
    AutoencoderKL,
    VAEConfig,
    load_vae,
    sample_latent,
)
from parity import TINY_VAE, rel_l2  # noqa: E402



def randomise_(model, seed: int) -> None:
    """Every parameter random (diffusers inits some to zero/one, which would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if p.ndim == 1 else 1.0 / np.sqrt(max(1, p[0].numel()))
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if name.endswith("norm1.weight") else 0.0))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch model, pipeline-style folder holding vae/) saved by diffusers."""
    model = diffusers.AutoencoderKL(**TINY_VAE).eval()
    randomise_(model, seed=0)
    root = tmp_path_factory.mktemp("pipeline")
    model.save_pretrained(root / "vae")
    return model, root


@pytest.fixture(scope="module")
def loaded(reference):
    _, root = reference
    return load_vae(root)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    return rng.uniform(-1, 1, size=(2, 32, 48, 3)).astype(np.float32)  # batch 2, non-square


def test_param_names_mirror_diffusers(loaded):
    _, params = loaded
    p = params
    assert p["encoder"]["down_blocks_0"]["resnets_1"]["conv1"]["kernel"].shape == (3, 3, 32, 32)
    assert p["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"].shape == (64, 64)
    assert set(p["encoder"]["mid_block"]["attentions_0"]) == {"group_norm", "to_q", "to_k", "to_v", "to_out"}
    assert p["decoder"]["up_blocks_0"]["upsamplers_0"]["conv"]["kernel"].shape == (3, 3, 64, 64)
    assert "quant_conv" in p and "post_quant_conv" in p
    assert "downsamplers_0" not in p["encoder"]["down_blocks_1"]


def test_encode_matches_diffusers(reference, loaded, images):
    model, _ = reference
    module, params = loaded
    mean, logvar = jax.jit(lambda p, x: module.apply({"params": p}, x, method=AutoencoderKL.encode))(params, images)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
    assert mean.shape == (2, 16, 24, 4)
    assert rel_l2(mean, dist.mean.permute(0, 2, 3, 1).numpy()) <= 1e-4
    assert rel_l2(logvar, dist.logvar.permute(0, 2, 3, 1).numpy()) <= 1e-4
    assert float(logvar.min()) >= LOGVAR_MIN and float(logvar.max()) <= LOGVAR_MAX


def test_decode_matches_diffusers(reference, loaded):
    model, _ = reference
    module, params = loaded
    latents = np.random.default_rng(2).standard_normal((2, 16, 24, 4)).astype(np.float32)
    out = jax.jit(lambda p, z: module.apply({"params": p}, z, method=AutoencoderKL.decode))(params, latents)
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    assert out.shape == (2, 32, 48, 3)
    assert rel_l2(out, ref) <= 1e-4


def test_component_folder_and_config(reference, loaded):
    _, root = reference
    module, params = load_vae(root / "vae")
    assert module.config == loaded[0].config
    assert module.config.block_out_channels == (32, 64) and module.config.norm_num_groups == 8
    assert module.config.scaling_factor == pytest.approx(0.18215)
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def test_sharded_safetensors_folder_loads_the_same(reference, loaded, tmp_path):
    model, _ = reference
    model.save_pretrained(tmp_path / "vae", max_shard_size="100KB")  # diffusers writes an index + shards
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "vae").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    _, params = load_vae(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def test_a_file_is_refused_where_only_folders_exist(reference):
    from dynamicid_jax.models.clip_weights import load_vision_encoder

    _, root = reference
    with pytest.raises(ValueError, match="vision_encoder weights come as a folder"):
        load_vision_encoder(root / "vae" / "diffusion_pytorch_model.safetensors")


def test_sample_latent_statistics():
    mean = jnp.full((4, 32, 32, 4), 2.0)
    logvar = jnp.full((4, 32, 32, 4), np.log(0.25))
    draws = sample_latent(mean, logvar, jax.random.PRNGKey(0))
    assert abs(float(draws.mean()) - 2.0) < 0.02
    assert abs(float(draws.std()) - 0.5) < 0.02
    again = sample_latent(mean, logvar, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(draws, again)


def test_missing_weight_is_an_error_naming_it(reference, tmp_path):
    _, root = reference
    sd = torch_import.read_state_dict(root / "vae" / "diffusion_pytorch_model.safetensors")
    del sd["decoder.mid_block.attentions.0.to_k.weight"]
    from safetensors.numpy import save_file

    folder = tmp_path / "vae"
    folder.mkdir()
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text((root / "vae" / "config.json").read_text())
    with pytest.raises(torch_import.WeightImportError, match="decoder.mid_block.attentions.0.to_k.weight"):
        load_vae(folder)


def test_deprecated_attention_names_load(reference, loaded, tmp_path):
    """Old diffusers folders name the mid attention query/key/value/proj_attn."""
    _, root = reference
    sd = torch_import.read_state_dict(root / "vae" / "diffusion_pytorch_model.safetensors")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in sd.items():
        for new, dep in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{dep}.")
        renamed[k] = v
    from safetensors.numpy import save_file

    save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((root / "vae" / "config.json").read_text())
    _, params = load_vae(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def test_config_rejects_unsupported_variants():
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_diffusers({**TINY_VAE, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_diffusers({**TINY_VAE, "down_block_types": ["Foo", "Bar"]})
    assert sd15.vae_config().block_out_channels == (128, 256, 512, 512)


def test_bfloat16_compute_stays_close(reference, loaded):
    """dtype=bfloat16 computes in bf16 with float32 params and outputs; error stays small."""
    _, root = reference
    module, params = load_vae(root, dtype=jnp.bfloat16)
    latents = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32)
    decode = lambda m: jax.jit(lambda p, z: m.apply({"params": p}, z, method=AutoencoderKL.decode))  # noqa: E731
    out16 = decode(module)(params, latents)
    out32 = decode(loaded[0])(loaded[1], latents)
    assert out16.dtype == jnp.float32 and jax.tree.leaves(params)[0].dtype == np.float32
    assert 0 < rel_l2(out16, out32) < 5e-2


def test_sd15_config_has_diffusers_parameter_count():
    """The full SD1.5 VAE: same parameter count as diffusers' default AutoencoderKL (meta device)."""
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            norm_num_groups=32,
        )
    expected = sum(p.numel() for p in reference.parameters())
    module = AutoencoderKL(sd15.vae_config())
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected
