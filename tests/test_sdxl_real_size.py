"""SDXL at its real size, from shapes alone (`jax.eval_shape`, no weights, no compile):

- our UNet and bigG text encoder have diffusers'/transformers' parameters, name for name
  and shape for shape (the reference built on torch's meta device: no memory), 2,567,463,684
  and 694,659,840 parameters;
- a single file's architecture read off real SDXL shapes (`single_file_configs`) is SDXL's;
- `sharding.py`'s default rules split every tensor above the size threshold over an
  8-device fsdp mesh (conftest's 8 fake CPU devices), so a device holds about 1/8 of each.

Cost: about 25 s on 2 shared cores (tracing SDXL's 70 transformer blocks is most of it).
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

from dynamicid_jax import sharding
from dynamicid_jax.base_models import sd15, sdxl
from dynamicid_jax.models import converted
from dynamicid_jax.models.clip import CLIPTextConfig, CLIPTextModel
from dynamicid_jax.models.clip_weights import clip_key_fn
from dynamicid_jax.models.single_file_configs import infer_text_config, infer_unet_config, infer_vae_fields
from dynamicid_jax.models.unet import UNet2DConditionModel, UNetConfig, unet_abstract_params, unet_key_fn

SDXL_UNET_PARAMS = 2_567_463_684  # stabilityai/stable-diffusion-xl-base-1.0 unet
SDXL_BIGG_PARAMS = 694_659_840  # its text_encoder_2 (CLIPTextModelWithProjection)
# stable-diffusion-xl-base-1.0's unet/config.json, the fields that differ from diffusers' defaults.
SDXL_UNET_CONFIG = dict(
    addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
    num_attention_heads=None,
)
SDXL_BIGG_CONFIG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                        projection_dim=1280, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)


def n_params(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def unet_shapes():
    config = UNetConfig.from_diffusers(SDXL_UNET_CONFIG)
    assert config == sdxl.unet_config()
    return unet_abstract_params(UNet2DConditionModel(config))


@pytest.fixture(scope="module")
def bigg_shapes():
    config = CLIPTextConfig.from_transformers({"architectures": ["CLIPTextModelWithProjection"], **SDXL_BIGG_CONFIG})
    assert config == sdxl.text_2_config()
    ids = jax.ShapeDtypeStruct((1, config.max_positions), np.int32)
    return jax.eval_shape(CLIPTextModel(config).init, jax.random.PRNGKey(0), ids)["params"]


def assert_same_parameters(ours, reference: dict, key_fn):
    """Every leaf of ours maps (key_fn) to a reference tensor with the same dimensions (as a
    multiset: the import transposes), and every reference tensor is used."""
    used = set()
    for path, leaf in traverse_util.flatten_dict(ours).items():
        key, _ = key_fn(path)
        assert key in reference, (path, key)
        assert sorted(leaf.shape) == sorted(reference[key]), (key, leaf.shape, reference[key])
        used.add(key)
    assert used == set(reference)


def meta_shapes(build) -> dict:
    """{state-dict key: shape} of a torch model built on the meta device (shapes only: SDXL's
    UNet would take 10 GB), buffers such as position_ids left out."""
    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


@pytest.fixture(scope="module")
def torch_unet_model():
    """diffusers' SDXL UNet on the meta device (built once: its shapes and its processor order)."""
    from diffusers import UNet2DConditionModel as TorchUNet

    with torch.device("meta"):
        return TorchUNet(**SDXL_UNET_CONFIG)


@pytest.fixture(scope="module")
def torch_unet(torch_unet_model):
    return {k: tuple(v.shape) for k, v in torch_unet_model.state_dict().items()}


@pytest.fixture(scope="module")
def torch_bigg():
    import transformers

    return meta_shapes(lambda: transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**SDXL_BIGG_CONFIG)))


def zeros(shapes: dict) -> dict:
    """Arrays of the given shapes that take no memory (a broadcast scalar): what shape inference reads."""
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


def test_sdxl_unet_has_diffusers_parameters(unet_shapes, torch_unet):
    assert n_params(unet_shapes) == SDXL_UNET_PARAMS == sum(int(np.prod(s)) for s in torch_unet.values())
    assert_same_parameters(unet_shapes, torch_unet, unet_key_fn)


def test_sdxl_bigg_has_transformers_parameters(bigg_shapes, torch_bigg):
    assert n_params(bigg_shapes) == SDXL_BIGG_PARAMS == sum(int(np.prod(s)) for s in torch_bigg.values())
    assert_same_parameters(bigg_shapes, torch_bigg, clip_key_fn("text_model."))


def test_single_file_shapes_read_as_sdxl(torch_unet, torch_bigg):
    """What an SDXL single file's tensors say, after renaming, is SDXL's architecture."""
    import transformers
    from diffusers import AutoencoderKL

    from dynamicid_jax.models.vae import VAEConfig

    assert infer_unet_config(zeros(torch_unet), "sdxl.safetensors") == sdxl.unet_config()
    assert infer_text_config(zeros(torch_bigg), "text_encoder_2", "sdxl.safetensors") == sdxl.text_2_config()
    clip_l = meta_shapes(lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)))
    clip_l = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in clip_l.items()}  # as extracted
    assert infer_text_config(zeros(clip_l), "text_encoder", "sdxl.safetensors") == sd15.text_config()
    vae = meta_shapes(lambda: AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4))
    assert VAEConfig(**infer_vae_fields(zeros(vae), "sdxl.safetensors")) == dataclasses.replace(
        sd15.vae_config(), scaling_factor=0.13025)


def test_sdxl_configs_survive_the_converted_json():
    for cls, config in ((UNetConfig, sdxl.unet_config()), (CLIPTextConfig, sdxl.text_2_config())):
        data = json.loads(json.dumps(converted._jsonable(config)))
        assert converted.config_from_json(cls, data) == config


@pytest.mark.parametrize("model", ["unet", "bigg"])
def test_fsdp_rules_split_every_large_sdxl_tensor(model, unet_shapes, bigg_shapes):
    shapes = unet_shapes if model == "unet" else bigg_shapes
    mesh = sharding.make_mesh(1, 8)
    specs = traverse_util.flatten_dict(sharding.param_partition_specs(shapes, mesh),
                                       is_leaf=lambda _, x: isinstance(x, jax.sharding.PartitionSpec))
    flat = traverse_util.flatten_dict(shapes)
    large = {path: leaf for path, leaf in flat.items() if int(np.prod(leaf.shape)) >= sharding.DEFAULT_MIN_SIZE}
    unsplit = [("/".join(path), leaf.shape) for path, leaf in large.items() if sharding.FSDP not in specs[path]]
    assert not unsplit, unsplit
    # What stays whole on every device (norms, biases, small kernels) is a sliver of the model.
    whole = n_params(flat) - n_params(large)
    assert whole / n_params(flat) < 0.005, whole


def test_dynamicid_processor_numbering_is_diffusers_order(unet_shapes, torch_unet_model):
    """The processors of a DynamicID-SDXL weights file (dynamicid/weights_file.py) are numbered
    in diffusers' `attn_processors` order of the real SDXL UNet: 140 = 70 transformer blocks x
    (attn1, attn2); saa_blocks' names are its 70 attn2. Cost: ~1 s (the fixtures' shapes and meta build
    are the other tests')."""
    import re

    from dynamicid_jax.dynamicid import published_weights as pw
    from dynamicid_jax.dynamicid import saa_blocks

    theirs = [n[: -len(".processor")] for n in torch_unet_model.attn_processors]
    ours = [re.sub(r"_(\d+)", r".\1", "/".join(p)).replace("/", ".") for p in pw.attention_processor_paths(unet_shapes)]
    assert ours == theirs and len(ours) == 140
    attn2 = [n for n in theirs if n.endswith("attn2")]
    assert attn2 == saa_blocks.attn2_names(sdxl.unet_config()) and len(attn2) == 70
    assert len(saa_blocks.selected_names(["up_blocks.0.attentions.1", "mid_block"], sdxl.unet_config())) == 20
