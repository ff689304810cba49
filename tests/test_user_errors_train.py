"""launch/train.py on bad input (the rest of test_user_errors.py's contract): exit 2, one
stderr line naming the input, no traceback, no workdir. The config file and override names
are refused on the command line, the values before anything compiles. Cost: about 10 s (the
tiny shards are written once; no step compiles).
"""

from __future__ import annotations

import sys

import pytest
from cli_flags import reset_config_flags

from test_user_errors import ROOT, _assert_user_error, _subst, files  # noqa: F401  (files: the shared fixture)


# --------------------------------------------------------------------------- launch/train.py


@pytest.fixture(scope="module")
def train_cli():
    from launch import train

    return train


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    import train_data
    from configs import anchor as anchor_configs
    from dynamicid_jax import modeling
    from dynamicid_jax.training import data, stages

    config = anchor_configs.get_config("tiny")
    specs = data.expected_features(stages.get("anchor"), modeling.build_modules(config.model), config)
    return train_data.write_dataset(tmp_path_factory.mktemp("shards"), "anchor", specs, units=16,
                                    null_specs=train_data.null_specs_for(specs))


# (absl defines each --config.x override flag once per process: one case per override name.)
TRAIN_CASES = [
    (["--data={tmp}/empty_dir"], "manifest.json not found"),
    (["--workdir={tmp}/taken"], "--workdir {tmp}/taken: exists and is not a folder"),
    (["--stage=reconfig"], "--stage=reconfig but the config is for stage 'anchor'"),
    (["--config.mesh.data=3"], "mesh"),
    (["--config.nonfinite=maybe"], "config.nonfinite"),
    (["--config.data.resolution=60"], "--config.data.resolution=60: not a positive multiple of the VAE factor 8"),
    (["--config.model.face_projection.id_dim=64"], "id_embedding"),  # shards made for 128-d vectors
    (["--config.dtype=float8"], "config.dtype"),
    (["--config.total_steps=-1"], "--config.total_steps=-1: must be a positive integer"),
    (["--config.optimizer.lr=nan"], "--config.optimizer.lr=nan: must be a finite number >= 0"),
    (["--config.optimizer.weight_decay=-0.1"], "--config.optimizer.weight_decay=-0.1: must be a finite number >= 0"),
    (["--config.optimizer.b2=1.0"], "--config.optimizer.b2=1.0: must be in [0, 1)"),
    (["--config.loss.face_drop=1.5"], "--config.loss.face_drop=1.5: must be a probability in [0, 1]"),
    (["--config.loss.both_drop=0.95"], "face_drop + text_drop + both_drop = 1.05"),
    (["--config.data.global_batch_size=0"], "--config.data.global_batch_size=0: must be a positive integer"),
    (["--config.checkpoint.every_steps=0"], "--config.checkpoint.every_steps=0: must be a positive integer"),
    (["--workdir={data}/run"], "--workdir {data}/run: inside --data {data}"),
]


@pytest.mark.parametrize("extra, needle", TRAIN_CASES, ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_train_cli_bad_inputs(train_cli, tiny_shards, files, test_assets, capsys, monkeypatch, extra,  # noqa: F811
                              needle):
    flags = train_cli.FLAGS
    workdir = files / "run"
    argv = ["train.py", "--stage=anchor", "--config=configs/anchor.py:tiny", f"--data={tiny_shards}",
            f"--workdir={workdir}"]
    extra = [a.replace("{data}", str(tiny_shards)) for a in _subst(extra, files, test_assets)]
    names = {a.split("=")[0] for a in extra}
    argv = [a for a in argv if a.split("=")[0] not in names] + extra
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its --config.x overrides from sys.argv
    reset_config_flags(flags)  # another module's in-process run (test_tiny_run) may have defined them
    try:
        flags(argv)
        code = train_cli.main(["train.py"])
    finally:
        flags.unparse_flags()
    needle = needle.replace("{tmp}", str(files)).replace("{data}", str(tiny_shards))
    _assert_user_error(code, capsys.readouterr().err, needle)
    assert not workdir.exists() and not (tiny_shards / "run").exists()


# The config file and override names, checked on the command line before absl parses it
# (config_checks.check_config_argv): no flag state changes, so any names may repeat.
TRAIN_ARGV_CASES = [
    (["--config=configs/nope.py"], "--config=configs/nope.py: configs/nope.py: file not found"),
    (["--config=configs"], "--config=configs: configs: is a folder"),
    (["--config=configs/anchor.py:huge"], "--config=configs/anchor.py:huge: config argument must be empty or one of "
                                          "'tiny', 'sdxl', 'tiny_sdxl', got 'huge'"),
    (["--config={tmp}/configs/broken.py"], "broken.py line 1"),
    (["--config={tmp}/configs/none.py"], "none.py defines no get_config()"),
    (["--config.optimizer.lrr=1e-3"],
     "--config.optimizer.lrr: no such config field; did you mean --config.optimizer.lr?"),
    (["--config.modle.unet.sample_size=4"], "--config.modle: no such config field; did you mean --config.model?"),
    (["--config.total_steps.every=3"], "--config.total_steps is a value (20), it has no field 'every'"),
    (["--noconfig.progress_barr"], "--config.progress_barr: no such config field; did you mean --config.progress_bar?"),
]


@pytest.mark.parametrize("extra, needle", TRAIN_ARGV_CASES, ids=[" ".join(c[0]) for c in TRAIN_ARGV_CASES])
def test_train_cli_bad_config_arguments(train_cli, files, capsys, monkeypatch, extra, needle):  # noqa: F811
    workdir = files / "run"
    extra = _subst(extra, files, None)
    names = {a.split("=")[0] for a in extra}
    argv = [a for a in ["train.py", "--stage=anchor", "--config=configs/anchor.py:tiny", f"--data={files}/empty_dir",
                        f"--workdir={workdir}"] if a.split("=")[0] not in names] + extra
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        train_cli.parse_flags(argv)
    _assert_user_error(exit_info.value.code, capsys.readouterr().err, needle.replace("{tmp}", str(files)))
    assert not workdir.exists()
