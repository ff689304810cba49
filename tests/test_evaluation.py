"""Evaluation harness: CLIP-T parity vs transformers, face metrics on real photos, optimal
face assignment, missing faces as failures, resume, tiny end-to-end run (the protocol's
expansion and errors: test_evaluation_protocol.py).

Face metrics use the offline YuNet + SFace set and the fer expression CNN from test_assets.
"""

import csv
import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from dynamicid_jax.evaluation import (Ablation, MetricModels, StaleImageError, SubjectTarget, evaluate, expand_cases,
                                      load_clip_scorer, match_faces, resolve_sampling, score_image)
from dynamicid_jax.evaluation import records, report
from dynamicid_jax.evaluation.face_metrics import reference_embeddings
from dynamicid_jax.generation import BatchSampler
from dynamicid_jax.models.clip import clip_preprocess
from dynamicid_jax.models.torch_import import WeightImportError
from dynamicid_jax.request import read_image
from dynamicid_jax.base_models.sd15 import TEXT_LENGTH
from dynamicid_jax.tokenizer import write_tiny_vocab
from _data_helpers import EVAL_SAMPLING as SAMPLING, write_protocol as _write_protocol
from parity import rel_l2
from processes import finish_all

# ----------------------------------------------------------------------------- CLIP-T


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random transformers CLIPModel saved by transformers, with a tiny tokenizer vocabulary."""
    torch.manual_seed(0)
    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, eos_token_id=2)
    vision = dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    folder = tmp_path_factory.mktemp("clip")
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(folder)
    write_tiny_vocab(folder, TEXT_LENGTH)
    return folder, model


def _features(output):
    """transformers 5 returns a model output whose pooler_output holds the projected features."""
    return (output if isinstance(output, torch.Tensor) else output.pooler_output).numpy()


def test_clip_scorer_matches_transformers(clip_folder):
    folder, ref = clip_folder
    scorer = load_clip_scorer(folder)
    prompts = ["a photo of the person", "a happy face in front view"]
    ids = scorer.tokenizer(prompts)
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    pixels = np.asarray(clip_preprocess(images, size=32))
    with torch.no_grad():
        want_text = _features(ref.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))))
        want_image = _features(ref.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())))
    assert want_text.shape == (2, 16) and want_image.shape == (2, 16)
    assert rel_l2(scorer.text_features(ids), want_text) <= 1e-4
    assert rel_l2(scorer.image_features(images), want_image) <= 1e-4
    cos = np.sum(want_text * want_image, -1) / np.linalg.norm(want_text, axis=-1) / np.linalg.norm(want_image, axis=-1)
    assert rel_l2(scorer.score(images, prompts), cos) <= 1e-4
    # Swapping the prompts changes the scores: the text really enters CLIP-T.
    assert not np.allclose(scorer.score(images, prompts[::-1]), cos, atol=1e-4)


def test_clip_scorer_import_is_strict(clip_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder, _ = clip_folder
    state = load_file(str(folder / "model.safetensors"))
    for name, edit in (("extra", lambda s: s.update({"text_model.surprise.weight": np.zeros(3, np.float32)})),
                       ("missing", lambda s: s.pop("visual_projection.weight"))):
        broken = tmp_path / name
        broken.mkdir()
        for f in ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
            (broken / f).write_bytes((folder / f).read_bytes())
        edited = dict(state)
        edit(edited)
        save_file(edited, str(broken / "model.safetensors"))
        key = "text_model.surprise.weight" if name == "extra" else "visual_projection.weight"
        with pytest.raises(WeightImportError, match=key.replace(".", r"\.")):
            load_clip_scorer(broken)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip_scorer(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- face metrics


@pytest.fixture(scope="module")
def metric_models(test_assets):
    from dynamicid_jax.faces import load_face_analyzer
    from dynamicid_jax.faces.expression import load_expression_classifier

    return MetricModels(load_face_analyzer("default"), load_expression_classifier(test_assets / "fer_emotion_model.hdf5"))


@pytest.fixture(scope="module")
def photos(test_assets):
    names = ["obama.jpg", "obama2.jpg", "biden.jpg", "0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "45-m7-di-ph.jpg",
             "free-mountain-vector-01.jpg"]
    return {n: read_image(test_assets / n) for n in names}


@pytest.fixture(scope="module")
def references(metric_models, photos):
    return {who: reference_embeddings(metric_models.analyzer, [photos[f"{who}.jpg"]], [who]) for who in ("obama", "biden")}


def _target(references, who, expression="happy", orientation="front"):
    return SubjectTarget(who, references[who], expression, orientation)


def _score(metric_models, image, targets):
    return score_image(image, targets, metric_models.analyzer, metric_models.expressions)


def test_facesim_same_photo_near_one_other_people_low(metric_models, photos, references):
    same = _score(metric_models, photos["obama.jpg"], [_target(references, "obama")])[0]
    other_photo = _score(metric_models, photos["obama2.jpg"], [_target(references, "obama")])[0]
    other_person = _score(metric_models, photos["biden.jpg"], [_target(references, "obama")])[0]
    assert same.face_found and same.face_sim > 0.99
    assert other_person.face_found and other_person.face_sim < 0.3
    assert other_photo.face_sim > other_person.face_sim + 0.3


def test_expr_of_labelled_expression_photos(metric_models, photos, references):
    """The labels the classifier robustly gets right: surprise and happy (see test_faces)."""
    for name, label, wrong in (("0-f1-su-ph.jpg", "surprise", "happy"), ("0-f15-hao-ph.jpg", "happy", "sad")):
        right = _score(metric_models, photos[name], [_target(references, "obama", label)])[0]
        miss = _score(metric_models, photos[name], [_target(references, "obama", wrong)])[0]
        assert right.expr_top == label and right.expr_correct and right.expr_prob > 0.5, (name, right)
        assert not miss.expr_correct and miss.expr_prob < 0.2, (name, miss)


def test_pose_bins_of_labelled_yaw_photos(metric_models, photos, references):
    for name, label, other in (("0-f1-su-ph.jpg", "front", "side"), ("45-m7-di-ph.jpg", "side", "front")):
        hit = _score(metric_models, photos[name], [_target(references, "obama", orientation=label)])[0]
        miss = _score(metric_models, photos[name], [_target(references, "obama", orientation=other)])[0]
        assert hit.pose_category == label and hit.pose_hit, (name, hit)
        assert not miss.pose_hit


def _side_by_side(left, right, height=480):
    tiles = [Image.fromarray(a).resize((round(a.shape[1] * height / a.shape[0]), height)) for a in (left, right)]
    canvas = Image.new("RGB", (tiles[0].width + tiles[1].width, height))
    canvas.paste(tiles[0], (0, 0))
    canvas.paste(tiles[1], (tiles[0].width, 0))
    return np.asarray(canvas), tiles[0].width


@pytest.mark.parametrize("order", [("obama", "biden"), ("biden", "obama")])
def test_assignment_pairs_faces_by_identity_in_either_position(metric_models, photos, references, order):
    image, split = _side_by_side(photos[f"{order[0]}.jpg"], photos[f"{order[1]}.jpg"])
    scores = _score(metric_models, image, [_target(references, "obama"), _target(references, "biden")])
    for who, s in zip(("obama", "biden"), scores):
        assert s.subject == who and s.face_found and s.face_sim > 0.9, s
        centre_x = (s.face_box[0] + s.face_box[2]) / 2
        assert (centre_x < split) == (order[0] == who), (order, who, s.face_box)


def test_match_faces_is_optimal_not_greedy():
    # Greedy (best pair first) takes 0.9 then 0.1 (total 1.0); the optimum is 0.8 + 0.85.
    assert match_faces(np.array([[0.9, 0.8], [0.85, 0.1]])) == [1, 0]
    assert match_faces(np.array([[0.2], [0.7]])) == [None, 0]  # fewer faces than subjects
    assert match_faces(np.zeros((2, 0))) == [None, None]


def test_missing_face_counts_as_failure_not_skipped(metric_models, photos, references, tmp_path):
    none = _score(metric_models, photos["free-mountain-vector-01.jpg"], [_target(references, "obama")])[0]
    assert (none.face_found, none.face_sim, none.expr_prob, none.expr_correct, none.pose_hit) == (False, 0, 0, False, False)
    # Two people asked for, one face present: the missing one enters the means as zeros.
    pair = _score(metric_models, photos["obama.jpg"], [_target(references, "obama"), _target(references, "biden")])
    assert pair[0].face_found and not pair[1].face_found and pair[1].face_sim == 0.0
    protocol = _write_protocol(tmp_path, {"obama": "obama.jpg", "biden": "biden.jpg"}, photos_dir=None, groups=True)
    case = expand_cases(protocol, "multi", Ablation())[0]
    summary = report.summarize(records.case_rows(case, pair, None, None, "test"))
    assert summary.n_subjects == 2 and summary.faces_found == 0.5
    assert summary.face_sim == pytest.approx(pair[0].face_sim / 2)
    assert summary.clip_t is None and summary.clip_measured == 0


# ----------------------------------------------------------------------------- resume


class CountingGenerator:
    """Stands in for generation.BatchSampler (batch size 1): returns the first identity's
    reference photo (so FaceSim of a single-ID image is ~1), counts images, can fail after
    `fail_after` of them."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    def __call__(self, items):
        images = []
        for item in items:
            request = item.request
            if self.fail_after is not None and len(self.calls) >= self.fail_after:
                raise KeyboardInterrupt("simulated interruption")
            self.calls.append((request.identities[0].refs[0], request.seed))
            images.append(read_image(request.identities[0].refs[0]))
        return np.stack(images), [{"fake": True}] * len(items)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_generates_only_missing_images_and_keeps_rows(metric_models, tmp_path):
    protocol = _write_protocol(tmp_path, {"obama": "obama.jpg", "biden": "biden.jpg"}, seeds=(0, 1))
    out = tmp_path / "out"

    def run(generate, seeds, sampling=SAMPLING, metrics=metric_models):
        return evaluate(protocol, out_dir=out, mode="single", ablation=Ablation(), sampling=sampling, seeds=seeds,
                        generate=generate, provenance={"weights": "fake"}, metrics=metrics, arch="SD1.5", progress=False)

    first = CountingGenerator()
    result = run(first, (0,))
    assert len(first.calls) == 2 and (result.generated, result.scored) == (2, 2)
    rows_before = _read_csv(out / "metrics.csv")

    interrupted = CountingGenerator(fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted, (0, 1))
    assert interrupted.calls == [(protocol.identities["obama"].refs[0], 1)]

    resumed = CountingGenerator()
    result = run(resumed, (0, 1))
    assert resumed.calls == [(protocol.identities["biden"].refs[0], 1)]  # only the one never written
    assert (result.generated, result.reused, result.scored, result.kept) == (1, 3, 2, 2)

    again = CountingGenerator()
    result = run(again, (0, 1))
    assert again.calls == [] and (result.generated, result.scored, result.kept) == (0, 0, 4)

    rows = _read_csv(out / "metrics.csv")
    assert len(rows) == 4 and len({(r["image"], r["subject_index"]) for r in rows}) == 4
    assert rows[:2] == rows_before  # earlier rows kept as they were
    assert all(float(r["face_sim"]) > 0.99 and r["clip_t"] == "" for r in rows)
    text = (out / "report.md").read_text()
    assert "| DynamicID (this run) | SD1.5 | not measured | 1.000 |" in text
    assert len(result.grids) == 2 and all(p.is_file() for p in result.grids)
    assert not list(out.rglob("*.tmp"))

    # An image without its sidecar (interrupted between the two writes) is regenerated and rescored.
    image = out / expand_cases(protocol, "single", Ablation(), (1,))[0].relative_path
    image.with_suffix(".json").unlink()
    redo = CountingGenerator()
    result = run(redo, (0, 1))
    assert len(redo.calls) == 1 and result.scored == 1
    # Images made with other settings are never silently reused.
    with pytest.raises(StaleImageError, match="steps: 2 -> 3"):
        run(CountingGenerator(), (0, 1), sampling=dict(SAMPLING, steps=3))


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_pipeline(test_assets):
    from dynamicid_jax.loading import load_pipeline

    _, pipe = load_pipeline(demo=True, expression_model=str(test_assets / "fer_emotion_model.hdf5"))
    return pipe


def test_tiny_pipeline_end_to_end_and_cli_metrics_only(tiny_pipeline, metric_models, test_assets, tmp_path):
    sys.path.insert(0, ".")
    from configs import tiny
    from launch import evaluate as cli

    protocol = _write_protocol(tmp_path, {"obama": "obama.jpg"},
                               edits=[{"expression": "surprise", "orientation": "side"}])
    sampling = resolve_sampling(tiny.get_config().sampling, protocol)
    out = tmp_path / "out"
    result = evaluate(protocol, out_dir=out, mode="single", ablation=Ablation(), sampling=sampling,
                      generate=BatchSampler(tiny_pipeline, devices=jax.devices()[:1]),
                      provenance=tiny_pipeline.provenance, metrics=metric_models,
                      arch="tiny random (demo)", progress=False)
    assert (result.generated, result.scored) == (1, 1)
    case = expand_cases(protocol, "single", Ablation())[0]
    image = read_image(out / case.relative_path)
    assert image.shape == (sampling["height"], sampling["width"], 3)
    sidecar = json.loads((out / case.relative_path).with_suffix(".json").read_text())
    assert sidecar["request"]["identities"][0]["face_prompt"] == "the expression is surprised, the face is side view"
    assert sidecar["resolved"]["identities_used"][0]["target_prompt"] == sidecar["request"]["identities"][0]["face_prompt"]
    (row,) = _read_csv(out / "metrics.csv")
    assert row["expression"] == "surprise" and row["orientation"] == "side"
    if row["face_found"] == "0":  # a random model draws no face: a failure, scored as zeros
        assert float(row["face_sim"]) == 0.0 and row["pose_hit"] == "0"

    # The command line scores what exists without loading a generator, reusing the rows.
    argv = ["--testset", str(tmp_path / "t.json"), "--out", str(out), "--metrics_only", "--no_progress",
            "--expression_model", str(test_assets / "fer_emotion_model.hdf5"), "--demo"]
    assert cli.main(argv) == 0
    assert _read_csv(out / "metrics.csv") == [row]
    assert "not measured" in (out / "report.md").read_text()
    assert cli.main(["--testset", str(tmp_path / "missing.json"), "--out", str(out), "--metrics_only"]) == 2


@pytest.mark.slow
def test_evaluation_over_two_processes_equals_eight_devices(tiny_pipeline, test_assets, tmp_path):
    """launch/evaluate.py --images_only as 2 jax.distributed processes x 4 CPU devices writes
    every case's picture once (process 0's totals: all 8 generated, so the shares are disjoint
    and complete) and the pictures of the same evaluation run in this process on 8 devices:
    the same sidecars, the pixels within a grey level (another mesh, another XLA program; see
    tests/test_generation.py)."""
    import subprocess

    from configs import tiny
    from dynamicid_jax.distributed import free_local_port

    edits = [{"expression": "happy", "orientation": "front"}, {"expression": "surprise", "orientation": "side"}]
    protocol = _write_protocol(tmp_path, {"obama": "obama.jpg", "biden": "biden.jpg"}, photos_dir=test_assets,
                               edits=edits, seeds=(0, 1))
    cases = expand_cases(protocol, "single", Ablation())
    assert len(cases) == 8
    here = tmp_path / "here"
    assert len(jax.local_devices()) == 8
    result = evaluate(protocol, out_dir=here, mode="single", ablation=Ablation(),
                      sampling=resolve_sampling(tiny.get_config().sampling, protocol), generate=BatchSampler(tiny_pipeline),
                      provenance=tiny_pipeline.provenance, metrics=None, arch="tiny random (demo)", progress=False)
    assert result.generated == 8

    root, port, two = pathlib.Path(__file__).resolve().parents[1], free_local_port(), tmp_path / "two"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(root))
    procs = [subprocess.Popen(
        [sys.executable, str(root / "launch" / "evaluate.py"), "--demo", "--testset", str(tmp_path / "t.json"),
         "--out", str(two), "--mode", "single", "--images_only", "--batch_size", "8", "--no_progress",
         "--expression_model", str(test_assets / "fer_emotion_model.hdf5"), f"--coordinator_address=localhost:{port}",
         "--num_processes=2", f"--process_id={i}"], cwd=root, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = finish_all(procs, timeout=900)
    assert "8 images: 8 generated, 0 reused" in outputs[0], outputs[0][-2000:]
    for case in cases:
        ours, theirs = two / case.relative_path, here / case.relative_path
        assert json.loads(ours.with_suffix(".json").read_text())["request"] == \
            json.loads(theirs.with_suffix(".json").read_text())["request"], case.relative_path
        diff = np.abs(read_image(ours).astype(int) - read_image(theirs).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (case.relative_path, diff.max(), (diff > 0).mean())
