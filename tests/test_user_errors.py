"""Every entry point on bad input: exit 2, one stderr line naming the input, no traceback,
nothing written. All of these fail before any model is built or compiled (that is part of
the contract: a typo must not cost a model load), so the whole module runs in seconds.

Each CLI is called in-process over its table of bad inputs; one subprocess per CLI proves
the same end to end (status, no traceback) through `python <script>`.
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dynamicid_jax import cli
from dynamicid_jax.errors import UserError
from dynamicid_jax.request import InputError

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _assert_user_error(code, err: str, needle: str):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], (needle, err)
    assert "Traceback" not in err


def _assert_main_refuses(main, argv, capsys, needle: str, files, output) -> None:
    """main(argv) (argparse-level errors raise SystemExit) exits 2 with one line naming
    `needle` ({tmp} = the files folder) and writes nothing at `output`."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    _assert_user_error(code, capsys.readouterr().err, needle.replace("{tmp}", str(files)))
    assert not output.exists()  # nothing written


@pytest.fixture
def files(tmp_path, test_assets):
    """Named bad inputs: a text file posing as JSON/image, an existing plain file, folders."""
    (tmp_path / "notes.txt").write_text("this is not JSON, nor an image\n")
    (tmp_path / "wrong.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "taken").write_text("an existing file where a folder is wanted")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "fake.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    testset = (ROOT / "configs" / "eval" / "tiny.json").read_text().replace("../../test_assets/", f"{test_assets}/")
    (tmp_path / "testset.json").write_text(testset)  # the tiny test set over this machine's photos
    # Test sets wrong in one place each (the rest is the tiny one).
    for name, change in TESTSET_CHANGES.items():
        data = json.loads(testset)
        change(data)
        (tmp_path / f"ts_{name}.json").write_text(json.dumps(data))
    (tmp_path / "binary.json").write_bytes(b"\x00\xff\xfe\x00" * 8)
    # Not safetensors, though named so: its first 8 bytes read as a header length of ~7e18.
    (tmp_path / "fake.safetensors").write_text("this text file only pretends to be a safetensors file\n")
    # Textual inversion of the other family: an SDXL pair (clip_l + clip_g) and a single-encoder
    # file (SD1.5's), each 32-d as the tiny text encoders.
    from safetensors.numpy import save_file

    save_file({"clip_l": np.ones((1, 32), np.float32), "clip_g": np.ones((1, 32), np.float32)},
              str(tmp_path / "sdxl_pair.safetensors"))
    save_file({"emb_params": np.ones((1, 32), np.float32)}, str(tmp_path / "sd15_single.safetensors"))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "broken.py").write_text("def get_config(:\n")
    (tmp_path / "configs" / "none.py").write_text("x = 1\n")
    return tmp_path


TESTSET_CHANGES = {
    "identities_list": lambda d: d.update(identities=["obama"]),
    "prompts_text": lambda d: d.update(prompts=["a photo"]),
    "groups_numbers": lambda d: d.update(groups=[[1, 2]]),
    "seeds_bool": lambda d: d.update(seeds=[True]),
    "seeds_negative": lambda d: d.update(seeds=[-1]),
    "steps_text": lambda d: d.update(sampling={"steps": "abc"}),
    "guidance_nan": lambda d: d.update(sampling={"guidance": math.nan}),  # json writes NaN
    "height_odd": lambda d: d.update(sampling={"height": 60}),
    "ref_not_image": lambda d: d["identities"]["obama"].update(refs=["notes.txt"]),
}


def _subst(argv, files, test_assets):
    return [a.replace("{tmp}", str(files)).replace("{assets}", str(test_assets)) for a in argv]


# --------------------------------------------------------------------------- launch/sample.py

SAMPLE_CASES = [
    # (argv after --demo --ref obama.jpg, text the one line must contain)
    (["--alpha", "abc"], "--alpha 'abc'"),
    (["--alpha", "1.5"], "--alpha as a fraction"),
    (["--guidance", "nan"], "--guidance"),
    (["--beta", "-1"], "--beta must be > -1"),
    (["--id_scale", "inf"], "--id_scale"),
    (["--mix", "nan"], "--mix"),
    (["--steps", "abc"], "--steps"),
    (["--height", "60"], "--height"),
    (["--width", "8192"], "--width 8192"),
    (["--box", "0,0,1"], "--box '0,0,1'"),
    (["--box", "a,b,c,d"], "--box 'a,b,c,d'"),
    (["--original_size", "512"], "--original_size '512': expected 2 comma-separated integers"),
    # SD1.5 (the demo's family) has no time ids: the family refuses them, before any model loads
    (["--crops_coords_top_left", "0,0"], "--crops_coords_top_left: an SD1.5 base model has no micro-conditioning"),
    (["--vae", "{tmp}/empty_dir"], "--demo uses random weights: drop --vae"),
    (["--from_json", "{tmp}/notes.txt"], "notes.txt: not a JSON file"),
    (["--from_json", "{tmp}/wrong.json"], "wrong.json: not a sampling request"),
    (["--from_json", "{tmp}/list.json"], "list.json: not a sampling request"),
    (["--from_json", "{tmp}/missing.json"], "missing.json: file not found"),
    (["--from_json", "{tmp}/empty_dir"], "empty_dir: is a folder"),
    (["--out", "{tmp}/taken"], "--out {tmp}/taken: exists and is not a folder"),
    (["--out", "{tmp}/taken/sub"], "is a file, so the folder cannot be made"),
    (["--ref", "{tmp}/fake.jpg"], "fake.jpg"),
    (["--ref", "{tmp}/notes.txt"], "notes.txt: not an image file"),
    (["--ref", "{tmp}/empty_dir"], "empty_dir: it is a folder"),
    (["--ref", "{tmp}/nope.png"], "image not found: {tmp}/nope.png"),
    (["--target_landmarks", "{tmp}/notes.txt"], "notes.txt"),
    (["--lora", "{tmp}/fake.safetensors:abc"], "--lora {tmp}/fake.safetensors:abc: scale 'abc' is not a finite number"),
    (["--lora", "{tmp}/fake.safetensors:nan"], "scale 'nan' is not a finite number"),
    (["--bogus_flag"], "unrecognized arguments: --bogus_flag"),
    # the family's embedding widths (`embedding_widths`), before any model loads
    (["--negative_embedding", "{tmp}/sdxl_pair.safetensors"],
     "{tmp}/sdxl_pair.safetensors: an SDXL embedding (clip_l + clip_g), but the base model has one text encoder"),
    (["--demo", "sdxl", "--negative_embedding", "{tmp}/sd15_single.safetensors"],
     "{tmp}/sd15_single.safetensors: a single-encoder embedding (32-d vectors), but the base model has 2 text encoders"),
]


@pytest.mark.parametrize("extra, needle", SAMPLE_CASES, ids=[" ".join(c[0]) for c in SAMPLE_CASES])
def test_sample_cli_bad_inputs(files, test_assets, capsys, extra, needle):
    from launch import sample

    out = files / "out"
    argv = ["--demo", "--ref", f"{test_assets}/obama.jpg", "--out", str(out), *_subst(extra, files, test_assets)]
    _assert_main_refuses(sample.main, argv, capsys, needle, files, out)


# --------------------------------------------------------------------------- launch/evaluate.py

EVALUATE_CASES = [
    (["--testset", "{tmp}/missing.json"], "test set not found"),
    (["--testset", "{tmp}/notes.txt"], "notes.txt"),
    (["--testset", "{tmp}/wrong.json"], "wrong.json"),
    (["--testset", "{tmp}/testset.json", "--seeds", "1,x"], "--seeds '1,x'"),
    (["--testset", "{tmp}/testset.json", "--out", "{tmp}/taken"], "--out {tmp}/taken: exists and is not a folder"),
    (["--testset", "{tmp}/testset.json", "--mode", "triple"], "argument --mode"),
    (["--testset", "{tmp}/binary.json"], "binary.json: not a UTF-8 test set"),
    (["--testset", "{tmp}/ts_identities_list.json"], "ts_identities_list.json: 'identities' must be a mapping"),
    (["--testset", "{tmp}/ts_prompts_text.json"], "'prompts' must be a list of mappings, got ['a photo']"),
    (["--testset", "{tmp}/ts_groups_numbers.json"], "'groups[0]' must be a list of texts"),
    (["--testset", "{tmp}/ts_seeds_bool.json"], "'seeds' must be distinct integers in [0, 2**63), got [True]"),
    (["--testset", "{tmp}/ts_seeds_negative.json"], "'seeds' must be distinct integers in [0, 2**63), got [-1]"),
    (["--testset", "{tmp}/ts_steps_text.json"], "sampling.steps 'abc' must be an integer"),
    (["--testset", "{tmp}/ts_guidance_nan.json"], "ts_guidance_nan.json: sampling: --guidance must be a finite number"),
    (["--testset", "{tmp}/ts_height_odd.json"], "ts_height_odd.json: sampling: --height must be a positive multiple"),
    (["--testset", "{tmp}/ts_ref_not_image.json"], "identity 'obama': cannot read image {tmp}/notes.txt: not an image"),
    (["--testset", "{tmp}/testset.json", "--lora", "x.safetensors:1,5"], "--lora x.safetensors:1,5: scale '1,5'"),
]


@pytest.mark.parametrize("extra, needle", EVALUATE_CASES, ids=[" ".join(c[0]) for c in EVALUATE_CASES])
def test_evaluate_cli_bad_inputs(files, test_assets, capsys, monkeypatch, extra, needle):
    from launch import evaluate

    monkeypatch.chdir(ROOT)
    out = files / "eval_out"
    argv = ["--demo", "--out", str(out), *_subst(extra, files, test_assets)]
    _assert_main_refuses(evaluate.main, argv, capsys, needle, files, out)


def test_evaluate_refuses_a_base_model_without_dynamicid_weights(files, capsys):
    """The test set's cases are people from photos, scored on how well they are kept: a base
    model alone (no --dynamicid) is one line before anything loads. Cost: well under a second."""
    from launch import evaluate

    out = files / "eval_out"
    argv = ["--testset", str(files / "testset.json"), "--base_model", str(files / "empty_dir"), "--out", str(out)]
    _assert_main_refuses(evaluate.main, argv, capsys, "give --dynamicid (a base model alone makes plain", files, out)


# --------------------------------------------------------------------------- launch/convert.py

CONVERT_CASES = [
    ([], "nothing to convert"),
    (["--out", "{tmp}/taken", "--vision_encoder", "{tmp}/empty_dir"], "--out {tmp}/taken: exists and is not a folder"),
    (["--base_model", "{tmp}/no_such_model"], "no_such_model"),
    (["--vision_encoder", "{tmp}/empty_dir"], "empty_dir"),
    (["--dynamicid", "{tmp}/empty_dir"], "SAA.bin"),
    (["--base_model", "{tmp}/empty_dir", "--components", "unet,teapot"], "teapot"),
    (["--base_model", "{tmp}/fake.safetensors"], "fake.safetensors: not a .safetensors file (its 8-byte header length"),
]


@pytest.mark.parametrize("extra, needle", CONVERT_CASES, ids=[" ".join(c[0]) or "none" for c in CONVERT_CASES])
def test_convert_cli_bad_inputs(files, test_assets, capsys, extra, needle):
    from dynamicid_jax import convert

    out = files / "converted"
    extra = _subst(extra, files, test_assets)
    argv = (["--out", str(out)] if "--out" not in extra else []) + extra
    _assert_user_error(convert.main(argv), capsys.readouterr().err, needle.replace("{tmp}", str(files)))
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------- launch/app.py

APP_CASES = [
    (["--port", "x"], "argument --port"),
    (["--warmup_people", "1,two"], "--warmup_people '1,two'"),
    (["--demo", "--expression_model", "{tmp}/missing.hdf5"], "missing.hdf5"),
    (["--base_model", "{tmp}/no_such_model", "--vision_encoder", "{tmp}/empty_dir",
      "--dynamicid", "{tmp}/empty_dir"], "--dynamicid {tmp}/empty_dir: neither a release folder"),
    (["--bogus_flag"], "unrecognized arguments: --bogus_flag"),
    (["--demo", "--scheduler", "heun"], "--scheduler 'heun' is unknown"),
    (["--demo", "--clip_skip", "-1"], "--clip_skip must be >= 0"),
    (["--demo", "--lora_dir", "{tmp}/nope"], "--lora_dir {tmp}/nope: not a folder"),
    (["--demo", "--embedding_dir", "{tmp}/notes.txt"], "--embedding_dir {tmp}/notes.txt: not a folder"),
    (["--demo", "--lora", "{tmp}/missing.safetensors"], "--lora: file not found"),
    (["--demo", "--out", "{tmp}/taken"], "--out {tmp}/taken: exists and is not a folder"),
    (["--demo", "--keep_files_minutes", "0"], "--keep_files_minutes 0: must be a positive number"),
    (["--demo", "--keep_files_minutes", "nan"], "--keep_files_minutes nan: must be a positive number"),
    (["--demo", "--keep_files_minutes", "inf"], "--keep_files_minutes inf: must be a positive number"),
]


@pytest.mark.parametrize("extra, needle", APP_CASES, ids=[" ".join(c[0]) for c in APP_CASES])
def test_app_cli_bad_start_up_inputs(files, capsys, extra, needle):
    from launch import app

    out = files / "app_out"
    argv = ["--out", str(out), "--warmup_people=", *_subst(extra, files, None)]
    _assert_main_refuses(app.main, argv, capsys, needle, files, out)


# --------------------------------------------------------------------------- data_pipelines/photo_folders.py

PHOTO_FOLDERS_CASES = [
    (["--photos", "{tmp}/empty_dir"], "--photos {tmp}/empty_dir: missing"),
    (["--photos", "{tmp}/nope"], "--photos {tmp}/nope: missing (folder)"),
    (["--photos", "{tmp}/empty_dir", "--bogus_flag"], "unrecognized arguments: --bogus_flag"),
    (["--photos", "{assets}", "--out", "{tmp}/taken"], "--out {tmp}/taken: exists and is not a folder"),
    (["--photos", "{assets}", "--out", "{tmp}/taken/sub"], "is a file, so the folder cannot be made"),
    (["--photos", "{tmp}"], "--out {tmp}/inputs: inside --photos {tmp}"),
]


@pytest.mark.parametrize("extra, needle", PHOTO_FOLDERS_CASES, ids=[" ".join(c[0]) for c in PHOTO_FOLDERS_CASES])
def test_photo_folders_cli_bad_inputs(files, test_assets, capsys, extra, needle):
    from data_pipelines import photo_folders

    out = files / "inputs"
    argv = ["--out", str(out), *_subst(extra, files, test_assets)]
    _assert_main_refuses(photo_folders.main, argv, capsys, needle, files, out)


# --------------------------------------------------------------------------- data_pipelines/precompute.py

PRECOMPUTE_CASES = [
    (["--stage=anchor", "--input={tmp}/nope", "--output={tmp}/shards"], "--input {tmp}/nope: does not exist"),
    (["--stage=anchor", "--input={tmp}/notes.txt", "--output={tmp}/shards"], "notes.txt: is a file"),
    (["--stage=anchor", "--input={tmp}/empty_dir", "--output={tmp}/taken"], "--output {tmp}/taken: exists"),
    (["--stage=anchor", "--output={tmp}/shards"], "--stage and --input are required"),
    (["--stage=sideways", "--input={tmp}", "--output={tmp}/shards"], "argument --stage"),
    (["--verify", "{tmp}/empty_dir"], "manifest.json not found"),
    (["--verify", "{tmp}/nope"], "--verify {tmp}/nope: not a folder"),
    (["--finalize", "--output={tmp}/empty_dir"], "run_config.json"),
    (["--stage=anchor", "--input={tmp}", "--output={tmp}/shards"], "--output {tmp}/shards: inside --input {tmp}"),
    (["--stage=anchor", "--input={tmp}/empty_dir", "--output={tmp}/shards", "--num_shards=0"],
     "--num_shards 0: must be a positive integer"),
    (["--stage=anchor", "--input={tmp}/empty_dir", "--output={tmp}/shards", "--batch_size=0"],
     "--batch_size 0: must be a positive integer"),
    (["--stage=anchor", "--input={tmp}/empty_dir", "--output={tmp}/shards", "--resolution=60"],
     "--resolution 60: not a multiple of the VAE factor 8"),
    (["--stage=anchor", "--input={tmp}/empty_dir", "--output={tmp}/shards", "--process_index=2", "--process_count=2"],
     "--process_index 2: must be in [0, --process_count 2)"),
    (["--stage=anchor", "--input={tmp}/empty_dir", "--output={tmp}/shards", "--max_shards=0"],
     "--max_shards 0: must be a positive integer"),
]


def _precompute_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("precompute_cli", ROOT / "data_pipelines" / "precompute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("extra, needle", PRECOMPUTE_CASES, ids=[" ".join(c[0]) for c in PRECOMPUTE_CASES])
def test_precompute_cli_bad_inputs(files, test_assets, capsys, extra, needle):
    module = _precompute_module()
    _assert_main_refuses(lambda argv: cli.run_main(module.main, argv), _subst(extra, files, test_assets), capsys,
                         needle, files, files / "shards")


def test_precompute_folder_layout_errors_come_before_any_output(tmp_path, test_assets):
    """Folder cases of the inputs: each raises a UserError naming the file, and no output
    folder is made (the listing runs before anything is written)."""
    import _data_helpers as helpers
    from dynamicid_jax.data.precompute import PrecomputeJob, run_precompute

    cases = {}
    twice = tmp_path / "twice"
    twice.mkdir()
    (twice / "a.jpg").write_bytes((test_assets / "obama.jpg").read_bytes())
    (twice / "a.txt").write_text("x")
    (twice / "captions.jsonl").write_text(json.dumps({"file": "a.jpg", "caption": "y"}) + "\n")
    cases[twice] = ("anchor", "caption given both")
    bad_jsonl = tmp_path / "bad_jsonl"
    bad_jsonl.mkdir()
    (bad_jsonl / "a.jpg").write_bytes(b"x")
    (bad_jsonl / "captions.jsonl").write_text("{not json\n")
    cases[bad_jsonl] = ("anchor", "captions.jsonl:1")
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a.jpg").write_bytes(b"x")
    cases[loose] = ("reconfig", "belong to no identity folder")
    cases[tmp_path / "no_images"] = ("anchor", "no images")
    (tmp_path / "no_images").mkdir()
    for folder, (stage, needle) in cases.items():
        out = tmp_path / f"out_{folder.name}"
        with pytest.raises(UserError, match=needle):
            run_precompute(PrecomputeJob(stage, folder, out, resolution=16, progress=False),
                           helpers.stand_in_extractors())
        assert not out.exists(), folder


# --------------------------------------------------------------------------- end to end, one process per CLI

PROCESS_CASES = [
    (["launch/train.py", "--stage=anchor", "--config=configs/anchor.py:tiny", "--data=/nonexistent",
      "--workdir={tmp}/run", "--config.total_steps=abc"], "--config.total_steps"),
    (["launch/train.py", "--stage=anchor", "--config=configs/anchor.py:tiny", "--data=/nonexistent",
      "--workdir={tmp}/run", "--config.optimizer.lrr=1e-3"], "did you mean --config.optimizer.lr?"),
    (["launch/evaluate.py", "--testset={tmp}/notes.txt", "--out={tmp}/eval", "--demo"], "notes.txt"),
    (["data_pipelines/photo_folders.py", "--photos={assets}", "--out={tmp}/taken"], "exists and is not a folder"),
    (["launch/convert.py", "--out={tmp}/taken", "--dynamicid={tmp}/empty_dir"], "taken"),
    (["data_pipelines/precompute.py", "--verify", "{tmp}/empty_dir"], "manifest.json not found"),
]


@pytest.mark.parametrize("argv, needle", PROCESS_CASES, ids=[f"{c[0][0]} {c[0][-1]}" for c in PROCESS_CASES])
def test_cli_processes_exit_2_without_traceback(files, test_assets, argv, needle):
    result = subprocess.run([sys.executable, *_subst(argv, files, test_assets)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    _assert_user_error(result.returncode, result.stderr, needle)


# --------------------------------------------------------------------------- the shared helpers


def test_run_main_keeps_tracebacks_for_internal_errors(capsys):
    def bug():
        raise KeyError("internal")

    with pytest.raises(KeyError):
        cli.run_main(bug)
    assert cli.run_main(lambda: None) == 0 and cli.run_main(lambda: 3) == 3
    assert cli.run_main(lambda: (_ for _ in ()).throw(InputError("a\nb"))) == 2
    assert capsys.readouterr().err == "error: a | b\n"  # several lines joined into one


def test_quiet_logs_hides_library_info_and_repeats(caplog):
    import logging

    cli.quiet_logs(verbose=False)
    caplog.set_level(logging.DEBUG)  # capture everything that passes the loggers' own levels
    logging.getLogger("orbax").setLevel(logging.WARNING)  # (caplog lowered the root only)
    logging.getLogger("orbax").info("saving step 1")
    for _ in range(3):
        logging.getLogger("dynamicid_jax").warning("warning: same thing")
    messages = [r.getMessage() for r in caplog.records]
    assert "saving step 1" not in messages and messages.count("warning: same thing") == 1
    cli.quiet_logs(verbose=True)
    assert logging.getLogger("orbax").isEnabledFor(logging.INFO)
    cli.quiet_logs(verbose=False)
    assert not logging.getLogger("orbax").isEnabledFor(logging.INFO)
    np.testing.assert_equal(logging.getLogger("absl").getEffectiveLevel(), logging.WARNING)
