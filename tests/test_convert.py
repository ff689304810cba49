"""Conversion round trip: a tiny diffusers pipeline folder -> `dynamicid_jax.convert` ->
every loader reads the converted folder (without torch) and gives the same params and
outputs as reading the PyTorch files."""

import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from dynamicid_jax import convert  # noqa: E402
from dynamicid_jax.base_models import sd15  # noqa: E402
from dynamicid_jax.models import converted, torch_import  # noqa: E402
from dynamicid_jax.models.unet import load_unet  # noqa: E402
from parity import TINY_SD15_UNET as TINY_UNET, TINY_VAE  # noqa: E402
from dynamicid_jax.models.vae import AutoencoderKL, VAEConfig, load_vae  # noqa: E402

TINY_TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16, bos_token_id=97, eos_token_id=98, pad_token_id=1)
TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   image_size=28, patch_size=14, projection_dim=16)


def assert_same_tree(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(pipeline folder, vision folder, dynamicid folder, converted folder)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("convert")
    pipeline = root / "pipeline"
    diffusers.UNet2DConditionModel(**TINY_UNET).save_pretrained(pipeline / "unet")
    diffusers.AutoencoderKL(**TINY_VAE).save_pretrained(pipeline / "vae")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)).save_pretrained(pipeline / "text_encoder")
    vision = root / "image_encoder"
    transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_VISION)).save_pretrained(vision)
    dynamicid = root / "dynamicid_release"
    dynamicid.mkdir()
    # Stand-ins for the authors' pickles: the converter only changes their container.
    torch.save({"proj_module": {"norm.weight": torch.randn(8)},
                "SAA_module": {"1.to_k_ip.weight": torch.randn(4, 8)}}, dynamicid / "SAA.bin")
    torch.save({"proj_in.weight": torch.randn(3, 2)}, dynamicid / "IMR.bin")
    torch.save({"blocks.0.0.conv_block.1.running_mean": torch.randn(5)}, dynamicid / "key_point_encoder.bin")
    out = root / "converted"
    convert.main(["--base_model", str(pipeline), "--out", str(out), "--components", "unet,vae,text_encoder",
                  "--vision_encoder", str(vision), "--dynamicid", str(dynamicid)])
    return pipeline, vision, dynamicid, out


def test_marker_and_layout(folders):
    _, vision, _, out = folders
    assert converted.is_converted(out)
    marker = converted._read_marker(out)
    expected = {"unet", "vae", "text_encoder", "vision_encoder"}
    assert set(marker["components"]) == expected
    assert all((out / c).is_dir() for c in expected)


def test_vae_round_trip_same_params_and_outputs(folders):
    pipeline, _, _, out = folders
    module, params = load_vae(pipeline)
    module_c, params_c = load_vae(out)
    assert module_c.config == module.config
    assert_same_tree(params_c, params)
    latents = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    decode = lambda m, p: m.apply({"params": p}, latents, method=AutoencoderKL.decode)  # noqa: E731
    np.testing.assert_array_equal(decode(module_c, params_c), decode(module, params))


def test_unet_round_trip_same_params_and_outputs(folders):
    pipeline, _, _, out = folders
    module, params = load_unet(pipeline)
    module_c, params_c = load_unet(out)
    assert module_c.config == module.config
    assert_same_tree(params_c, params)
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, 16, 24, 4), dtype=np.float32)
    context = rng.standard_normal((2, 7, 32), dtype=np.float32)
    t = np.array([10.0, 700.0], np.float32)
    apply = jax.jit(lambda m_params, x, tt, c: module.apply({"params": m_params}, x, tt, c))
    np.testing.assert_array_equal(apply(params_c, sample, t, context), apply(params, sample, t, context))


def test_clip_towers_round_trip(folders):
    from dynamicid_jax.models import clip_weights
    pipeline, vision, _, out = folders
    text, text_params = clip_weights.load_text_encoder(pipeline)
    text_c, text_params_c = clip_weights.load_text_encoder(out)
    assert text_c.config == text.config
    assert_same_tree(text_params_c, text_params)
    vis, vis_params = clip_weights.load_vision_encoder(vision)
    vis_c, vis_params_c = clip_weights.load_vision_encoder(out)
    assert vis_c.config == vis.config
    assert_same_tree(vis_params_c, vis_params)


def test_dynamicid_files_resaved_torch_free(folders):
    _, _, dynamicid, out = folders
    for stem in convert.DYNAMICID_FILES:
        ours = torch_import.read_state_dict(out / "dynamicid" / f"{stem}.safetensors")
        theirs = torch_import.read_state_dict(dynamicid / f"{stem}.bin")
        assert sorted(ours) == sorted(theirs)
        assert_same_tree(ours, theirs)


def test_converted_folder_loads_without_torch(folders):
    out = folders[3]
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import now raises ImportError
        "from dynamicid_jax.models.vae import load_vae\n"
        "from dynamicid_jax.models.unet import load_unet\n"
        f"m, p = load_vae({str(out)!r}); m2, p2 = load_unet({str(out)!r})\n"
        "print('ok', m.config.block_out_channels, m2.config.block_out_channels)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok (32, 64) (32, 32, 64, 64)" in result.stdout


def test_errors_name_the_problem(folders, tmp_path):
    pipeline, _, _, out = folders
    with pytest.raises(FileNotFoundError, match="no converted 'nonexistent'"):
        converted.load_converted(out, "nonexistent", VAEConfig)
    with pytest.raises(ValueError, match="written with config 'VAEConfig'"):
        from dynamicid_jax.models.unet import UNetConfig

        converted.load_converted(out, "vae", UNetConfig)
    with pytest.raises(ValueError, match="vae exist"):  # a UserError (ConfigError), refused before converting
        convert.convert(pipeline, out, components=["vae"])
    with pytest.raises(ValueError, match="nothing to convert"):
        convert.convert(None, tmp_path / "x", components=[])
    with pytest.raises(FileNotFoundError, match="SAA.bin"):
        convert.convert(None, tmp_path / "y", components=[], dynamicid=tmp_path)
    with pytest.raises(ValueError, match="only for single-file"):
        load_vae(out, config=sd15.vae_config())
