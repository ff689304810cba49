"""Face projection, IMR and KeyPointEncoder: imported from files in the release's exact key
layout (written by torch from the re-statements in dynamicid_torch_reference.py) and
compared with the torch forward; strictness of the import; the full-size key layouts.
"""

import functools
import re

import jax
import numpy as np
import pytest
import torch

import dynamicid_torch_reference as ref
from dynamicid_jax.dynamicid import published_weights as pw
from dynamicid_jax.dynamicid.face_projection import FaceProjection
from dynamicid_jax.dynamicid.imr import IMR
from dynamicid_jax.dynamicid.keypoint_encoder import KeyPointEncoder
from dynamicid_jax.models.torch_import import WeightImportError, read_state_dict
from parity import rel_l2

PROJ = dict(id_dim=8, clip_dim=12, num_tokens=3, width=16, depth=2, num_heads=2, head_dim=6)
IMR_CFG = dict(id_dim=16, landmark_dim=10, text_dim=12, width=24, num_heads=2, head_dim=8, num_motion_tokens=3, depth=2)
KPE_CFG = dict(image_size=12, channels=(4, 8, 8), num_residual=(0, 2, 1), embedding_dim=6)


def torch_projection():
    return ref.randomise_(ref.ProjPlusModel(
        PROJ["width"], PROJ["id_dim"], PROJ["clip_dim"], PROJ["num_tokens"], depth=PROJ["depth"],
        heads=PROJ["num_heads"], dim_head=PROJ["head_dim"],
    ), seed=1).eval()


def torch_imr():
    return ref.randomise_(ref.IMR(
        dim=IMR_CFG["width"], dim_head=IMR_CFG["head_dim"], heads=IMR_CFG["num_heads"],
        num_queries=IMR_CFG["num_motion_tokens"], embedding_dim=IMR_CFG["id_dim"], txt_dim=IMR_CFG["text_dim"],
        landmark_dim=IMR_CFG["landmark_dim"], depth=IMR_CFG["depth"],
    ), seed=2).eval()


def torch_kpe():
    return ref.randomise_(ref.KeyPointEncoder(KPE_CFG["channels"], KPE_CFG["num_residual"], KPE_CFG["embedding_dim"]),
                          seed=3).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny SAA.bin (proj_module + an SAA_module of two processors), IMR.bin, key_point_encoder.bin."""
    root = tmp_path_factory.mktemp("dynamicid_release")
    proj, imr, kpe = torch_projection(), torch_imr(), torch_kpe()
    processors = torch.nn.ModuleList([ref.SAProcessor(16, None, 2), ref.SAAProcessor(16, 16, 2)])
    torch.save({"proj_module": proj.state_dict(), "SAA_module": processors.state_dict()}, root / "SAA.bin")
    torch.save(imr.state_dict(), root / "IMR.bin")
    torch.save(kpe.state_dict(), root / "key_point_encoder.bin")
    return root, proj, imr, kpe


# ----------------------------------------------------------------------------- parity


def test_face_projection_matches_torch(files):
    root, proj, _, _ = files
    model = FaceProjection(**PROJ)
    params = pw.load_face_projection_params(root / "SAA.bin", model)
    rng = np.random.default_rng(0)
    ids = rng.normal(size=(2, PROJ["id_dim"])).astype(np.float32)
    clip = rng.normal(size=(2, 5, PROJ["clip_dim"])).astype(np.float32)
    out = jax.jit(model.apply)({"params": params}, ids, clip)  # one program, not one per operation
    with torch.no_grad():
        expected = proj(torch.from_numpy(ids), torch.from_numpy(clip)).numpy()
    assert out.shape == (2, PROJ["num_tokens"], PROJ["width"])
    assert rel_l2(out, expected) <= 1e-4


def test_imr_matches_torch_one_source_many_targets(files):
    root, _, imr, _ = files
    model = IMR(**IMR_CFG)
    params = pw.load_imr_params(root / "IMR.bin", model)
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(1, 4, IMR_CFG["id_dim"])).astype(np.float32)
    src_lm, src_txt = rng.normal(size=(1, IMR_CFG["landmark_dim"])), rng.normal(size=(1, IMR_CFG["text_dim"]))
    tgt_lm, tgt_txt = rng.normal(size=(3, IMR_CFG["landmark_dim"])), rng.normal(size=(3, IMR_CFG["text_dim"]))
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    with torch.no_grad():
        expected = imr(*(torch.from_numpy(f32(a)) for a in (tokens, src_lm, tgt_lm, src_txt, tgt_txt))).numpy()
    rep = lambda a: f32(np.repeat(a, 3, axis=0))  # noqa: E731  (ours pairs one source row per target)
    out = jax.jit(model.apply)({"params": params}, rep(tokens), rep(src_lm), rep(src_txt), f32(tgt_lm), f32(tgt_txt))
    assert out.shape == expected.shape == (3, 4, IMR_CFG["id_dim"])
    assert rel_l2(out, expected) <= 1e-4


@pytest.mark.parametrize("train", [False, True], ids=["running_stats", "batch_stats"])
def test_keypoint_encoder_matches_torch(files, train):
    root, _, _, kpe = files
    model = KeyPointEncoder(**KPE_CFG)
    variables = pw.load_keypoint_encoder_variables(root / "key_point_encoder.bin", model)
    rng = np.random.default_rng(2)
    image = np.where(rng.random((3, 12, 12, 1)) < 0.1, 1.0, -1.0).astype(np.float32)  # sparse white dots
    kpe.train(train)
    with torch.no_grad():
        expected = kpe(torch.from_numpy(image.transpose(0, 3, 1, 2))).numpy().reshape(3, -1)
    kpe.eval()
    if train:
        out, _ = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(variables, image)
    else:
        out = jax.jit(model.apply)(variables, image)
    assert out.shape == (3, KPE_CFG["embedding_dim"])
    assert (np.asarray(out) >= 0).all()  # ends in BatchNorm + ReLU
    assert rel_l2(out, expected) <= 1e-4


# ----------------------------------------------------------------------------- strictness


def test_nested_saa_file_reads_both_parts(files):
    root = files[0]
    proj, saa_sd = pw.read_saa_checkpoint(root / "SAA.bin")
    assert "proj.0.weight" in proj and "perceiver_resampler.layers.1.0.to_kv.weight" in proj
    assert {"0.to_q_lora.down.weight", "1.to_k_ip.weight", "1.to_v_ip.weight"} <= set(saa_sd)
    assert "0.to_k_ip.weight" not in saa_sd


def _edited(files, name, edit):
    sd = read_state_dict(files[0] / name)
    edit(sd)
    return sd


def test_missing_key_is_named(files):
    sd = _edited(files, "IMR.bin", lambda sd: sd.pop("entangleNet.1.1.to_kv.weight"))
    with pytest.raises(WeightImportError, match=re.escape("entangleNet.1.1.to_kv.weight")):
        pw.load_imr_params(sd, IMR(**IMR_CFG))


def test_unexpected_key_is_named(files):
    sd = _edited(files, "key_point_encoder.bin", lambda sd: sd.update({"blocks.9.0.conv_block.0.weight": np.zeros(1)}))
    with pytest.raises(WeightImportError, match=re.escape("blocks.9.0.conv_block.0.weight")):
        pw.load_keypoint_encoder_variables(sd, KeyPointEncoder(**KPE_CFG))


def test_misshaped_key_is_named(files):
    def edit(sd):
        sd["proj_module.norm.weight"] = np.ones(PROJ["width"] + 1, np.float32)

    sd = _edited(files, "SAA.bin", edit)
    with pytest.raises(WeightImportError, match=r"mis-shaped.*norm\.weight"):
        pw.load_face_projection_params(sd, FaceProjection(**PROJ))


def test_wrong_config_is_an_error_not_a_silent_fit(files):
    with pytest.raises(WeightImportError, match=re.escape("disentangleNet.2.0.to_kv.weight")):
        pw.load_imr_params(files[0] / "IMR.bin", IMR(**{**IMR_CFG, "depth": 3}))


# ----------------------------------------------------------------------------- full-size layouts


def _torch_numpy(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def test_full_size_release_layouts_map_one_to_one():
    """The release-size state dicts import completely (every key used, every leaf filled)."""
    from dynamicid_jax import modeling
    from dynamicid_jax.base_models import sd15

    release = modeling.build_modules(sd15.model_config())  # the release's sizes, as SD1.5 builds them (no init)
    torch.manual_seed(0)
    kpe = pw.load_keypoint_encoder_variables(_torch_numpy(ref.KeyPointEncoder()), release.keypoint_encoder)
    assert kpe["params"]["blocks_6_1"]["conv"]["kernel"].shape == (1, 1, 512, 768)
    assert kpe["batch_stats"]["blocks_2_3"]["norm"]["var"].shape == (64,)
    imr = pw.load_imr_params(_torch_numpy(ref.IMR()), release.imr)
    assert imr["entangle_0"]["self_attn"]["attn"]["to_v"]["kernel"].shape == (1024, 1024)
    proj = pw.load_face_projection_params(
        {"proj_module." + k: v for k, v in _torch_numpy(ref.ProjPlusModel(768, 512, 1280, 4)).items()},
        release.face_projection)
    assert proj["perceiver_resampler"]["layers_3_attn"]["attn"]["to_k"]["kernel"].shape == (768, 768)
    assert proj["proj"]["fc2"]["kernel"].shape == (1024, 3072)
