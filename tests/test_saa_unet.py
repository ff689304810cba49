"""SAA inside the UNet: the wiring contract, and the SAA_module -> UNet param mapping.

Processor order is re-stated here from the contract (down blocks, then up blocks 1-3, then
the mid block; attn1 before attn2), independently of `attention_processor_paths`.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

import dynamicid_torch_reference as ref
from dynamicid_jax.dynamicid import published_weights as pw
from dynamicid_jax.dynamicid import saa
from dynamicid_jax.models.torch_import import WeightImportError
from dynamicid_jax.models.unet import UNet2DConditionModel, UNetConfig, unet_abstract_params

RANK = 2
# SD1.5's block structure (3 cross-attn down levels, 3 cross-attn up levels, 2 layers per
# block): 32 attention processors, like the published SAA.bin.
SD_LIKE = dict(
    block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=16,
    num_attention_heads=(2, 2, 4, 4),
)
# Two levels, one layer: what the forward tests compile.
SMALL = dict(
    block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    num_attention_heads=(2, 2),
)


def sd_processor_order():
    tb = "transformer_blocks_0"
    order = [f"down_blocks_{i}/attentions_{a}/{tb}/attn{k}" for i in range(3) for a in range(2) for k in (1, 2)]
    order += [f"up_blocks_{i}/attentions_{a}/{tb}/attn{k}" for i in (1, 2, 3) for a in range(3) for k in (1, 2)]
    order += [f"mid_block/attentions_0/{tb}/attn{k}" for k in (1, 2)]
    return order


def example_identity(cross_dim, n_ids=1, b=1):
    return saa.identity_conditioning(np.zeros((b, n_ids, 4, cross_dim), np.float32))


def abstract(cfg, **extra):
    module = UNet2DConditionModel(UNetConfig(**cfg, **extra))
    ident = example_identity(cfg["cross_attention_dim"]) if "saa" in extra else None
    return unet_abstract_params(module, ident)


def random_tree(shapes, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)


def write_saa_file(path, shapes, order, seed):
    """A random SAA.bin in the release layout for a UNet with these attention paths."""
    flat = traverse_util.flatten_dict(shapes)
    processors = []
    for name in order:
        attn = tuple(name.split("/"))
        hidden = flat[attn + ("to_q", "kernel")].shape[1]
        cross = flat[attn + ("to_k", "kernel")].shape[0]
        cls = ref.SAAProcessor if name.endswith("attn2") else ref.SAProcessor
        processors.append(cls(hidden, cross if name.endswith("attn2") else None, RANK))
    processors = ref.randomise_(torch.nn.ModuleList(processors), seed=seed)
    proj = ref.ProjPlusModel(16, 8, 12, 4, depth=1, heads=1, dim_head=16)
    torch.save({"proj_module": proj.state_dict(), "SAA_module": processors.state_dict()}, path)
    return {k: v.numpy() for k, v in processors.state_dict().items()}


# ----------------------------------------------------------------------------- mapping (no compile)


@pytest.fixture(scope="module")
def sd_like(tmp_path_factory):
    plain = abstract(SD_LIKE)
    with_saa = abstract(SD_LIKE, lora_rank=RANK, saa=saa.SAAConfig())
    base = random_tree(plain, 0)
    path = tmp_path_factory.mktemp("saa_bin") / "SAA.bin"
    torch_sd = write_saa_file(path, with_saa, sd_processor_order(), seed=5)
    return plain, with_saa, base, path, torch_sd


def test_processor_order_is_diffusers_order(sd_like):
    _, with_saa, _, _, _ = sd_like
    assert ["/".join(p) for p in pw.attention_processor_paths(with_saa)] == sd_processor_order()


@pytest.mark.parametrize("given_shapes", [True, False], ids=["abstract_params", "derived"])
def test_merge_fills_every_leaf_from_its_source(sd_like, given_shapes):
    _, with_saa, base, path, torch_sd = sd_like
    merged = pw.merge_dynamicid_unet_params(base, path, abstract_params=with_saa if given_shapes else None)
    flat, flat_base = traverse_util.flatten_dict(merged), traverse_util.flatten_dict(base)
    assert set(flat) == set(traverse_util.flatten_dict(with_saa))
    for n, name in enumerate(sd_processor_order()):
        attn = tuple(name.split("/"))
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            np.testing.assert_array_equal(flat[attn + (proj, "lora_down")], torch_sd[f"{n}.{proj}_lora.down.weight"].T)
            np.testing.assert_array_equal(flat[attn + (proj, "lora_up")], torch_sd[f"{n}.{proj}_lora.up.weight"].T)
        if n % 2:
            np.testing.assert_array_equal(flat[attn + ("to_k_ip", "kernel")], torch_sd[f"{n}.to_k_ip.weight"].T)
            np.testing.assert_array_equal(flat[attn + ("to_v_ip", "kernel")], torch_sd[f"{n}.to_v_ip.weight"].T)
    for leaf, value in flat_base.items():
        np.testing.assert_array_equal(flat[leaf], value)


def test_merge_names_a_missing_processor_key(sd_like):
    _, with_saa, base, path, torch_sd = sd_like
    broken = {k: v for k, v in torch_sd.items() if k != "17.to_v_ip.weight"}
    with pytest.raises(WeightImportError, match=re.escape("17.to_v_ip.weight")):
        pw.merge_dynamicid_unet_params(base, broken, abstract_params=with_saa)


def test_merge_names_a_bad_base_leaf(sd_like):
    _, with_saa, base, path, _ = sd_like
    flat = dict(traverse_util.flatten_dict(base))
    leaf = ("mid_block", "resnets_0", "conv1", "kernel")
    flat[leaf] = np.zeros((1,) + flat[leaf].shape[1:], np.float32)
    with pytest.raises(WeightImportError, match=r"mis-shaped.*mid_block/resnets_0/conv1/kernel"):
        pw.merge_dynamicid_unet_params(traverse_util.unflatten_dict(flat), path, abstract_params=with_saa)
    del flat[leaf]
    with pytest.raises(WeightImportError, match=r"missing.*mid_block/resnets_0/conv1/kernel"):
        pw.merge_dynamicid_unet_params(traverse_util.unflatten_dict(flat), path, abstract_params=with_saa)


def test_init_variant_copies_kv_and_starts_lora_at_zero(sd_like):
    _, with_saa, base, _, _ = sd_like
    params = pw.init_dynamicid_unet_params(base, jax.random.PRNGKey(0), RANK, abstract_params=with_saa)
    flat, flat_base = traverse_util.flatten_dict(params), traverse_util.flatten_dict(base)
    downs = []
    for name in sd_processor_order():
        attn = tuple(name.split("/"))
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            assert not flat[attn + (proj, "lora_up")].any()
            downs.append(flat[attn + (proj, "lora_down")].ravel())
        if name.endswith("attn2"):
            np.testing.assert_array_equal(flat[attn + ("to_k_ip", "kernel")], flat_base[attn + ("to_k", "kernel")])
            np.testing.assert_array_equal(flat[attn + ("to_v_ip", "kernel")], flat_base[attn + ("to_v", "kernel")])
    assert abs(np.concatenate(downs).std() - 1.0 / RANK) < 0.05  # N(0, 1/r) as LoRADense initialises


# ----------------------------------------------------------------------------- forward (compiles)


@pytest.fixture(scope="module")
def small():
    plain_module = UNet2DConditionModel(UNetConfig(**SMALL))
    saa_module = UNet2DConditionModel(UNetConfig(**SMALL, lora_rank=RANK, saa=saa.SAAConfig()))
    base = random_tree(abstract(SMALL), 1)
    saa_shapes = abstract(SMALL, lora_rank=RANK, saa=saa.SAAConfig())
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    ctx = rng.normal(size=(2, 5, 16)).astype(np.float32)
    t = np.array([10.0, 500.0], np.float32)
    run_saa = jax.jit(lambda p, ident: saa_module.apply({"params": p}, x, t, ctx, ident))
    plain_out = np.asarray(jax.jit(lambda p: plain_module.apply({"params": p}, x, t, ctx))(base))
    return base, saa_shapes, run_saa, plain_out, ctx


def two_identities(id_scale):
    tokens = np.random.default_rng(4).normal(size=(2, 2, 4, 16)).astype(np.float32)
    return saa.identity_conditioning(tokens, layout_active=True, beta=2.0, id_scale=id_scale)


def test_saa_unet_with_zero_lora_and_no_identity_equals_plain_unet(small):
    base, saa_shapes, run_saa, plain_out, _ = small
    params = pw.init_dynamicid_unet_params(base, jax.random.PRNGKey(1), RANK, abstract_params=saa_shapes)
    out = np.asarray(run_saa(params, two_identities(0.0)))
    np.testing.assert_allclose(out, plain_out, rtol=1e-5, atol=1e-5)


def test_saa_unet_filled_from_saa_file_runs_and_uses_identity(small, tmp_path):
    base, saa_shapes, run_saa, plain_out, _ = small
    order = ["/".join(p) for p in pw.attention_processor_paths(saa_shapes)]
    blocks = ("down_blocks_0/attentions_0", "up_blocks_1/attentions_0", "up_blocks_1/attentions_1", "mid_block/attentions_0")
    assert order == [f"{blk}/transformer_blocks_0/attn{k}" for blk in blocks for k in (1, 2)]
    write_saa_file(tmp_path / "SAA.bin", saa_shapes, order, seed=6)
    params = pw.merge_dynamicid_unet_params(base, tmp_path / "SAA.bin", abstract_params=saa_shapes)
    with_id = np.asarray(run_saa(params, two_identities(1.0)))
    without_id = np.asarray(run_saa(params, two_identities(0.0)))
    assert np.isfinite(with_id).all()
    assert np.abs(with_id - without_id).max() > 1e-3  # the identity branch acts
    assert np.abs(without_id - plain_out).max() > 1e-3  # the loaded LoRA acts


def test_saa_unet_without_identity_is_an_error(small):
    base, saa_shapes, _, _, ctx = small
    module = UNet2DConditionModel(UNetConfig(**SMALL, lora_rank=RANK, saa=saa.SAAConfig()))
    params = pw.init_dynamicid_unet_params(base, jax.random.PRNGKey(1), RANK, abstract_params=saa_shapes)
    with pytest.raises(ValueError, match="identity conditioning"):
        jax.eval_shape(lambda p: module.apply({"params": p}, jnp.zeros((2, 8, 8, 4)), jnp.zeros(2), ctx), params)
