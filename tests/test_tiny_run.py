"""`make tiny-run` in one test: the same commands, in process, with the fewest steps.

photos -> photo_folders.py -> precompute.py --stage=anchor -> train.py --stage=anchor ->
precompute.py --stage=reconfig -> train.py --stage=reconfig -> sample.py -> evaluate.py, each
called through its CLI's main() with the flags the Makefile passes (plus step counts and
--no_progress), so every seam is the real one: the shards' resolution and the stage-2
tokenizer come from defaults that agree, not from extra flags. Each stage's output is checked
as what the next stage reads. On 8 fake CPU devices with XLA's fast-compile setting (both set
by conftest). The anchor step is configs/anchor.py:tiny's, as tests/test_train.py's.

The second half (from the identity shards on) is tests/tiny_story.py's, which the SDXL story
(`make tiny-run BASE=sdxl`) shares: tests/test_train_sdxl.py runs it from its own anchor run,
which saves that story a second SDXL precompute and anchor compile.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import tiny_story
from tiny_story import last_line as _last_line, train_cli as _train_cli


def test_tiny_run_chain(tmp_path, test_assets, capsys, monkeypatch):
    from configs import anchor as anchor_configs
    from data_pipelines import photo_folders
    from data_pipelines import precompute as precompute_cli
    from dynamicid_jax import modeling
    from dynamicid_jax.data import shards
    from dynamicid_jax.training import data, stages

    base = "sd15"  # `make tiny-run` (BASE=sdxl: tests/test_train_sdxl.py's story)
    suffix, family_flags = tiny_story.BASES[base]
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

    # ---------------------------------------------------------------- the rest, shared with the SDXL story
    tiny_story.stage2_to_report(base, inputs, runs / "anchor", tmp_path, test_assets, capsys, monkeypatch)


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
