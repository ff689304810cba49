"""Data and storage faults: corrupt records (stop naming file and offset, or skip and count),
`precompute.py --verify`, a checkpoint save and a shard write that fail (disk full), and the
training log line.

The training runs use tests/test_train.py's anchor configuration (train_data.CONFIG_ARG) and dataset shape on
the 8 fake devices, so their step executable comes from the persistent compile cache that
test_train.py fills (this file sorts after it: named test_train_faults.py for that); faults are injected in the real write paths
(orbax's item writer, the shard writer's file writes) as `OSError(ENOSPC)`.
"""

from __future__ import annotations

import errno
import json
import logging
import pathlib
import shutil

import numpy as np
import pytest

import _data_helpers as helpers
import train_data
from configs import anchor as anchor_configs
from dynamicid_jax import cli, modeling
from dynamicid_jax.data import records, shards, verify
from dynamicid_jax.errors import StorageError
from dynamicid_jax.training import checkpoints, data, stages, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 2
LOG_KEYS = ["step", "loss", "grad_norm", "learning_rate", "steps_per_second", "images_per_second", "input_share"]


def anchor_config(**data_overrides):
    """tests/test_train.py's anchor_config() (same compiled step)."""
    config = anchor_configs.get_config(train_data.CONFIG_ARG)
    config.total_steps, config.checkpoint.every_steps, config.checkpoint.keep = STEPS, EVERY, 5
    config.progress_bar = False
    for key, value in data_overrides.items():
        config.data[key] = value
    return config


@pytest.fixture(scope="module")
def anchor_data(tmp_path_factory):
    config = anchor_config()
    specs = data.expected_features(stages.get("anchor"), modeling.build_modules(config.model), config)
    return train_data.write_dataset(tmp_path_factory.mktemp("anchor_shards"), "anchor", specs, units=16,
                                    null_specs=train_data.null_specs_for(specs))


def _copy(folder, tmp_path, name="shards") -> pathlib.Path:
    return pathlib.Path(shutil.copytree(folder, tmp_path / name))


def _record(folder: pathlib.Path, shard: int, k: int) -> tuple[pathlib.Path, int]:
    """(path, offset) of record k of shard `shard`."""
    manifest = shards.read_json(folder / shards.MANIFEST)
    name = manifest["shards"][shard]["file"]
    return folder / name, shards.read_shard_index(folder, name)["records"][k]["offset"]


def _flip_byte(path: pathlib.Path, offset: int) -> None:
    """Flip one payload byte of the record at `offset` (12 header bytes, then the payload)."""
    data_ = bytearray(path.read_bytes())
    data_[offset + 12 + 40] ^= 0xFF
    path.write_bytes(bytes(data_))


# --------------------------------------------------------------------------- verify


def test_verify_finds_every_fault_naming_file_and_offset(anchor_data, tmp_path, capsys):
    assert verify.verify_dataset(anchor_data)["ok"]
    folder = _copy(anchor_data, tmp_path)
    path0, offset0 = _record(folder, 0, 3)
    _flip_byte(path0, offset0)  # a flipped byte
    path1, _ = _record(folder, 1, 0)
    path1.write_bytes(path1.read_bytes()[:-10])  # a truncated shard
    index_file = folder / shards.index_name(path1.name)
    index = json.loads(index_file.read_text())
    index["num_records"] += 1  # an index that disagrees with the manifest
    index_file.write_text(json.dumps(index))
    report = faults = verify.verify_dataset(folder)
    problems = "\n".join(report["problems"])
    # the flipped record, the cut record, the file size, the counts
    assert not report["ok"] and report["records"] == 16 and report["num_problems"] == 4, problems
    assert f"{path0}: payload CRC mismatch at offset {offset0}" in problems
    assert f"{path1}: " in problems and "truncated" in problems
    assert "record counts differ (manifest 8, index 9, index entries 8)" in problems
    assert report["good_records"] == 14  # all but the flipped and the cut record

    # Feature specs: a manifest whose shapes differ from what the records hold.
    specs = _copy(anchor_data, tmp_path, "specs")
    manifest = json.loads((specs / shards.MANIFEST).read_text())
    feature = next(f for f in manifest["features"] if f["name"] == "id_embedding")
    feature["shape"] = [feature["shape"][0] * 2]
    (specs / shards.MANIFEST).write_text(json.dumps(manifest))
    report = verify.verify_dataset(specs)
    assert report["num_problems"] == 16 and "feature 'id_embedding'" in report["problems"][0]

    # The CLI: the report on stdout, one line and status 2.
    module = _precompute_cli()
    capsys.readouterr()
    assert cli.run_main(module.main, ["--verify", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out) == faults
    assert err.count("\n") == 1 and err.startswith(f"error: --verify {folder}: 4 problem(s) in 16 records")
    assert cli.run_main(module.main, ["--verify", str(anchor_data)]) == 0


def _precompute_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("precompute_cli", ROOT / "data_pipelines" / "precompute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- faults in training


def test_pipeline_skips_and_counts_corrupt_records(anchor_data, tmp_path):
    """skip_corrupt_records at the input level: batches keep their size, a bad record is
    replaced by the next readable one of the shuffled stream and counted once."""
    from dynamicid_jax.data import pipeline

    folder = _copy(anchor_data, tmp_path)
    path, offset = _record(folder, 0, 5)
    _flip_byte(path, offset)
    with pytest.raises(records.RecordFormatError, match=f"payload CRC mismatch at offset {offset}"):
        [pipeline.anchor_dataset(folder, global_batch_size=8, seed=0)[j] for j in range(2)]
    corrupt = pipeline.CorruptRecords()
    ds = pipeline.anchor_dataset(folder, global_batch_size=8, seed=0, corrupt=corrupt)
    clean = pipeline.anchor_dataset(anchor_data, global_batch_size=8, seed=0)
    for j in range(4):  # two epochs: the bad record is met twice, counted once
        got, want = ds[j], clean[j]
        rows = [i for i in range(8) if not np.array_equal(got["id_embedding"][i], want["id_embedding"][i])]
        assert len(rows) <= 1 and got["id_embedding"].shape == want["id_embedding"].shape
    assert corrupt.to_json()["count"] == 1 and list(corrupt.found) == [(str(path), offset)]


def test_training_faults_stop_cleanly_and_reruns_resume(anchor_data, tmp_path, monkeypatch, capsys, caplog):
    """One workdir through three runs of the trainer (one compiled step, reused):

    A. disk full while orbax writes step 4 (its JSON item; the arrays may be on disk already):
       one line saying step 2 is intact, status 2; orbax's INFO logs stay silent.
    B. the rerun resumes from step 2 and meets a record corrupted on disk: one line naming
       file and offset, status 2; checkpoint 2 still restorable.
    C. the same with skip_corrupt_records=True resumes from step 2, skips and counts the
       record (summary.json, one warning) and finishes. Its stdout is the log: one JSON line
       per interval with step, loss, lr, grad norm, img/s and the input stall (input_share).
    """
    import orbax.checkpoint as ocp

    compiled = {}
    compile_step = trainer.compile_step
    monkeypatch.setattr(trainer, "compile_step", lambda *a: compiled.get("step") or compiled.setdefault(
        "step", compile_step(*a)))  # same config, mesh and shards in all three runs
    folder = _copy(anchor_data, tmp_path)
    workdir = tmp_path / "run"
    modules = modeling.build_modules(anchor_config().model)

    # A: a failed save.
    original = ocp.JsonCheckpointHandler._save_fn

    async def disk_full_at_step_4(self, x, directory):
        if pathlib.Path(str(directory)).parent.name.startswith(f"{2 * EVERY}."):  # DIR/checkpoints/4.<tmp>/data
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await original(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full_at_step_4)
    cli.quiet_logs(verbose=False)
    capsys.readouterr()
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("absl").setLevel(logging.WARNING)  # what quiet_logs set (caplog lowered it)
        assert cli.run_main(trainer.train, anchor_config(), workdir, folder, stage="anchor") == 2
    assert not [r for r in caplog.records if r.name in ("absl", "orbax") and r.levelno < logging.WARNING]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: saving checkpoints (up to step") and "No space left on device" in err
    assert f"step {EVERY}, is intact" in err
    assert checkpoints.committed_steps(workdir) == [EVERY]
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", original)

    # B: a record corrupted on disk (the resumed epoch, batches 2 and 3, reads every record).
    path, offset = _record(folder, 1, 2)
    _flip_byte(path, offset)
    assert cli.run_main(trainer.train, anchor_config(), workdir, folder, stage="anchor") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {path}: payload CRC mismatch at offset {offset}") and "--verify" in err
    assert checkpoints.committed_steps(workdir) == [EVERY]
    checkpoints.load_trained_params(workdir, modules)  # restorable

    # C: skipping.
    with caplog.at_level(logging.WARNING, logger="dynamicid_jax"):
        last = trainer.train(anchor_config(skip_corrupt_records=True), workdir, folder, stage="anchor")
    assert last["step"] == STEPS and last["corrupt_records_skipped"] == 1
    assert checkpoints.committed_steps(workdir)[-1] == STEPS
    summary = json.loads((workdir / trainer.SUMMARY).read_text())
    assert summary["corrupt_records"]["records"][0]["file"] == str(path)
    assert summary["corrupt_records"]["records"][0]["offset"] == offset
    warnings = [r.getMessage() for r in caplog.records if "skipping corrupt record" in r.getMessage()]
    assert len(warnings) == 1 and f"{path} at offset {offset}" in warnings[0]
    lines = capsys.readouterr().out.strip().splitlines()
    logged = [json.loads(line) for line in lines]  # every stdout line is one log line
    assert [w["step"] for w in logged] == list(range(EVERY + 1, STEPS + 1))  # resumed after step 2
    for w in logged:
        assert list(w) == LOG_KEYS and all(np.isfinite(v) for v in w.values())


def test_failed_shard_write_keeps_finished_shards_and_the_rerun_completes(tmp_path, monkeypatch):
    from PIL import Image

    from dynamicid_jax.data.precompute import PrecomputeJob, run_precompute

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / f"img{i}.png")
        (src / f"img{i}.txt").write_text(f"caption {i}")

    def job(out):
        return PrecomputeJob("anchor", src, out, num_shards=3, resolution=16, batch_size=2, progress=False)

    run_precompute(job(tmp_path / "reference"), helpers.stand_in_extractors())
    write_record, calls = records.write_record, []

    def disk_full_in_shard_1(f, payload):
        calls.append(f.name)
        if "-00001-of-" in f.name and sum("-00001-of-" in c for c in calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_record(f, payload)

    monkeypatch.setattr(records, "write_record", disk_full_in_shard_1)
    out = tmp_path / "out"
    with pytest.raises(StorageError, match=r"anchor-00001-of-00003.tfrecord failed: .*No space left on device.*rerun"):
        run_precompute(job(out), helpers.stand_in_extractors())
    assert shards.is_shard_finished(out, "anchor-00000-of-00003.tfrecord")
    assert not any(p.name.startswith("anchor-00001") for p in out.iterdir())  # nothing half-written
    monkeypatch.setattr(records, "write_record", write_record)
    summary = run_precompute(job(out), helpers.stand_in_extractors())
    assert summary["shards_skipped"] == 1 and summary["shards_written"] == 2 and summary["finalized"]
    assert helpers.read_shard_bytes(out) == helpers.read_shard_bytes(tmp_path / "reference")
