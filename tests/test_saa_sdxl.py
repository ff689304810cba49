"""DynamicID on SDXL against a PyTorch reference: diffusers' own tiny SDXL UNet (sdxl_tiny.py)
with our torch re-statement of the release's processors (dynamicid_sdxl_reference.py) set on
every attention in diffusers' `attn_processors` order, against our SAA UNet built by
`modeling.build_modules` from the tiny SDXL config (identity tokens as wide as the UNet's
context), its DynamicID leaves imported from the processors' state dict in the release
layout (`merge_dynamicid_unet_params`): so the parity also proves the processor numbering.

Cases (float32 both sides, relative L2 <= 1e-4): one identity, its region a mask; two
identities with boxes while the layout boost is on and, in the same batch, after alpha; gating
off; SAA on a subset of the attn2 layers (`model.saa_blocks`, the others plain text attention +
LoRA) with identity mixing in the same pass; the face projection (identity tokens of the UNet's
width, 64 here, 2048 on SDXL) and IMR (motion inputs CLIP-L's width, 32 here, 768 on SDXL;
identity side the tokens' width). The same float32 graphs on both sides differ only in
summation order (a few ulp per op; the UNet parity of test_sdxl_parity.py measured 5e-7;
the subset-with-mixing case 6.4e-7), so 1e-4 leaves two orders of margin while a
wrong rule moves the output by far more (measured in `test_breakages_fail_parity` and the
subset case: 2.7e-2 and more).

The latent is 14 x 22 so the attention grid is 7 x 11: non-square (row-major order) and
cut by boxes on partial cells (python int() cuts).

Cost: ~60 s on 2 shared cores, most of it three compiles of the tiny SDXL UNet (one and two
identities; gating off is a static switch) and torch/diffusers imports; the subset-with-mixing
case adds one compile (its own UNet; mixing a static switch of it), 20-35 s measured.
"""

import copy
import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import dynamicid_sdxl_reference as sref  # noqa: E402
import dynamicid_torch_reference as ref  # noqa: E402
from dynamicid_jax import base_models, modeling  # noqa: E402
from dynamicid_jax.dynamicid import published_weights as pw  # noqa: E402
from dynamicid_jax.dynamicid import saa, saa_blocks  # noqa: E402
from dynamicid_jax.models.unet import import_unet_params, unet_abstract_params  # noqa: E402
from parity import rel_l2  # noqa: E402
from sdxl_tiny import UNET  # noqa: E402

RTOL = 1e-4
LATENT = (14, 22)
TEXT_TOKENS, T = 77, 4
BOXES = [[0.0, 0.0, 1.0, 0.45], [0.1, 0.5, 0.9, 1.0]]
BETA, TIMESTEP = 2.0, 400.0


@pytest.fixture(scope="module")
def setup():
    model = base_models.default_config(tiny=True, family="sdxl").model
    modules = modeling.build_modules(model)
    torch.manual_seed(0)  # the UNet of sdxl_tiny.tiny_sdxl_components (its first draw), without the rest
    unet = diffusers.UNet2DConditionModel(**UNET).eval()
    plain = dataclasses.replace(modules.unet.config, lora_rank=0, saa=None)  # diffusers' tiny SDXL UNet
    base = import_unet_params(plain, {k: v.numpy() for k, v in unet.state_dict().items()})
    state = sref.Identity(text_tokens=TEXT_TOKENS, tokens_per_id=T, latent_hw=LATENT, boxes=[])
    processors = sref.install(unet, state, rank=model.lora_rank, seed=7)
    saa_sd = {k: v.detach().numpy() for k, v in processors.state_dict().items()}
    shapes = unet_abstract_params(modules.unet, saa.identity_conditioning(np.zeros((1, 1, T, 64), np.float32)))
    params = pw.merge_dynamicid_unet_params(base, saa_sd, abstract_params=shapes)
    apply = jax.jit(lambda p, x, t, ctx, ident, added: modules.unet.apply({"params": p}, x, t, ctx, ident, added))
    return dict(modules=modules, unet=unet, state=state, processors=processors, params=params, apply=apply, base=base)


# SAA on 4 of the 12 attn2 layers, at each level (down 2, mid 1, up 1); the 8 others plain.
SUBSET = ("down_blocks.1.attentions.0", "mid_block.attentions.0.transformer_blocks.1",
          "up_blocks.0.attentions.1.transformer_blocks.0")
MIX = 0.3


@pytest.fixture(scope="module")
def subset(setup):
    """`model.saa_blocks = SUBSET`: our UNet built from that config; the reference a copy of
    diffusers' UNet whose attn2 layers outside SUBSET keep plain attention with their LoRA
    (`sref.install(saa_names=...)`). Both hold the module fixture's weights, less the identity
    projections of the layers left out, ours imported from the reference's state dict in the
    release layout (so the numbering of a subset's processors is checked too)."""
    model = base_models.default_config(tiny=True, family="sdxl").model
    model.saa_blocks = SUBSET
    modules = modeling.build_modules(model)
    names = set(saa_blocks.selected_names(SUBSET, modules.unet.config))
    assert len(names) == 4
    unet = copy.deepcopy(setup["unet"])
    processors = sref.install(unet, setup["state"], rank=model.lora_rank, saa_names=names)
    full = setup["processors"].state_dict()
    processors.load_state_dict({k: v for k, v in full.items() if k in processors.state_dict()})  # strict
    saa_sd = {k: v.detach().numpy() for k, v in processors.state_dict().items()}
    assert sum(k.endswith("to_k_ip.weight") for k in saa_sd) == 4
    shapes = unet_abstract_params(modules.unet, saa.identity_conditioning(np.zeros((1, 1, T, 64), np.float32)))
    params = pw.merge_dynamicid_unet_params(setup["base"], saa_sd, abstract_params=shapes)
    apply = jax.jit(lambda p, x, t, ctx, ident, added: modules.unet.apply({"params": p}, x, t, ctx, ident, added))
    return dict(setup, modules=modules, unet=unet, processors=processors, params=params, apply=apply)


def inputs(b, n_ids, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return dict(x=f(b, *LATENT, 4), text=f(b, TEXT_TOKENS, 64), ids=f(b, n_ids, T, 64), pooled=f(b, 32),
                time_ids=np.tile(np.asarray([[28, 44, 0, 0, 28, 44]], np.float32), (b, 1)))


def ours(setup, inp, boxes, active, gating=True, params=None, mask=None, mix=None):
    """mask: identity 0's region as a mask on the latent's pixel grid (H, W), instead of its box.
    setup: the module fixture or `subset`'s (its own UNet, params and compiled apply)."""
    b, n_ids = inp["ids"].shape[:2]
    ident = saa.identity_conditioning(inp["ids"], np.asarray(boxes, np.float32),
                                      layout_active=np.asarray(active, bool).reshape(b, 1), beta=BETA, gating=gating,
                                      mix=mix)
    if mask is not None:
        masks = np.zeros((b, n_ids) + LATENT, np.float32)
        masks[:, 0] = mask
        ident = ident.replace(masks=masks, mask_used=np.arange(n_ids)[None].repeat(b, 0) == 0)
    added = {"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}
    out = setup["apply"](params or setup["params"], inp["x"], np.full((b,), TIMESTEP, np.float32), inp["text"],
                         ident, added)
    return np.asarray(out)


def theirs(setup, inp, boxes, active, gating=True, mask=None, mix=None):
    b, n_ids = inp["ids"].shape[:2]
    s = setup["state"]
    s.boxes, s.layout_active, s.beta, s.gating, s.mix = [boxes] * b, list(active), BETA, gating, mix
    s.masks = None if mask is None else [[torch.from_numpy(mask)] + [None] * (n_ids - 1)] * b
    context = np.concatenate([inp["text"], inp["ids"].reshape(b, -1, 64)], axis=1)
    with torch.no_grad():
        out = setup["unet"](torch.from_numpy(inp["x"].transpose(0, 3, 1, 2)), torch.tensor(TIMESTEP),
                            torch.from_numpy(context),
                            added_cond_kwargs={"text_embeds": torch.from_numpy(inp["pooled"]),
                                               "time_ids": torch.from_numpy(inp["time_ids"])}).sample
    return out.numpy().transpose(0, 2, 3, 1)


def test_processors_cover_every_attention_in_diffusers_order(setup):
    """16 processors on the tiny SDXL (8 attn2: 2 down, 4 up, 2 mid), numbered as diffusers
    orders them; saa_blocks' names are diffusers' attn2 names in that order."""
    names = [n[: -len(".processor")] for n in setup["unet"].attn_processors]
    ours_order = [saa_blocks.diffusers_name(p) if p[-1] == "attn2" else None
                  for p in pw.attention_processor_paths(setup["params"])]
    assert len(names) == len(ours_order) == 16
    assert [n for n in names if n.endswith("attn2")] == [n for n in ours_order if n] \
        == saa_blocks.attn2_names(setup["modules"].unet.config)


def disc() -> np.ndarray:
    """A disc off-centre on the latent grid, with soft edges: its region has no box's shape, and
    the 7 x 11 attention grid's cells sample it at several grey levels (their last pixels)."""
    y, x = np.mgrid[: LATENT[0], : LATENT[1]] + 0.5
    return np.clip(4.5 - np.hypot(y - 6.0, x - 13.0), 0.0, 1.0).astype(np.float32)


def test_unet_parity_single_identity_with_a_mask_region(setup):
    """One person whose region is a mask (the layout boost inside it, / (beta + 1) outside)."""
    inp = inputs(1, 1, seed=1)
    box = [[0.0, 0.0, 1.0, 1.0]]  # ignored: the mask is this person's region
    mask = disc()
    err = rel_l2(ours(setup, inp, [box], [True], mask=mask), theirs(setup, inp, box, [True], mask=mask))
    print(f"single identity, mask region: {err:.2g}")
    assert err <= RTOL, err


def test_unet_parity_two_identities_layout_boost_and_after_alpha(setup):
    """Row 0 with the layout boost on (step < alpha), row 1 the same inputs after alpha."""
    inp = inputs(2, 2, seed=2)
    inp = {k: np.repeat(v[:1], 2, axis=0) for k, v in inp.items()}
    mine, ref_out = ours(setup, inp, [BOXES] * 2, [True, False]), theirs(setup, inp, BOXES, [True, False])
    errors = [rel_l2(mine[i], ref_out[i]) for i in range(2)]
    print(f"two identities, boost on / after alpha: {errors[0]:.2g} / {errors[1]:.2g}")
    assert max(errors) <= RTOL, errors
    assert rel_l2(mine[0], mine[1]) > 100 * RTOL  # the boost is not a no-op here


def test_unet_parity_gating_off(setup):
    inp = inputs(2, 2, seed=3)
    err = rel_l2(ours(setup, inp, [BOXES] * 2, [True, True], gating=False),
                 theirs(setup, inp, BOXES, [True, True], gating=False))
    print(f"gating off: {err:.2g}")
    assert err <= RTOL, err


def test_unet_parity_saa_on_a_subset_of_blocks_with_identity_mixing(setup, subset):
    """SAA on SUBSET only (`model.saa_blocks`) and, in the same pass (one compile for both),
    identity mixing: two identities sharing one box ("one box, several identities"), m = 0.3;
    row 0 with the layout boost, row 1 after alpha. Breakages, each far over the bound: m and
    1 - m swapped, mixing left off, and SAA on every attn2 (the module fixture's reference)."""
    inp = inputs(2, 2, seed=5)
    box = [[0.1, 0.2, 0.9, 0.8]] * 2
    active = [True, False]
    mine = ours(subset, inp, [box] * 2, active, mix=MIX)
    err = rel_l2(mine, theirs(subset, inp, box, active, mix=MIX))
    swapped = rel_l2(mine, theirs(subset, inp, box, active, mix=1.0 - MIX))
    unmixed = rel_l2(mine, theirs(subset, inp, box, active))
    everywhere = rel_l2(mine, theirs(setup, inp, box, active, mix=MIX))
    print(f"saa_blocks subset with mixing: {err:.2g}; breakages: m swapped {swapped:.3g}, no mixing {unmixed:.3g}, "
          f"SAA on every attn2 {everywhere:.3g}")
    assert err <= RTOL, err
    assert min(swapped, unmixed, everywhere) > 10 * RTOL, (swapped, unmixed, everywhere)


def test_breakages_fail_parity(setup):
    """Each would pass unnoticed by a shape check; each must exceed the bound by far:
    the boxes swapped between the two people, and the LoRA left off one attn2."""
    inp = inputs(2, 2, seed=2)
    good = ours(setup, inp, [BOXES] * 2, [True, True])
    swapped = rel_l2(good, theirs(setup, inp, BOXES[::-1], [True, True]))
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: np.zeros_like(v) if _is_lora_of(path, "up_blocks_0", "attn2") else v, setup["params"])
    no_lora = rel_l2(ours(setup, inp, [BOXES] * 2, [True, True], params=params), theirs(setup, inp, BOXES, [True, True]))
    print(f"breakages: boxes swapped {swapped:.3g}, LoRA off up_blocks.0.attentions.1.transformer_blocks.0.attn2 "
          f"{no_lora:.3g}")
    assert swapped > 10 * RTOL and no_lora > 10 * RTOL, (swapped, no_lora)


def _is_lora_of(path, block, attn) -> bool:
    keys = [getattr(e, "key", None) for e in path]
    return (keys[:2] == [block, "attentions_1"] and keys[2] == "transformer_blocks_0" and keys[3] == attn
            and keys[-1] in ("lora_down", "lora_up"))


def test_face_projection_and_imr_parity(setup):
    """Identity tokens of the UNet's width from the face projection; IMR edits them with
    CLIP-L-wide motion inputs (landmark and face-prompt features)."""
    m = setup["modules"]
    proj, imr = m.face_projection, m.imr
    assert (proj.width, imr.id_dim, imr.landmark_dim, imr.text_dim) == (64, 64, 32, 32)
    assert m.keypoint_encoder.embedding_dim == imr.landmark_dim
    torch_proj = ref.randomise_(ref.ProjPlusModel(proj.width, proj.id_dim, proj.clip_dim, proj.num_tokens,
                                                  depth=proj.depth, heads=proj.num_heads, dim_head=proj.head_dim),
                                seed=11).eval()
    torch_imr = ref.randomise_(ref.IMR(dim=imr.width, dim_head=imr.head_dim, heads=imr.num_heads,
                                       num_queries=imr.num_motion_tokens, embedding_dim=imr.id_dim,
                                       txt_dim=imr.text_dim, landmark_dim=imr.landmark_dim, depth=imr.depth),
                               seed=12).eval()
    numpy = lambda mod: {k: v.detach().numpy() for k, v in mod.state_dict().items()}  # noqa: E731
    proj_params = pw.load_face_projection_params(numpy(torch_proj), proj)
    imr_params = pw.load_imr_params(numpy(torch_imr), imr)
    rng = np.random.default_rng(4)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    ids, clip = f(2, proj.id_dim), f(2, 5, proj.clip_dim)
    tokens = np.asarray(jax.jit(proj.apply)({"params": proj_params}, ids, clip))
    with torch.no_grad():
        expected = torch_proj(torch.from_numpy(ids), torch.from_numpy(clip)).numpy()
    assert tokens.shape == (2, proj.num_tokens, 64)
    proj_err = rel_l2(tokens, expected)
    src_lm, src_txt, tgt_lm, tgt_txt = f(1, 32), f(1, 32), f(3, 32), f(3, 32)
    with torch.no_grad():
        expected = torch_imr(*(torch.from_numpy(a) for a in (np.array(tokens[:1]), src_lm, tgt_lm, src_txt, tgt_txt))).numpy()
    rep = lambda a: np.repeat(a, 3, axis=0)  # noqa: E731  (ours pairs one source row per target)
    edited = jax.jit(imr.apply)({"params": imr_params}, rep(tokens[:1]), rep(src_lm), rep(src_txt), tgt_lm, tgt_txt)
    assert edited.shape == expected.shape == (3, proj.num_tokens, 64)
    imr_err = rel_l2(edited, expected)
    print(f"face projection {proj_err:.2g}, IMR {imr_err:.2g}")
    assert proj_err <= RTOL and imr_err <= RTOL, (proj_err, imr_err)
