"""One request, four written forms: CLI flags, a requests-file line, a sidecar, the app's form.

The table test builds each case through all four (`dynamicid_jax.request_parsing` behind
each) and asserts equal SampleRequests: no model, under a second. The bytes test runs one
request through `launch/sample.py` (flags), `--from_json`, `--requests` and the app's
/generate API on the shared demo pipeline (tests/demo_pipeline.py) and asserts equal PNGs.
Its cost: the demo pipeline (~25-45 s when no other module of the process loaded it), the
per-step-progress sampling program at 64x64 with two people and boxes (~30-45 s, shared with
test_sampling/test_app in one process), the requests path's batch-8 program over the 8 test
devices (shared with test_generation through the persistent cache) and a gradio server (~3 s).
Last, what every form is checked by (`validate_request`) and the one set of sampling
defaults the forms start from: no model, milliseconds.
"""

import json
import math
import pathlib
import shutil
import sys

import numpy as np
import pytest

from dynamicid_jax.app import forms
from dynamicid_jax.request import (DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, IdentityRequest, InputError, SampleRequest,
                                   sampling_defaults, validate_request)

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Each case: identities (refs as photo names, box, face prompt, target-landmark photo name)
# and settings as (JSON value, as typed in a flag or a form's text box); None: left out.
CASES = {
    "defaults": ([dict(refs=["obama.jpg"])], {}),
    "every field": (
        [dict(refs=["obama.jpg", "obama2.jpg"], box=[0.0, 0.0, 1.0, 0.5]),
         dict(refs=["hao.jpg"], box=[0.0, 0.5, 1.0, 1.0], face_prompt="a very surprised expression, front view",
              target_landmarks="biden.jpg")],
        dict(prompt=("two people at a cafe", "two people at a cafe"), negative_prompt=("blurry", "blurry"),
             seed=(7, "7"), steps=(20, "20"), guidance=(3.5, "3.5"), height=(64, "64"), width=(128, "128"),
             num_images=(2, "2"), alpha=(0.1, "1e-1"), beta=(2.0, "2"), id_scale=(0.7, "0.7"),
             gating=(False, False), scheduler=("dpmpp_2m", "dpmpp_2m"), clip_skip=(1, "1"),
             negative_embeddings=(["badhands.safetensors"], None),
             original_size=([96, 128], "96,128"), crops_coords_top_left=([0, 8], "0, 8"),
             target_size=([64, 128], " 64,128")),
    ),
    # A blank face prompt is no edit in every form (a requests-file "" used to ask IMR for an
    # edit to the empty prompt while --face_prompt "" meant none).
    "blank face prompt": (
        [dict(refs=["obama.jpg"], face_prompt=""), dict(refs=["biden.jpg"], face_prompt="smiling")], {}),
    "layout steps and mixing": (
        [dict(refs=["obama.jpg"]), dict(refs=["biden.jpg"])],
        dict(alpha=(12, "12"), mix=(0.5, "0.5"), guidance=(5.5, "5.5")),
    ),
}
PHOTOS = {"obama.jpg": "obama.jpg", "obama2.jpg": "obama2.jpg", "hao.jpg": "0-f15-hao-ph.jpg",
          "biden.jpg": "biden.jpg"}


@pytest.fixture(scope="module")
def folder(test_assets, tmp_path_factory):
    """The photos and a negative embedding (A1111 layout, 32-d as the demo's text encoder), in
    one folder that is also the app's upload folder (its form takes uploads only)."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("uploads").resolve()
    for name, source in PHOTOS.items():
        shutil.copy(test_assets / source, root / name)
    (root / "embeddings").mkdir()
    save_file({"emb_params": np.ones((2, 32), np.float32)}, str(root / "embeddings" / "badhands.safetensors"))
    return root


def _path(root, name):
    return str(root / "embeddings" / name) if name.endswith(".safetensors") else str(root / name)


def _json_request(root, identities, settings) -> dict:
    data = {k: (v[0] if k != "negative_embeddings" else [_path(root, n) for n in v[0]]) for k, v in settings.items()}
    data["identities"] = [dict(ident, refs=[_path(root, r) for r in ident["refs"]],
                               **({"target_landmarks": _path(root, ident["target_landmarks"])}
                                  if "target_landmarks" in ident else {})) for ident in identities]
    return data


def _from_flags(root, identities, settings):
    from launch import sample

    argv = []
    for ident in identities:
        argv += ["--ref", ",".join(_path(root, r) for r in ident["refs"])]
    if any("box" in i for i in identities):
        argv += [a for i in identities for a in ("--box", ",".join(f"{v:g}" for v in i["box"]))]
    for flag in ("face_prompt", "target_landmarks"):
        if any(flag in i for i in identities):
            argv += [a for i in identities for a in (f"--{flag}", _path(root, i[flag]) if flag == "target_landmarks"
                                                     and flag in i else i.get(flag, ""))]
    for name, (value, text) in settings.items():
        if name == "gating":
            argv += [] if value else ["--no_gating"]
        elif name == "negative_embeddings":
            argv += [a for n in value for a in ("--negative_embedding", _path(root, n))]
        else:
            argv += [f"--{name}", text]
    return sample.build_request(sample.parse_args(argv), sampling_defaults())


def _from_file(root, identities, settings):
    from dynamicid_jax.generation.requests import read_requests

    file = root / "jobs.jsonl"
    # paths relative to the file, as a requests file writes them
    data = _json_request(pathlib.Path("."), identities, settings)
    file.write_text(json.dumps(data) + "\n")
    (line, request), = read_requests(file, sampling_defaults())[0]
    return request


def _from_sidecar(root, identities, settings):
    from dynamicid_jax.request_parsing import read_sidecar

    file = root / "sidecar.json"
    file.write_text(json.dumps({"request": _json_request(root, identities, settings), "image_index": 0}))
    return read_sidecar(str(file))


def _from_form(root, identities, settings):
    from dynamicid_jax.app.catalog import embedding_catalog
    from dynamicid_jax.request_parsing import setting_defaults

    people = [forms.PersonForm(refs=[_path(root, r) for r in i["refs"]],
                               box=",".join(f"{v:g}" for v in i["box"]) if "box" in i else "",
                               face_text=i.get("face_prompt", ""),
                               target_landmarks=_path(root, i["target_landmarks"]) if "target_landmarks" in i else None)
              for i in identities]
    values = {k: text for k, (value, text) in settings.items() if k != "negative_embeddings"}
    values["gating"] = settings.get("gating", (None, None))[1]
    names = settings.get("negative_embeddings", ([], None))[0]
    embeddings = embedding_catalog([root / "embeddings"]).paths(names)  # the page offers names only
    page = {k: v for k, v in setting_defaults(sampling_defaults()).items() if k != "negative_embeddings"}

    def describe(path):
        raise AssertionError("no expression choice in these cases")

    return forms.build_request(people, values, root, describe, page, embeddings)


FORMS = {"flags": _from_flags, "requests file": _from_file, "sidecar": _from_sidecar, "app form": _from_form}


@pytest.mark.parametrize("case", list(CASES))
def test_every_form_gives_the_same_request(folder, case):
    identities, settings = CASES[case]
    built = {name: make(folder, identities, settings) for name, make in FORMS.items()}
    for name, request in built.items():
        assert request == built["flags"], name
    request = built["flags"]
    for field, (value, _) in settings.items():  # what each case wrote, typed (not the code's own output)
        if field not in ("negative_embeddings", "negative_prompt"):
            assert getattr(request, field) == value and type(getattr(request, field)) is type(value), field
    if case == "defaults":
        assert request.prompt == DEFAULT_PROMPT == "a photo of a person"  # the app said "a photo of people"
        assert (request.steps, request.alpha, request.scheduler, request.seed) == (50, 3, "ddim", 0)
    if case == "blank face prompt":
        assert [i.face_prompt for i in request.identities] == [None, "smiling"]
        assert [i.edits for i in request.identities] == [False, True]
    if case == "every field":
        assert request.negative_prompt == "blurry, badhands"
        assert request.identities[0].refs == [str(folder / "obama.jpg"), str(folder / "obama2.jpg")]


@pytest.mark.parametrize("form, value, needle", [
    ("flags", ["--alpha", "1,5"], "--alpha '1,5'"),
    ("flags", ["--steps", "3.5"], "--steps '3.5': expected an integer"),
    ("app form", {"alpha": "one"}, "alpha 'one'"),
    ("app form", {"steps": 3.5}, "steps must be an integer"),
])
def test_text_forms_name_the_bad_value(folder, form, value, needle):
    from dynamicid_jax.request import InputError, validate_request

    with pytest.raises(InputError, match=needle):
        if form == "flags":
            from launch import sample

            args = sample.parse_args(["--ref", str(folder / "obama.jpg"), *value])
            validate_request(sample.build_request(args, sampling_defaults()), 8)
        else:
            request = forms.build_request([forms.PersonForm(refs=[str(folder / "obama.jpg")])], value, folder,
                                          None, sampling_defaults())
            validate_request(request, 8, label=forms.form_label)


# ----------------------------------------------------------------------------- the same bytes


@pytest.fixture(scope="module")
def shared_demo(test_assets):
    from demo_pipeline import demo_pipeline  # shared with test_sampling.py, test_app.py, test_generation.py

    return demo_pipeline(str(test_assets / "fer_emotion_model.hdf5"))


def test_cli_from_json_requests_file_and_app_api_give_the_same_png(shared_demo, folder, tmp_path, monkeypatch):
    """Two people with boxes, Euler a, alpha written 1e-1 (the app refused that before), 64 px:
    one PNG, four ways."""
    import ssl

    from gradio.utils import get_upload_folder
    from gradio_client import Client, handle_file

    from dynamicid_jax import loading
    from dynamicid_jax.app.service import AppService
    from dynamicid_jax.app.ui import build_demo, launch as launch_app
    from dynamicid_jax.distributed import free_local_port
    from launch import sample

    config, pipeline = shared_demo
    # The CLI loads the shared pipeline: a second demo pipeline would compile everything again.
    monkeypatch.setattr(loading, "load_pipeline", lambda **kwargs: shared_demo)
    flags = ["--prompt", "two people at a cafe", "--seed", "3", "--steps", "3", "--alpha", "1e-1",
             "--scheduler", "euler_a", "--box", "0,0,1,0.5", "--box", "0,0.5,1,1"]
    refs = ["--ref", str(folder / "obama.jpg"), "--ref", str(folder / "hao.jpg")]
    assert sample.main(["--demo", "--out", str(tmp_path / "cli"), "--no_progress", *refs, *flags]) == 0
    png = (tmp_path / "cli" / "dynamicid-3-0.png").read_bytes()
    sidecar = tmp_path / "cli" / "dynamicid-3-0.json"
    # The engine of --requests: a rerun keeps the finished picture, other settings are refused.
    stamp = (tmp_path / "cli" / "dynamicid-3-0.png").stat().st_mtime_ns
    assert sample.main(["--demo", "--out", str(tmp_path / "cli"), "--no_progress", *refs, *flags]) == 0
    assert (tmp_path / "cli" / "dynamicid-3-0.png").stat().st_mtime_ns == stamp
    assert sample.main(["--demo", "--out", str(tmp_path / "cli"), "--no_progress", *refs, *flags,
                        "--guidance", "2"]) == 2
    assert sample.main(["--demo", "--out", str(tmp_path / "json"), "--from_json", str(sidecar), "--no_progress"]) == 0
    assert (tmp_path / "json" / "dynamicid-3-0.png").read_bytes() == png
    line = {"identities": [{"refs": ["obama.jpg"], "box": [0, 0, 1, 0.5]}, {"refs": ["hao.jpg"], "box": [0, 0.5, 1, 1]}],
            "prompt": "two people at a cafe", "seed": 3, "steps": 3, "alpha": 0.1, "scheduler": "euler_a"}
    (folder / "one.jsonl").write_text(json.dumps(line) + "\n")
    assert sample.main(["--demo", "--requests", str(folder / "one.jsonl"), "--out", str(tmp_path / "file"),
                        "--no_progress"]) == 0
    assert (tmp_path / "file" / "line00001-3-0.png").read_bytes() == png
    service = AppService(pipeline, config.sampling, tmp_path / "app", get_upload_folder(), log=lambda m: None)
    demo = build_demo(service)
    port = free_local_port()
    launch_app(demo, service, port=port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, ssl_verify=ssl.create_default_context())
        files, _, _ = client.predict(refs_1=[handle_file(str(folder / "obama.jpg"))], box_1="0,0,1,0.5",
                                     refs_2=[handle_file(str(folder / "hao.jpg"))], box_2="0,0.5,1,1",
                                     prompt="two people at a cafe", seed=3, steps=3, alpha="1e-1", scheduler="euler_a",
                                     api_name="/generate")
    finally:
        demo.close()
    assert pathlib.Path(next(f for f in files if f.endswith(".png"))).read_bytes() == png


# --------------------------------------------------------------------------- the rules every form is checked by


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(guidance=math.nan), "--guidance"),
        (dict(guidance=math.inf), "--guidance"),
        (dict(id_scale=-math.inf), "--id_scale"),
        (dict(mix=math.nan), "--mix"),
        (dict(beta=-1.0), "--beta must be > -1"),
        (dict(beta=math.nan), "--beta"),
        (dict(alpha="abc"), "--alpha must be a step count"),
        (dict(alpha=-2), "--alpha as a step count"),
        (dict(alpha=0.0), "--alpha as a fraction"),
        (dict(alpha=math.nan), "--alpha as a fraction"),
        (dict(steps=2.5), "--steps must be an integer"),
        (dict(seed="7"), "--seed must be an integer"),
        (dict(height=4096), "2048 px limit"),
        (dict(num_images=40, height=1024, width=1024), "exceeds the"),
        (dict(prompt=None), "--prompt must be text"),
        (dict(original_size=[512]), "--original_size must be 2 integers"),
        (dict(crops_coords_top_left=[-1, 0]), "--crops_coords_top_left must be 2 integers y,x in .0,"),
        (dict(target_size=[512.0, 512]), "--target_size must be 2 integers"),
    ],
)
def test_validate_request_refuses_non_finite_and_out_of_range(change, needle):
    request = SampleRequest(identities=[IdentityRequest(refs=["a.jpg"])], prompt="p", height=64, width=64)
    validate_request(request, 8)  # the unchanged request is fine
    for key, value in change.items():
        setattr(request, key, value)
    with pytest.raises(InputError, match=needle):
        validate_request(request, 8)


def test_one_set_of_sampling_defaults():
    """The library's SampleRequest and the CLI's config (configs/base.py) agree field by field;
    the demo config (configs/tiny.py) overrides only its small-model sizes."""
    from configs import base, tiny

    library = sampling_defaults()
    # The library's size is None (the pipeline fills in the base model's native size); each
    # config states its model's (SD1.5 512, tiny 64).
    assert library["height"] is None and library["width"] is None
    sized = dict(base.get_config().sampling)
    assert (sized.pop("height"), sized.pop("width")) == (512, 512)
    # The negative prompt's default is the family's: none on SDXL (its zeros rule), DynamicID's
    # on SD1.5; the library's is None, filled in by the pipeline (test_base_models' completion).
    assert library["negative_prompt"] is None and SampleRequest([], "p").negative_prompt is None
    assert sized.pop("negative_prompt") == DEFAULT_NEGATIVE_PROMPT != ""
    assert sized == {k: v for k, v in library.items() if k not in ("height", "width", "negative_prompt")}
    from dynamicid_jax import base_models

    assert base_models.default_config(family="sdxl").sampling.negative_prompt == ""
    assert base_models.default_config(family="sd15").sampling.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    demo = dict(tiny.get_config().sampling)
    assert {k for k in demo if demo[k] != library[k]} == {"steps", "height", "width", "alpha", "negative_prompt"}
