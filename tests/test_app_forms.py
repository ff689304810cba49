"""The web app's pieces without a server: upload checks, face prompts, previews, activation
overlays and maps, sidecar forms, brush masks (< 5 s together; no model, no browser).
The served app and its browser tests: test_app.py."""

import pathlib
import time

import numpy as np
import pytest
from PIL import Image

from dynamicid_jax.app import forms
from dynamicid_jax.request import InputError


def test_uploads_are_checked_for_place_type_and_size(tmp_path):
    root = tmp_path / "uploads"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"x")
    assert forms.check_upload(root / "a.jpg", root) == (root / "a.jpg").resolve()
    (tmp_path / "outside.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="server paths are never opened"):
        forms.check_upload(tmp_path / "outside.jpg", root)
    with pytest.raises(InputError, match="server paths are never opened"):
        forms.check_upload(root / ".." / "outside.jpg", root)
    (root / "b.txt").write_bytes(b"x")
    with pytest.raises(InputError, match="only"):
        forms.check_upload(root / "b.txt", root)
    with open(root / "big.png", "wb") as f:  # sparse: no 20 MB written
        f.truncate(forms.MAX_UPLOAD_BYTES + 1)
    with pytest.raises(InputError, match="larger than 20 MB"):
        forms.check_upload(root / "big.png", root)


def test_face_prompt_choices_compose_the_release_form():
    side_up = np.array([20.0, 30.0, 0.0])  # pitch up, yaw to the side
    assert forms.compose_face_prompt("surprise", "keep", "happy", side_up) == \
        "in a surprise expression, facing up, in side view"
    assert forms.compose_face_prompt("keep", "front", "happy", side_up) == "in a happy expression, in front view"
    assert forms.compose_face_prompt("keep", "facing down", "sad", np.zeros(3)) == \
        "in a sad expression, facing down, in front view"
    with pytest.raises(InputError, match="expression"):
        forms.compose_face_prompt("smug", "keep", "happy", side_up)


def test_previews_are_files_written_once_by_content(tmp_path):
    """The layout canvas and face crops reach gradio as files named by their PNG bytes and
    never rewritten: gradio rewrites an array's cache file on every return, and a canvas
    redrawn unchanged was then served half written (a cold suite run saw the browser wait on a
    broken layout image)."""
    from dynamicid_jax.app.previews import layout_preview, png_file

    canvas = layout_preview([[0, 0, 1, 0.5], None], 64, 96, ["person 1", "person 2"])
    first = pathlib.Path(png_file(canvas, tmp_path))
    stamp = first.stat().st_mtime_ns
    time.sleep(0.01)
    assert pathlib.Path(png_file(canvas.copy(), tmp_path)) == first and first.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(np.asarray(Image.open(first)), canvas)
    other = layout_preview([[0, 0, 1, 0.5], [0, 0.5, 1, 1]], 64, 96, ["person 1", "person 2"])
    assert pathlib.Path(png_file(other, tmp_path)) != first
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".png", ".png"]  # no temporary left over


def test_activation_overlays_cover_every_image():
    """Two images, two steps, two people: an overlay each, image 2's from image 2's map."""
    from dynamicid_jax.app.service import activation_overlays

    images = np.full((2, 16, 16, 3), 200, np.uint8)
    maps = {s: np.zeros((2, 2, 2, 2), np.float32) for s in (0, 4)}
    maps[4][1, 0, 0, 0] = 1.0  # image 2, person 1: only the top-left latent cell is active
    overlays = activation_overlays(images, maps, 5)
    assert [c for _, c in overlays] == [f"image {i}, person {k}, step {s}/5" for i in (1, 2) for s in (1, 5)
                                        for k in (1, 2)]
    lit = [(o.astype(int) - o.mean(-1, keepdims=True)).std() > 0 for o, _ in overlays]  # tinted somewhere
    assert lit == [False] * 6 + [True, False]


def test_activation_maps_split_the_gate_by_identity():
    """Two layers (8x8 and 4x4 grids of an 8x8 latent): identity 0 owns the left half, 1 the
    right; the maps must put w there and sum to w."""
    import jax.numpy as jnp

    from dynamicid_jax.dynamicid.activation_maps import identity_activation_maps

    def layer(h, w, weight):
        cols = np.tile(np.arange(w), h) < w // 2  # row-major queries, left half
        probs = np.zeros((1, 2, h * w, 2 * 3), np.float32)
        probs[0, :, cols, :3] = 1 / 3
        probs[0, :, ~cols, 3:] = 1 / 3
        return {"activation_weight": (jnp.full((1, h * w), weight),), "identity_probs": (jnp.asarray(probs),)}

    tree = {"down": {"attn2": layer(8, 8, 1.0)}, "mid": {"attn2": layer(4, 4, 0.5)}}
    maps = np.asarray(identity_activation_maps(tree, (8, 8), tokens_per_id=3))
    assert maps.shape == (1, 2, 8, 8)
    np.testing.assert_allclose(maps[0, 0, :, :4], 0.75)  # (1.0 + 0.5) / 2 layers
    np.testing.assert_allclose(maps[0, 0, :, 4:], 0.0)
    np.testing.assert_allclose(maps[0].sum(0), 0.75)


def test_sidecar_requests_take_settings_but_only_uploaded_references(tmp_path):
    root = tmp_path / "up"
    root.mkdir()
    (root / "x.jpg").write_bytes(b"x")
    sidecar = {"identities": [{"refs": ["/etc/passwd.jpg"], "box": None, "face_prompt": "f"}], "prompt": "p",
               "seed": 9}
    request = forms.sidecar_request(sidecar, [[str(root / "x.jpg")]], root)
    assert request.identities[0].refs == [str((root / "x.jpg").resolve())] and request.seed == 9
    assert request.identities[0].face_prompt == "f"
    with pytest.raises(InputError, match="passwd.jpg.*not opened"):
        forms.sidecar_request(sidecar, [[]], root)
    with pytest.raises(InputError, match="textual-inversion files: they are never opened"):
        forms.sidecar_request(dict(sidecar, negative_embeddings=["/etc/badhands.pt"]), [[str(root / "x.jpg")]], root)
    with pytest.raises(InputError, match="unknown setting 'negative_embeddings'"):
        forms.request_settings({"negative_embeddings": ["/etc/badhands.pt"]})


def test_a_brush_drawing_becomes_a_mask_of_its_painted_pixels():
    layer = np.zeros((4, 6, 4), np.uint8)
    layer[1:3, 2:5] = (34, 34, 34, 255)  # the page's dark brush: painted = opaque, whatever the colour
    layer[0, 0, 3] = 1  # a faint stroke edge still counts
    mask = forms.drawn_mask({"background": np.full((4, 6, 4), 245, np.uint8), "layers": [layer], "composite": None})
    expected = np.zeros((4, 6), np.uint8)
    expected[1:3, 2:5] = expected[0, 0] = 255
    assert mask.shape == (4, 6, 3) and (mask[..., 0] == expected).all() and (mask == mask[..., :1]).all()
    with pytest.raises(InputError, match="nothing drawn"):
        forms.drawn_mask({"background": None, "layers": [np.zeros((4, 6, 4), np.uint8)], "composite": None})


class _StubService:
    """What `ui.build_demo` reads of an AppService, with no model: the base model's family,
    page settings, catalogs; `run` keeps the request the page built instead of drawing it."""

    def __init__(self, family: str, upload_root: pathlib.Path):
        from types import SimpleNamespace

        from dynamicid_jax import base_models
        from dynamicid_jax.app.catalog import embedding_catalog, lora_catalog
        from dynamicid_jax.request_parsing import setting_defaults

        self.pipeline = SimpleNamespace(modules=SimpleNamespace(family=base_models.get(family), identity_branch=False,
                                                                vae_scale_factor=8))
        self.settings = setting_defaults(base_models.default_config(tiny=True, family=family).sampling)
        self.upload_root, self.loras, self.embeddings = upload_root, lora_catalog(), embedding_catalog()
        self.progress, self.requests = (0, 0), []

    def run(self, request, random_seed, with_maps, loras):
        from dynamicid_jax.app.service import RunResult

        self.requests.append(request)
        return RunResult([], [], [], request, 0.0)

    def cancel(self):
        pass

    def describe(self, path):
        raise AssertionError("no person on these pages")


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_the_page_shows_the_familys_time_ids_and_parses_them_as_the_flags(family, tmp_path):
    """SDXL's micro-conditioning fields are on the page only when the loaded base model's family
    takes them (`family.request_fields`); /generate hands them, as typed, to the one request
    parser (the four-forms table checks its parse); a sidecar's restore fills them. No model, no
    server: the page is built and its handlers called (~2 s)."""
    from dynamicid_jax.app import ui
    from dynamicid_jax.request import TIME_ID_FIELDS

    service = _StubService(family, tmp_path)
    demo = ui.build_demo(service)
    fields = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None) in TIME_ID_FIELDS}
    assert sorted(fields) == sorted(TIME_ID_FIELDS)
    assert all(b.visible == (family == "sdxl") for b in fields.values())  # SD1.5's page hides them
    handlers = {f.api_name: f.fn for f in demo.fns.values()}
    typed = dict(prompt="a cafe", original_size="96, 128", crops_coords_top_left="0,8")
    handlers["generate"](**typed)
    request = service.requests[-1]
    assert (request.original_size, request.crops_coords_top_left, request.target_size) == ([96, 128], [0, 8], None)
    if family == "sd15":  # sent through the API anyway: AppService.run's first check names them
        with pytest.raises(InputError, match="original_size, crops_coords_top_left: an SD1.5 base model has no"):
            forms.validate_settings(request, service.pipeline)
        return
    forms.validate_settings(request, service.pipeline)
    with pytest.raises(Exception, match="original_size '96x128': expected 2 comma-separated integers"):
        handlers["generate"](original_size="96x128")
    sidecar = tmp_path / "s.json"
    sidecar.write_text('{"request": {"identities": [], "prompt": "p", "target_size": [64, 32]}}')
    restored = handlers["restore"](str(sidecar))
    assert restored[-1 - len(TIME_ID_FIELDS):-1] == ["", "", "64,32"]
    # no negative prompt in the sidecar: the page's (the family's, SDXL none), not SD1.5's
    assert restored[4 * 4 + 1] == service.settings["negative_prompt"] == ""


def test_run_folders_skip_those_an_earlier_app_left(tmp_path):
    """An app restarted on the same --out numbers its runs past the old ones: reusing
    run-00000-0 made the first click fail as 'generated with other settings' (seen with a
    DynamicID-SDXL workdir, then its export, served on one --out). No model (~0 s)."""
    from types import SimpleNamespace

    from dynamicid_jax.app.catalog import embedding_catalog, lora_catalog
    from dynamicid_jax.app.service import AppService

    out = tmp_path / "out"
    (out / "run-00000-0").mkdir(parents=True)
    (out / "run-00000-0" / "dynamicid-0-0.png").write_bytes(b"earlier app")
    service = AppService(SimpleNamespace(params={}, conditioning=None), {}, out, tmp_path / "uploads",
                         loras=lora_catalog(), embeddings=embedding_catalog())
    first, second = service.run_folder(0), service.run_folder(0)
    assert (first.name, second.name) == ("run-00001-0", "run-00002-0")
    assert not any(first.iterdir()) and (out / "run-00000-0" / "dynamicid-0-0.png").read_bytes() == b"earlier app"
