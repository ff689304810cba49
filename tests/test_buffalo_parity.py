"""buffalo_l wrappers (dynamicid_jax/faces/buffalo.py) against insightface's own code.

The real buffalo_l files are never downloaded, so each model is replaced by a small
random-weight ONNX graph with the real file's signature, and insightface 2.1's classes
(`FaceAnalysis` over the folder, i.e. `model_zoo.get_model` -> SCRFD / ArcFaceONNX / Landmark)
run next to ours on the same real photos. Signatures of the real files, as insightface logs
them when it loads buffalo_l ("find model: <file> <task> <input shape> <mean> <std>"):
    det_10g.onnx    detection       [1, 3, '?', '?']     127.5 128.0   9 outputs (5 keypoints)
    w600k_r50.onnx  recognition     ['None', 3, 112, 112] 127.5 127.5  one (N, 512) output
    2d106det.onnx   landmark_2d_106 ['None', 3, 192, 192] 0.0 1.0      one (N, 212) output
    1k3d68.onnx     landmark_3d_68  ['None', 3, 192, 192] 0.0 1.0      one (N, 3309) output
insightface picks mean/std by graph inspection (model_zoo/arcface_onnx.py, landmark.py): an mxnet
`bn_data` node first (the landmark models) means raw 0-255 input; no Sub/Mul among the first 8
nodes (w600k_r50, a PyTorch export) means (x - 127.5) / 127.5. The graphs below are built so
that insightface makes the same choices as for the real files, and every output depends on
the input pixels (average pooling + 1x1 conv / dense layers), so a preprocessing difference
(channel order, mean/std, crop, letterbox) changes the result. The detector's score map has a
fixed per-anchor bias (a few anchors fire, the rest stay far below 0.5) plus an input-dependent
term; box and keypoint offsets are input-dependent; neighbouring firing anchors overlap, so NMS
suppresses some of them.

The paper's face analysis is insightface's FaceAnalysis prepared with det_size=(640, 640) (2.x's
default is a (128, 128) + (640, 640) multi-scale pass; DynamicID/IP-Adapter pass 640).
insightface takes BGR images (cv2.imread), our wrappers RGB.
"""

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

try:
    import insightface
    from insightface.app import FaceAnalysis
    from insightface.utils import face_align
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        "tests/test_buffalo_parity.py needs insightface 2.1 installed without its opencv-python "
        "dependency: `pip install --no-deps insightface==2.1` (make install does this)"
    ) from error

from dynamicid_jax.faces import alignment, buffalo, detection, load_face_analyzer, onnx_session

PHOTOS = ["obama.jpg", "multi_face.jpg", "0-f15-hao-ph.jpg", "biden.jpg"]
# 928 wide x 1280 high: insightface's letterbox makes it 464 px wide (int(640 / (1280 / 928))),
# a product-first formula 465 -- a size where the two roundings differ.
RESIZED = ("obama.jpg", (928, 1280))
DET_SIZE = 640
STRIDES = (8, 16, 32)
# (stride, row, col, anchor, bias): anchors that fire. Pairs share a cell or neighbour each
# other so that NMS (IoU > 0.4) has something to suppress.
FIRING = [
    (8, 30, 40, 0, 2.0), (8, 30, 40, 1, 3.0), (8, 30, 41, 0, 1.5), (8, 60, 20, 1, 2.5),
    (16, 10, 10, 0, 2.2), (16, 25, 30, 1, 3.2), (16, 26, 30, 1, 1.8), (16, 20, 5, 0, 2.8),
    (32, 5, 15, 0, 2.6), (32, 5, 16, 0, 2.4), (32, 14, 8, 1, 3.4),
]


def _opset_model(nodes, inputs, outputs, inits, name):
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def scrfd_graph(rng):
    """det_10g's signature: input.1 (1, 3, ?, ?); [scores, bboxes, kps] x strides 8/16/32."""
    nodes, inits, score_outs, bbox_outs, kps_outs = [], [], [], [], []
    add_init = lambda value, name: inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    inits.append(numpy_helper.from_array(np.array([-1, 1], np.int64), "shape1"))
    inits.append(numpy_helper.from_array(np.array([-1, 4], np.int64), "shape4"))
    inits.append(numpy_helper.from_array(np.array([-1, 10], np.int64), "shape10"))
    add_init(0.5, "half")
    add_init(3.0, "three")
    add_init(1.5, "onehalf")
    add_init(2.0, "two")
    # output names of the real det_10g.onnx, in the order insightface reads them
    names = {"score": ["448", "471", "494"], "bbox": ["451", "474", "497"], "kps": ["454", "477", "500"]}
    for level, stride in enumerate(STRIDES):
        s = f"s{stride}"
        nodes.append(helper.make_node("AveragePool", ["input.1"], [f"{s}_pool"], kernel_shape=[stride, stride],
                                      strides=[stride, stride]))
        for kind, channels in (("score", 2), ("bbox", 8), ("kps", 20)):
            add_init(rng.normal(0, 0.6, (channels, 3, 1, 1)), f"{s}_{kind}_w")
            add_init(rng.normal(0, 0.1, (channels,)), f"{s}_{kind}_b")
            nodes.append(helper.make_node("Conv", [f"{s}_pool", f"{s}_{kind}_w", f"{s}_{kind}_b"], [f"{s}_{kind}_c"]))
            nodes.append(helper.make_node("Transpose", [f"{s}_{kind}_c"], [f"{s}_{kind}_t"], perm=[0, 2, 3, 1]))
            width = channels // 2
            nodes.append(helper.make_node("Reshape", [f"{s}_{kind}_t", f"shape{width}"], [f"{s}_{kind}_r"]))
        cells = DET_SIZE // stride
        bias = np.full((cells * cells * 2, 1), -9.0, np.float32)
        for f_stride, row, col, anchor, value in FIRING:
            if f_stride == stride:
                bias[(row * cells + col) * 2 + anchor] = value
        add_init(bias, f"{s}_score_bias")
        out = names["score"][level]
        nodes += [helper.make_node("Mul", [f"{s}_score_r", "half"], [f"{s}_score_h"]),
                  helper.make_node("Add", [f"{s}_score_h", f"{s}_score_bias"], [f"{s}_score_l"]),
                  helper.make_node("Sigmoid", [f"{s}_score_l"], [out])]
        score_outs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", 1]))
        # box distances in strides, 1.5 ... 4.5; keypoint offsets -2 ... 2 strides
        out = names["bbox"][level]
        nodes += [helper.make_node("Sigmoid", [f"{s}_bbox_r"], [f"{s}_bbox_s"]),
                  helper.make_node("Mul", [f"{s}_bbox_s", "three"], [f"{s}_bbox_m"]),
                  helper.make_node("Add", [f"{s}_bbox_m", "onehalf"], [out])]
        bbox_outs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", 4]))
        out = names["kps"][level]
        nodes += [helper.make_node("Tanh", [f"{s}_kps_r"], [f"{s}_kps_t2"]),
                  helper.make_node("Mul", [f"{s}_kps_t2", "two"], [out])]
        kps_outs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", 10]))
    graph_input = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])
    return _opset_model(nodes, [graph_input], score_outs + bbox_outs + kps_outs, inits, "det_10g_fake")


def arcface_graph(rng):
    """w600k_r50's signature: input.1 (None, 3, 112, 112) -> (None, 512); PyTorch-style node names."""
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (16, 3, 4, 4)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (16,)).astype(np.float32), "conv_b"),
        numpy_helper.from_array(np.full((16, 1, 1), 0.25, np.float32), "prelu_slope"),
        numpy_helper.from_array(rng.normal(0, 0.05, (16 * 7 * 7, 512)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (512,)).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input.1", "conv_w", "conv_b"], ["c0"], name="Conv_0", strides=[4, 4]),
        helper.make_node("PRelu", ["c0", "prelu_slope"], ["p1"], name="PRelu_1"),
        helper.make_node("AveragePool", ["p1"], ["a2"], name="AveragePool_2", kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Flatten", ["a2"], ["f3"], name="Flatten_3"),
        helper.make_node("Gemm", ["f3", "fc_w", "fc_b"], ["683"], name="Gemm_4"),
    ]
    return _opset_model(nodes, [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
                        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])], inits, "w600k_fake")


def landmark_graph(rng, outputs):
    """2d106det / 1k3d68 signature: data (None, 3, 192, 192), an mxnet `bn_data` first -> (None, outputs)."""
    inits = [
        numpy_helper.from_array(np.ones(3, np.float32), "bn_gamma"),
        numpy_helper.from_array(np.zeros(3, np.float32), "bn_beta"),
        numpy_helper.from_array(np.full(3, 127.5, np.float32), "bn_mean"),
        numpy_helper.from_array(np.full(3, 128.0 ** 2, np.float32), "bn_var"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 8, 8)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.normal(0, 0.06, (8 * 6 * 6, outputs)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (outputs,)).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("BatchNormalization", ["data", "bn_gamma", "bn_beta", "bn_mean", "bn_var"], ["bn"],
                         name="bn_data", epsilon=1e-5),
        helper.make_node("Conv", ["bn", "conv_w", "conv_b"], ["conv"], name="conv0", strides=[8, 8]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu0"),
        helper.make_node("AveragePool", ["relu"], ["pool"], name="pool0", kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten0"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc"], name="fc0"),
        helper.make_node("Tanh", ["fc"], ["fc1"], name="tanh0"),
    ]
    return _opset_model(nodes, [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["None", 3, 192, 192])],
                        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["None", outputs])], inits,
                        f"landmark_{outputs}_fake")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A buffalo_l-shaped folder of random graphs (no meanshape_68.pkl: both sides take insightface's)."""
    folder = tmp_path_factory.mktemp("buffalo_l")
    rng = np.random.default_rng(4)
    onnx.save(scrfd_graph(rng), str(folder / buffalo.DETECTOR_FILE))
    onnx.save(arcface_graph(rng), str(folder / buffalo.RECOGNISER_FILE))
    onnx.save(landmark_graph(rng, 212), str(folder / buffalo.LANDMARK_2D_FILE))
    onnx.save(landmark_graph(rng, 3309), str(folder / buffalo.LANDMARK_3D_FILE))
    return folder


@pytest.fixture(scope="module")
def reference(model_dir):
    app = FaceAnalysis(name=str(model_dir), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(DET_SIZE, DET_SIZE))
    return app


@pytest.fixture(scope="module")
def ours(model_dir):
    return load_face_analyzer(str(model_dir))


@pytest.fixture(scope="module")
def photos(test_assets):
    """{name: BGR uint8} for the photos plus one resized copy (a letterbox rounding case)."""
    images = {name: cv2.imread(str(test_assets / name)) for name in PHOTOS}
    name, size = RESIZED
    images[f"{name}@{size[0]}x{size[1]}"] = cv2.resize(images[name], size, interpolation=cv2.INTER_AREA)
    assert all(image is not None for image in images.values())
    return images


def rgb(bgr):
    return np.ascontiguousarray(bgr[:, :, ::-1])


def test_reference_reads_our_graphs_as_the_real_buffalo_l(reference):
    """insightface routes each graph to the task, input shape and mean/std it logs for the real files."""
    expected = {
        "detection": ([1, 3, "?", "?"], 127.5, 128.0),
        "recognition": (["None", 3, 112, 112], 127.5, 127.5),
        "landmark_2d_106": (["None", 3, 192, 192], 0.0, 1.0),
        "landmark_3d_68": (["None", 3, 192, 192], 0.0, 1.0),
    }
    got = {task: (list(m.input_shape), m.input_mean, m.input_std) for task, m in reference.models.items()}
    assert got == expected
    detector = reference.models["detection"]
    assert (detector.fmc, detector._num_anchors, detector.use_kps) == (3, 2, True)
    assert insightface.__version__ == "2.1"


def test_detector_matches_scrfd(reference, ours, photos):
    """Letterboxed canvas, decoded boxes, scores and 5 keypoints after NMS, in the same order."""
    det = reference.models["detection"]
    canvases = []
    forward = det.forward
    det.forward = lambda img, threshold: canvases.append(img) or forward(img, threshold)
    try:
        for name, bgr in photos.items():
            canvases.clear()
            ref_det, ref_kps = det.detect(bgr, input_size=(DET_SIZE, DET_SIZE))
            (canvas,) = canvases
            ours_canvas, ours_scale = detection.letterbox(rgb(bgr), DET_SIZE, via_aspect_ratio=True)
            np.testing.assert_array_equal(ours_canvas, rgb(canvas), err_msg=name)
            candidates = sum(int((s >= det.det_thresh).sum()) for s in forward(canvas, det.det_thresh)[0])
            boxes, scores, kps = ours.detect(rgb(bgr))
            assert 3 <= len(ref_det) < candidates, (name, len(ref_det), candidates)  # NMS removed some
            assert len(boxes) == len(ref_det), name
            np.testing.assert_allclose(boxes, ref_det[:, :4], atol=2e-3, rtol=1e-5, err_msg=name)
            np.testing.assert_allclose(scores, ref_det[:, 4], atol=1e-6, err_msg=name)
            np.testing.assert_allclose(kps, ref_kps, atol=2e-3, rtol=1e-5, err_msg=name)
    finally:
        del det.forward


def test_nms_matches_scrfd_nms(reference):
    """insightface's NMS (pixel-inclusive +1 areas) on many random, partly tiny, overlapping boxes."""
    det = reference.models["detection"]
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 40))
        xy = rng.uniform(0, 60, (n, 2))
        wh = rng.uniform(0.5, 30, (n, 2)) if trial % 2 else rng.uniform(0.2, 4, (n, 2))
        dets = np.hstack([xy, xy + wh, rng.uniform(0.5, 1, (n, 1))]).astype(np.float32)
        dets = dets[np.argsort(-dets[:, 4], kind="stable")]
        ours = detection.nms(dets[:, :4], dets[:, 4], det.nms_thresh, pixel_inclusive=True)
        np.testing.assert_array_equal(ours, det.nms(dets), err_msg=f"trial {trial}")


def _match(reference_faces, our_faces):
    """Pairs (insightface face, our face) by box; both sides must find the same set."""
    assert len(reference_faces) == len(our_faces) >= 3
    pairs = []
    for face in reference_faces:
        distances = [np.abs(ours.bbox - face.bbox).max() for ours in our_faces]
        pairs.append((face, our_faces[int(np.argmin(distances))]))
        assert min(distances) < 1e-2
    assert len({id(ours) for _, ours in pairs}) == len(our_faces)
    return pairs


def test_face_analysis_matches(reference, ours, photos):
    """FaceAnalysis.get vs FaceAnalyzer.analyze: box, score, kps, embedding, 106 landmarks, pose."""
    landmarker_3d = buffalo.BoxLandmarker(reference.models["landmark_3d_68"].model_file, dims=3, count=68)
    for name, bgr in photos.items():
        pairs = _match(reference.get(bgr), ours.analyze(rgb(bgr)))
        for ref, face in pairs:
            np.testing.assert_allclose(face.bbox, ref.bbox, atol=2e-3, rtol=1e-5, err_msg=name)
            np.testing.assert_allclose(face.score, ref.det_score, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(face.kps, ref.kps, atol=2e-3, rtol=1e-5, err_msg=name)
            np.testing.assert_allclose(face.embedding, ref.normed_embedding, atol=1e-4, err_msg=name)
            np.testing.assert_allclose(face.landmarks, ref.landmark_2d_106, atol=2e-3, rtol=1e-5, err_msg=name)
            points = landmarker_3d.points_3d(rgb(bgr), face.bbox)
            np.testing.assert_allclose(points, ref.landmark_3d_68, atol=2e-3, rtol=1e-5, err_msg=name)
            np.testing.assert_allclose(face.pose, ref.pose, atol=2e-3, err_msg=name)


def test_alignment_is_skimage_similarity_transform():
    """Our Umeyama fit is skimage's SimilarityTransform.estimate (what face_align.estimate_norm calls).

    Exact on float64 input. insightface passes float32 keypoints and a float32 template, and
    skimage then computes in float32, so its matrix carries rounding noise (up to ~2e-4) that the
    crop and embedding comparisons below tolerate.
    """
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(1)
    template = face_align.arcface_dst.astype(np.float64)
    for _ in range(50):
        angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(0.5, 4)
        rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        kps = template @ rotation.T + rng.uniform(0, 500, 2) + rng.normal(0, 3, (5, 2))
        if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
            reference = SimilarityTransform.from_estimate(kps, template)
        else:
            reference = SimilarityTransform()
            reference.estimate(kps, template)
        np.testing.assert_allclose(alignment.similarity_transform(kps, template), reference.params[:2], atol=1e-9)
    np.testing.assert_allclose(alignment.ARCFACE_TEMPLATE_112, face_align.arcface_dst, atol=1e-5)


def test_aligned_crop_and_raw_embedding_match_arcface(reference, model_dir, photos):
    """face_align.norm_crop vs our 5-point alignment, and ArcFaceONNX.get_feat vs our raw output."""
    recogniser = reference.models["recognition"]
    embedder = buffalo.ArcFaceEmbedder(model_dir / buffalo.RECOGNISER_FILE)
    det = reference.models["detection"]
    for name, bgr in photos.items():
        _, all_kps = det.detect(bgr, input_size=(DET_SIZE, DET_SIZE))
        for kps in all_kps:
            # Entries in pixels (translations up to ~1e3 for these photos); the reference starts
            # from float32 keypoints and template, i.e. ~1e3 x 6e-8 before the least-squares
            # fit's amplification (measured 1.5e-4). A wrong keypoint order or template moves
            # them by pixels; 2e-3 px leaves an order of margin both ways.
            np.testing.assert_allclose(alignment.similarity_transform(kps, alignment.ARCFACE_TEMPLATE_112),
                                       face_align.estimate_norm(kps, 112), atol=2e-3, err_msg=name)
            ref_crop = face_align.norm_crop(bgr, landmark=kps, image_size=112)
            crop = alignment.align_arcface(rgb(bgr), kps, 112)
            # warpAffine samples at 1/32 px: the float32 matrix noise moves a few samples there
            difference = np.abs(crop.astype(int) - rgb(ref_crop).astype(int))
            assert difference.mean() < 0.01 and (difference > 0).mean() < 0.005, (name, difference.max())
            ref_embedding = recogniser.get_feat(ref_crop)[0]
            # the same crop through our preprocessing and session: equal up to float rounding
            same_crop = onnx_session.run_single_input(embedder.session, buffalo.nchw_blob(rgb(ref_crop), 127.5, 127.5))
            np.testing.assert_allclose(same_crop[0][0], ref_embedding, rtol=1e-5, atol=1e-5, err_msg=name)
            # our own crop: within the crop noise above (1e-4 of the embedding's norm)
            difference = np.abs(embedder(rgb(bgr), kps) - ref_embedding).max()
            assert difference < 1e-4 * np.linalg.norm(ref_embedding), (name, difference)
