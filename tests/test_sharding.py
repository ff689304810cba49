"""Sharding rules on the 8 fake CPU devices (conftest): a sharded tiny-UNet forward equals the
unsharded one, fsdp really splits parameter bytes, meshes resolve -1 and reject bad sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dynamicid_jax import sharding
from dynamicid_jax.models.unet import UNet2DConditionModel, UNetConfig, unet_abstract_params
from dynamicid_jax.models.unet_config import CROSS_ATTN_DOWN, CROSS_ATTN_UP, PLAIN_DOWN, PLAIN_UP

# Two levels (one with cross-attention, one plain) hold every parameter kind the rules split
# (convs, projections, norms, attention); more levels only add compile time.
CONFIG = UNetConfig(
    block_out_channels=(32, 64),
    down_block_types=(CROSS_ATTN_DOWN, PLAIN_DOWN),
    up_block_types=(PLAIN_UP, CROSS_ATTN_UP),
    norm_num_groups=8,
    cross_attention_dim=32,
    num_attention_heads=(2, 4),
    sample_size=8,
)
MIN_SIZE = 1024  # tiny model: split everything of at least 1024 elements


def random_params(abstract, seed: int = 0):
    """Random weights from shapes alone (no init compile): fan-in scaled kernels, noisy norms."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = sharding.path_name(path)
        if name.endswith("scale"):
            return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        if name.endswith("bias"):
            return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def tiny_unet():
    module = UNet2DConditionModel(CONFIG)
    return module, random_params(unet_abstract_params(module))


def per_device_bytes(tree) -> dict:
    totals: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals


def test_make_mesh_resolves_minus_one():
    assert jax.device_count() == 8
    assert dict(sharding.make_mesh(2, -1).shape) == {"data": 2, "fsdp": 4}
    assert dict(sharding.make_mesh(-1, 8).shape) == {"data": 1, "fsdp": 8}
    mesh = sharding.make_mesh(4, 2)
    assert mesh.axis_names == ("data", "fsdp")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(sharding.make_mesh(1, -1, devices=jax.devices()[:2]).shape) == {"data": 1, "fsdp": 2}


@pytest.mark.parametrize("data,fsdp,message", [
    (3, -1, "do not divide by 3"),
    (2, 2, "does not match 8 devices"),
    (-1, -1, "at most one"),
    (0, 8, "data=0"),
    (2, 4.0, "fsdp=4.0"),
])
def test_make_mesh_rejects_bad_sizes(data, fsdp, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(data, fsdp)


def test_fsdp_strategy_picks_largest_divisible_dimension():
    mesh = sharding.make_mesh(1, 8)
    params = {
        "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 36, 64), jnp.float32)},  # 36 % 8 != 0 -> 64
        "dense": {"kernel": jax.ShapeDtypeStruct((4096, 12), jnp.float32)},
        "odd": {"kernel": jax.ShapeDtypeStruct((999, 7), jnp.float32)},  # nothing divides
        "small": {"kernel": jax.ShapeDtypeStruct((8, 8), jnp.float32)},  # under min_size
        "norm": {"scale": jax.ShapeDtypeStruct((4096,), jnp.float32)},  # replicate rule
    }
    specs = sharding.param_partition_specs(params, mesh, min_size=512)
    assert specs["conv"]["kernel"] == P(None, None, None, "fsdp")
    assert specs["dense"]["kernel"] == P("fsdp", None)
    assert specs["odd"]["kernel"] == P()
    assert specs["small"]["kernel"] == P()
    assert specs["norm"]["scale"] == P()
    # Rules are ordered: the first match wins; explicit specs are checked against the shape.
    rules = ((r"^dense/", P(None, "data")), (r"^conv/", "replicate")) + sharding.DEFAULT_RULES
    specs = sharding.param_partition_specs(params, sharding.make_mesh(4, 2), rules=rules, min_size=512)
    assert specs["dense"]["kernel"] == P(None, "data")
    assert specs["conv"]["kernel"] == P()
    assert specs["odd"]["kernel"] == P()  # 999 and 7 are odd; fsdp size 2
    with pytest.raises(ValueError, match="odd/kernel"):
        sharding.param_partition_specs(params, mesh, rules=((r"^odd/", P("fsdp")),))


def test_fsdp_splits_parameter_bytes(tiny_unet):
    _, params = tiny_unet
    mesh = sharding.make_mesh(1, 8)
    specs = sharding.param_partition_specs(params, mesh, min_size=MIN_SIZE)
    placed = jax.device_put(params, sharding.param_shardings(params, mesh, min_size=MIN_SIZE))
    is_split = [spec != P() for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))]
    sizes = [leaf.nbytes for leaf in jax.tree.leaves(params)]
    split_total = sum(s for s, split in zip(sizes, is_split) if split)
    whole_total = sum(s for s, split in zip(sizes, is_split) if not split)
    assert split_total > 0.9 * (split_total + whole_total), "the rules should split most of the bytes"
    per_device = per_device_bytes(placed)
    assert len(per_device) == 8
    for device, nbytes in per_device.items():
        assert nbytes <= split_total / 8 + whole_total + 1024, (device, nbytes)


def test_sharded_forward_equals_unsharded(tiny_unet):
    module, params = tiny_unet
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((8, 8, 8, 4), dtype=np.float32)
    timesteps = rng.uniform(0, 1000, (8,)).astype(np.float32)
    context = rng.standard_normal((8, 5, 32), dtype=np.float32)

    def forward(p, x, t, c):
        return module.apply({"params": p}, x, t, c)

    expected = np.asarray(jax.jit(forward)(params, sample, timesteps, context))

    mesh = sharding.make_mesh(2, -1)
    shardings = sharding.param_shardings(params, mesh, min_size=MIN_SIZE)
    batch = sharding.batch_sharding(mesh)
    sharded_forward = jax.jit(forward, in_shardings=(shardings, batch, batch, batch), out_shardings=batch)
    out = sharded_forward(jax.device_put(params, shardings), *jax.device_put((sample, timesteps, context), batch))
    assert out.sharding.is_equivalent_to(batch, out.ndim)
    out = np.asarray(out)
    err = np.linalg.norm(out - expected) / np.linalg.norm(expected)
    assert err <= 1e-5, f"sharded vs unsharded relative L2 error {err:.2e}"
