"""UNet parity against diffusers' PyTorch UNet2DConditionModel, loaded through `load_unet`.

A tiny model with SD1.5's block structure (3 CrossAttnDown + Down, Up + 3 CrossAttnUp, 2
layers per block) and random weights, norms and biases perturbed so they matter, is saved
by diffusers itself (safetensors and .bin) and read through our import path.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from dynamicid_jax.models import load_unet
from dynamicid_jax.models.torch_import import WeightImportError
from parity import rel_l2

TINY = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=32,
    # Different head counts per level check that up blocks use them reversed, as diffusers does.
    attention_head_dim=(2, 4, 4, 8),
)
CONTEXT_LEN = 7
# (height, width) of the latents: non-square; and 20 x 12, not a multiple of 8 (3 upsamplers).
SHAPES = [(16, 24), (20, 12)]


@pytest.fixture(scope="module")
def torch_unet(tmp_path_factory):
    """(torch model, safetensors folder, .bin folder)."""
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    model = TorchUNet(**TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.2)
            elif "norm" in name:  # GroupNorm / LayerNorm scales
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("tiny_unet")
    st_dir, bin_dir = root / "safetensors" / "unet", root / "bin"
    model.save_pretrained(st_dir, safe_serialization=True)
    model.save_pretrained(bin_dir, safe_serialization=False)
    assert (st_dir / "diffusion_pytorch_model.safetensors").is_file()
    assert (bin_dir / "diffusion_pytorch_model.bin").is_file()
    return model, st_dir, bin_dir


@pytest.fixture(scope="module")
def jax_unet(torch_unet):
    _, st_dir, _ = torch_unet
    # The pipeline-folder form: <root>/unet/ is found from <root>.
    module, params = load_unet(st_dir.parent)
    # Blocks of 100 tokens: the 384- and 240-token self-attentions of the finest level run
    # blockwise with padding, coarser levels run the plain path; both are checked below.
    module = module.clone(config=dataclasses.replace(module.config, attention_block=100))
    apply = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
    return module, params, apply


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_matches_diffusers(torch_unet, jax_unet, shape):
    model = torch_unet[0]
    _, params, apply = jax_unet
    rng = np.random.default_rng(sum(shape))
    sample = rng.standard_normal((2, 4, *shape), dtype=np.float32)  # NCHW for torch
    context = rng.standard_normal((2, CONTEXT_LEN, TINY["cross_attention_dim"]), dtype=np.float32)
    timesteps = np.array([10.0, 981.0], dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context)).sample.numpy()
    ours = np.asarray(apply(params, jnp.asarray(sample.transpose(0, 2, 3, 1)), timesteps, context))
    assert ours.shape == (2, *shape, 4)
    err = rel_l2(ours.transpose(0, 3, 1, 2), ref)
    assert err <= 1e-4, f"relative L2 error {err:.2e} at latent size {shape}"


def test_bin_and_safetensors_load_identically(torch_unet, jax_unet):
    _, _, bin_dir = torch_unet
    _, params, _ = jax_unet
    _, params_bin = load_unet(bin_dir)  # the component-folder form, a .bin pickle
    flat_st = jax.tree_util.tree_leaves_with_path(params)
    flat_bin = dict(jax.tree_util.tree_leaves_with_path(params_bin))
    assert len(flat_st) == len(flat_bin) > 0
    for path, leaf in flat_st:
        np.testing.assert_array_equal(leaf, flat_bin[path], err_msg=jax.tree_util.keystr(path))


def test_param_names_follow_the_contract(jax_unet):
    _, params, _ = jax_unet
    names = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    tb = "transformer_blocks_0"
    for expected in [
        "conv_in/kernel",
        "time_embedding/linear_1/kernel",
        "down_blocks_0/resnets_1/conv1/kernel",
        "down_blocks_0/resnets_0/time_emb_proj/kernel",
        "down_blocks_0/downsamplers_0/conv/kernel",
        "down_blocks_1/attentions_0/norm/scale",
        "down_blocks_1/attentions_0/proj_in/kernel",
        f"down_blocks_0/attentions_1/{tb}/attn1/to_q/kernel",
        f"down_blocks_0/attentions_1/{tb}/attn2/to_out/bias",
        f"down_blocks_0/attentions_1/{tb}/norm1/scale",
        f"down_blocks_0/attentions_1/{tb}/ff/net_0/proj/kernel",
        f"down_blocks_0/attentions_1/{tb}/ff/net_2/kernel",
        f"mid_block/attentions_0/{tb}/attn2/to_k/kernel",
        "mid_block/resnets_1/norm2/bias",
        f"up_blocks_1/attentions_2/{tb}/attn1/to_v/kernel",
        "up_blocks_0/upsamplers_0/conv/kernel",
        "conv_norm_out/scale",
        "conv_out/kernel",
    ]:
        assert expected in names, expected


def _write_variant(tmp_path: pathlib.Path, st_dir: pathlib.Path, edit) -> pathlib.Path:
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text((st_dir / "config.json").read_text())
    sd = load_file(str(st_dir / "diffusion_pytorch_model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


@pytest.mark.parametrize(
    "kind,key,edit",
    [
        ("missing", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
         lambda sd, k: sd.pop(k)),
        ("unexpected", "down_blocks.0.resnets.0.extra.weight",
         lambda sd, k: sd.__setitem__(k, np.zeros((3,), np.float32))),
        ("mis-shaped", "up_blocks.2.resnets.1.conv2.weight",
         lambda sd, k: sd.__setitem__(k, np.zeros((32, 32, 1, 1), np.float32))),
    ],
)
def test_mismatched_checkpoint_names_the_key(torch_unet, tmp_path, kind, key, edit):
    folder = _write_variant(tmp_path, torch_unet[1], lambda sd: edit(sd, key))
    with pytest.raises(WeightImportError) as err:
        load_unet(folder)
    message = str(err.value)
    assert f"1 {kind}" in message and key in message, message


def test_unsupported_config_field_is_rejected(torch_unet, tmp_path):
    config = json.loads((torch_unet[1] / "config.json").read_text())
    config["class_embed_type"] = "timestep"
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="class_embed_type"):
        load_unet(folder)
