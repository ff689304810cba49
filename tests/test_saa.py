"""Semantic-Activated Attention against an independent NumPy statement of the paper/release rules.

The reference below re-states the forward with explicit loops over grid cells (python int()
box cuts, -inf masks, per-image min-max) and shares no code with the module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamicid_jax.dynamicid import saa
from parity import rel_l2

HEADS, HEAD_DIM, C, CTX_LEN, CTX_DIM, ID_DIM, RANK = 2, 4, 8, 5, 6, 7, 3
GRID = (6, 8)  # non-square on purpose: row-major flattening must hold
N = GRID[0] * GRID[1]
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def model():
    return saa.SemanticActivatedAttention(HEADS, HEAD_DIM, lora_rank=RANK, config=saa.SAAConfig(threshold=THRESHOLD))


@pytest.fixture(scope="module")
def params(model):
    rng = np.random.default_rng(0)
    ident = saa.identity_conditioning(np.zeros((1, 1, 2, ID_DIM), np.float32))
    init = lambda key, x, ctx, ident: model.init(key, x, ctx, ident, GRID)  # noqa: E731 (grid is static)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), jnp.zeros((1, N, C)), jnp.zeros((1, CTX_LEN, CTX_DIM)), ident)
    shapes = shapes["params"]
    # Random everything, LoRA included, so every branch contributes.
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), jnp.float32), shapes)


def run(model, params, x, ctx, ident):
    out, state = model.apply({"params": params}, x, ctx, ident, GRID, mutable=["intermediates"])
    inter = state["intermediates"]
    return np.asarray(out), np.asarray(inter["activation_weight"][0]), np.asarray(inter["identity_probs"][0])


# ----------------------------------------------------------------------------- NumPy reference


def np_dense(p, x):
    y = x @ np.asarray(p["kernel"], np.float64)
    if "bias" in p:
        y = y + np.asarray(p["bias"])
    if "lora_down" in p:
        y = y + (x @ np.asarray(p["lora_down"], np.float64)) @ np.asarray(p["lora_up"], np.float64)
    return y


def np_softmax(s):
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def covering_ids(boxes_b, r, c):
    """Identities whose box holds cell (r, c): rows int(y0*h) <= r < int(y1*h), same for columns."""
    h, w = GRID
    out = []
    for i, (y0, x0, y1, x1) in enumerate(np.asarray(boxes_b, np.float64)):
        if int(y0 * h) <= r < int(y1 * h) and int(x0 * w) <= c < int(x1 * w):
            out.append(i)
    return out


def reference_saa(p, x, ctx, tokens, boxes, *, layout, beta, id_scale, mix, use_boxes, gating):
    x, ctx, tokens = (np.asarray(a, np.float64) for a in (x, ctx, tokens))
    b, n_ids, t, _ = tokens.shape
    heads = lambda a: a.reshape(a.shape[0], a.shape[1], HEADS, HEAD_DIM)  # noqa: E731
    q = heads(np_dense(p["to_q"], x))
    k, v = heads(np_dense(p["to_k"], ctx)), heads(np_dense(p["to_v"], ctx))
    z = np.einsum("bhnm,bmhd->bnhd", np_softmax(np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(HEAD_DIM)), v)
    z = z.reshape(b, N, -1)
    flat_tokens = tokens.reshape(b, n_ids * t, -1)
    k_id, v_id = heads(np_dense(p["to_k_ip"], flat_tokens)), heads(np_dense(p["to_v_ip"], flat_tokens))
    scores = np.einsum("bnhd,bmhd->bhnm", q, k_id) / np.sqrt(HEAD_DIM)
    weight = np.ones((b, N))
    if gating:
        for bi in range(b):
            raw = scores[bi].sum(axis=(0, 2))
            span = raw.max() - raw.min()
            norm = (raw - raw.min()) / span if span > 0 else np.zeros(N)
            norm[norm < THRESHOLD] = 0.0
            weight[bi] = norm
    owner = np.arange(n_ids * t) // t
    if mix is not None:
        scores = scores * np.where(owner == 0, mix, 1.0 - mix)
    for bi in range(b):
        for r in range(GRID[0]):
            for c in range(GRID[1]):
                n = r * GRID[1] + c
                ids = covering_ids(boxes[bi], r, c) if use_boxes else []
                if gating and use_boxes and layout:
                    weight[bi, n] = weight[bi, n] + beta if ids else weight[bi, n] / (beta + 1.0)
                if ids:
                    scores[bi, :, n, ~np.isin(owner, ids)] = -np.inf
    probs = np_softmax(scores)
    z_id = np.einsum("bhnm,bmhd->bnhd", probs, v_id).reshape(b, N, -1)
    return np_dense(p["to_out"], z + id_scale * weight[..., None] * z_id), weight, probs


# ----------------------------------------------------------------------------- cases

OVERLAP_EMPTY = [
    [0.0, 0.0, 1.0, 0.5],  # left half
    [0.2, 0.3, 0.9, 0.8],  # overlaps the first
    [0.5, 0.5, 0.55, 0.56],  # rows 3..3 (int(3.3) = 3): empty on the 6x8 grid
]
CASES = {
    "two_ids_strips_layout": dict(n_ids=2, boxes=None, layout=True, beta=2.0, mix=None, use_boxes=True, gating=True),
    "overlap_and_empty_box": dict(n_ids=3, boxes=OVERLAP_EMPTY, layout=True, beta=4.0, mix=None, use_boxes=True, gating=True),
    "layout_off": dict(n_ids=3, boxes=OVERLAP_EMPTY, layout=False, beta=4.0, mix=None, use_boxes=True, gating=True),
    "mixing_one_box": dict(n_ids=2, boxes=[[0.1, 0.1, 0.9, 0.7]] * 2, layout=True, beta=1.0, mix=0.3, use_boxes=True, gating=True),
    "gating_off_no_boxes": dict(n_ids=2, boxes=None, layout=True, beta=2.0, mix=None, use_boxes=False, gating=False),
    "gating_no_boxes": dict(n_ids=2, boxes=None, layout=True, beta=2.0, mix=None, use_boxes=False, gating=True),
    "one_id": dict(n_ids=1, boxes=[[0.25, 0.25, 0.75, 0.75]], layout=True, beta=3.0, mix=None, use_boxes=True, gating=True),
}


def inputs(seed, n_ids, b=2, t=3):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(b, N, C)).astype(np.float32),
        rng.normal(size=(b, CTX_LEN, CTX_DIM)).astype(np.float32),
        rng.normal(size=(b, n_ids, t, ID_DIM)).astype(np.float32),
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_reference(model, params, case):
    cfg = CASES[case]
    x, ctx, tokens = inputs(hash(case) % 1000, cfg["n_ids"])
    ident = saa.identity_conditioning(
        tokens, cfg["boxes"], layout_active=cfg["layout"], beta=cfg["beta"], id_scale=0.8, mix=cfg["mix"],
        use_boxes=cfg["use_boxes"], gating=cfg["gating"],
    )
    boxes = np.asarray(ident.boxes)
    out, weight, probs = run(model, params, x, ctx, ident)
    ref, ref_weight, ref_probs = reference_saa(
        params, x, ctx, tokens, boxes, layout=cfg["layout"], beta=cfg["beta"], id_scale=0.8, mix=cfg["mix"],
        use_boxes=cfg["use_boxes"], gating=cfg["gating"],
    )
    assert np.isfinite(out).all()
    assert rel_l2(out, ref) <= 1e-4, case
    np.testing.assert_allclose(weight, ref_weight, atol=1e-5)
    np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
    if cfg["gating"]:  # the threshold must have bitten somewhere, else the case tests less than it claims
        assert (ref_weight == 0).any() or cfg["layout"]


def test_per_image_boxes(model, params):
    """Each batch element cuts its own boxes."""
    x, ctx, tokens = inputs(7, 2)
    boxes = np.array([[[0, 0, 1, 0.5], [0, 0.5, 1, 1]], [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]], np.float32)
    ident = saa.identity_conditioning(tokens, boxes, layout_active=True, beta=2.0)
    out, _, _ = run(model, params, x, ctx, ident)
    ref, _, _ = reference_saa(params, x, ctx, tokens, boxes, layout=True, beta=2.0, id_scale=1.0, mix=None,
                              use_boxes=True, gating=True)
    assert rel_l2(out, ref) <= 1e-4


def test_routing_masks_other_identities_exactly(model, params):
    x, ctx, tokens = inputs(3, 3, t=2)
    ident = saa.identity_conditioning(tokens, OVERLAP_EMPTY, layout_active=False)
    _, _, probs = run(model, params, x, ctx, ident)  # (B, H, N, n*T)
    owner = np.arange(3 * 2) // 2
    seen = set()
    for r in range(GRID[0]):
        for c in range(GRID[1]):
            ids = covering_ids(OVERLAP_EMPTY, r, c)
            p = probs[:, :, r * GRID[1] + c]
            allowed = np.isin(owner, ids) if ids else np.ones_like(owner, bool)
            assert (p[..., ~allowed] == 0.0).all(), (r, c, ids)
            assert (p[..., allowed] > 0.0).all(), (r, c, ids)
            seen.add(tuple(ids))
    assert {(0,), (1,), (0, 1), ()} <= seen  # single, overlap and uncovered cells all occurred
    assert not any(2 in ids for ids in seen)  # the empty box covers nothing


def test_context_decoupling_below_threshold_is_text_only(model, params):
    x, ctx, tokens = inputs(5, 2)
    with_id = saa.identity_conditioning(tokens, layout_active=False, id_scale=1.0)
    text_only = saa.identity_conditioning(tokens, layout_active=False, id_scale=0.0)
    out, weight, _ = run(model, params, x, ctx, with_id)
    out_text, _, _ = run(model, params, x, ctx, text_only)
    off = weight == 0.0
    assert off.any() and (~off).any()
    np.testing.assert_array_equal(out[off], out_text[off])
    assert np.abs(out[~off] - out_text[~off]).max() > 1e-3


def test_constant_activation_map_and_full_overlap_are_finite(model, params):
    rng = np.random.default_rng(11)
    x = np.broadcast_to(rng.normal(size=(1, 1, C)), (2, N, C)).astype(np.float32)  # every query alike
    _, ctx, tokens = inputs(11, 2)
    same_box = [[0.0, 0.0, 0.5, 0.5]] * 2  # both identities share one box: full overlap
    ident = saa.identity_conditioning(tokens, same_box, layout_active=True, beta=2.0)
    out, weight, probs = run(model, params, x, ctx, ident)
    assert np.isfinite(out).all() and np.isfinite(probs).all()
    inside = np.zeros(GRID, bool)
    inside[:3, :4] = True
    # Constant map -> normalised weight 0 everywhere (documented), then eq. 3: 0 + beta inside, 0 outside.
    np.testing.assert_array_equal(weight, np.where(inside.reshape(-1), 2.0, 0.0)[None].repeat(2, 0))
    ref, _, _ = reference_saa(params, x, ctx, tokens, np.asarray(ident.boxes), layout=True, beta=2.0, id_scale=1.0,
                              mix=None, use_boxes=True, gating=True)
    assert rel_l2(out, ref) <= 1e-4


@pytest.mark.parametrize("mix", [0.0, 1.0])
def test_extreme_mixing_is_finite(model, params, mix):
    x, ctx, tokens = inputs(13, 2)
    ident = saa.identity_conditioning(tokens, [[0, 0, 1, 0.5], [0, 0.5, 1, 1]], layout_active=True, beta=1.0, mix=mix)
    out, _, probs = run(model, params, x, ctx, ident)
    assert np.isfinite(out).all() and np.isfinite(probs).all()


def test_new_boxes_do_not_recompile(model, params):
    x, ctx, tokens = inputs(17, 2)
    f = jax.jit(lambda ident: model.apply({"params": params}, x, ctx, ident, GRID))
    a = f(saa.identity_conditioning(tokens, [[0, 0, 1, 0.5], [0, 0.5, 1, 1]], layout_active=True, beta=2.0))
    b = f(saa.identity_conditioning(tokens, [[0, 0, 0.5, 1], [0.5, 0, 1, 1]], layout_active=False, beta=3.0))
    assert f._cache_size() == 1
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


def test_bfloat16_compute_close_to_float32(params):
    m16 = saa.SemanticActivatedAttention(HEADS, HEAD_DIM, lora_rank=RANK, dtype=jnp.bfloat16)
    m32 = saa.SemanticActivatedAttention(HEADS, HEAD_DIM, lora_rank=RANK)
    x, ctx, tokens = inputs(19, 2)
    ident = saa.identity_conditioning(tokens, layout_active=True, beta=2.0)
    out16 = m16.apply({"params": params}, x, ctx, ident, GRID)
    out32 = m32.apply({"params": params}, x, ctx, ident, GRID)
    assert out16.dtype == jnp.bfloat16
    assert rel_l2(np.asarray(out16, np.float32), np.asarray(out32, np.float64)) < 0.1


def test_bad_inputs_raise(model, params):
    x, ctx, tokens = inputs(1, 2)
    ident = saa.identity_conditioning(tokens)
    with pytest.raises(ValueError, match="spatial_shape"):
        model.apply({"params": params}, x, ctx, ident, (5, 8))
    with pytest.raises(ValueError, match="identity conditioning"):
        model.apply({"params": params}, x, ctx, None, GRID)


# ----------------------------------------------------------------------------- host helpers


def test_layout_schedule_count_and_fraction():
    count = [bool(saa.layout_active(s, 50, 12)) for s in range(50)]
    assert count == [s < 12 for s in range(50)]
    assert [bool(saa.layout_active(s, 50, 0.24)) for s in range(50)] == count
    assert [bool(saa.layout_active(s, 100, 0.07)) for s in range(100)] == [s < 7 for s in range(100)]
    assert [bool(saa.layout_active(s, 10, 0.25)) for s in range(10)] == [s < 3 for s in range(10)]  # ceil(2.5)
    assert all(bool(saa.layout_active(s, 30, 1.0)) for s in range(30))
    assert [bool(saa.layout_active(s, 30, 1)) for s in range(3)] == [True, False, False]
    assert not any(bool(saa.layout_active(s, 30, 0)) for s in range(30))
    assert bool(jax.jit(lambda s: saa.layout_active(s, 50, 3))(2)) and not bool(
        jax.jit(lambda s: saa.layout_active(s, 50, 3))(3)
    )
    for bad in (0.0, 1.5, -1, True, "3"):
        with pytest.raises((ValueError, TypeError)):
            saa.layout_active(0, 50, bad)


def test_default_and_validated_boxes():
    np.testing.assert_allclose(saa.default_boxes(1), [[0, 0, 1, 1]])
    boxes = saa.default_boxes(3)
    np.testing.assert_allclose(boxes[:, 1], [0, 1 / 3, 2 / 3], atol=1e-7)
    np.testing.assert_allclose(boxes[:, 3], [1 / 3, 2 / 3, 1], atol=1e-7)
    assert (boxes[:, 0] == 0).all() and (boxes[:, 2] == 1).all()
    saa.validate_boxes(boxes)
    with pytest.raises(ValueError, match=r"box \(1,\).*outside"):
        saa.validate_boxes([[0, 0, 1, 1], [0, 0, 1.2, 1]])
    with pytest.raises(ValueError, match=r"box \(0,\).*y_min < y_max"):
        saa.validate_boxes([[0.5, 0, 0.5, 1]])
    with pytest.raises(ValueError, match="shape"):
        saa.validate_boxes([0, 0, 1])
