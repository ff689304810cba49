"""SDXL single files (Stability's SGM layout, what SDXL fine-tunes ship): diffusers' tiny SDXL
written as one `.safetensors` by hand from the documented key layout (`sdxl_tiny.py`,
`ldm_layout.py`), read through our loaders to the same parameters as its diffusers folder;
the family found by keys, never the file name; an SD2.x file and shapes SDXL's conventions
cannot fit are clear errors naming the file or tensor. Real-size shape inference:
test_sdxl_real_size.py.

Cost: about 20 s on 2 shared cores (torch/diffusers imports, writing the folder and the file; no compile).
"""

import dataclasses
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from dynamicid_jax.models import load_text_encoder, load_unet, load_vae
from dynamicid_jax.models.single_file import SD15, SDXL, detect_family, extract_component
from dynamicid_jax.models.torch_import import WeightImportError, read_safetensors
from sdxl_tiny import write_tiny_sdxl, write_tiny_sdxl_single_file


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_single_file")
    folder = write_tiny_sdxl(root / "pipeline")
    return folder, write_tiny_sdxl_single_file(folder, root / "tiny_sdxl.safetensors")


def assert_same_tree(ours, reference):
    assert jax.tree.structure(ours) == jax.tree.structure(reference)
    jax.tree.map(np.testing.assert_array_equal, ours, reference)


def test_family_is_read_from_the_keys(files, tmp_path):
    _, path = files
    assert detect_family(path) == SDXL
    misnamed = tmp_path / "v1-5-pruned-emaonly.safetensors"  # an SD1.5 name: the keys decide
    shutil.copy(path, misnamed)
    assert detect_family(misnamed) == SDXL
    sd21 = tmp_path / "v2-1_768.safetensors"
    save_file({"cond_stage_model.model.transformer.resblocks.0.ln_1.weight": np.ones(4, np.float32),
               "model.diffusion_model.input_blocks.0.0.weight": np.ones((4, 4, 3, 3), np.float32)}, str(sd21))
    with pytest.raises(WeightImportError, match=r"v2-1_768\.safetensors: a Stable Diffusion 2\.x single file"):
        load_unet(sd21)
    sd15 = tmp_path / "sd15.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(4, np.float32)}, str(sd15))
    assert detect_family(sd15) == SD15
    with pytest.raises(WeightImportError, match="an sd15 single file has no text_encoder_2"):
        extract_component(sd15, "text_encoder_2")


def test_single_file_loads_to_the_folders_parameters(files):
    """Every component of the SGM file equals the diffusers folder's, bit for bit (UNet and
    encoders with the folder's config: the tiny model breaks SDXL's head-size convention)."""
    folder, path = files
    unet, unet_params = load_unet(folder)
    assert_same_tree(load_unet(path, config=unet.config)[1], unet_params)
    for component in ("text_encoder", "text_encoder_2"):
        module, params = load_text_encoder(folder, component=component)
        assert_same_tree(load_text_encoder(path, config=module.config, component=component)[1], params)
    vae, vae_params = load_vae(folder)
    vae_s, vae_params_s = load_vae(path)  # architecture read off the shapes: tiny VAE fits the conventions
    assert vae_s.config == dataclasses.replace(vae.config, scaling_factor=0.13025)  # SDXL's, not SD1.5's 0.18215
    assert_same_tree(vae_params_s, vae_params)


def test_shapes_outside_sdxl_conventions_name_the_tensor(files):
    _, path = files
    with pytest.raises(WeightImportError, match=r"down_blocks\.0\.resnets\.0\.conv1\.weight has width 2, "
                                                r"not a multiple of SDXL's head size 64"):
        load_unet(path)
    with pytest.raises(WeightImportError, match=r"token_embedding\.weight has width 32"):
        load_text_encoder(path, component="text_encoder_2")


def test_an_untransposed_text_projection_is_caught(files, tmp_path):
    """text_projection is square (32 x 32) in the tiny model: only its orientation can be wrong,
    and the parameter comparison above would see it."""
    folder, path = files
    state = read_safetensors(path)
    key = "conditioner.embedders.1.model.text_projection"
    state[key] = np.ascontiguousarray(state[key].T)  # as if written in Linear (P, D) layout
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    module, params = load_text_encoder(folder, component="text_encoder_2")
    loaded = load_text_encoder(broken, config=module.config, component="text_encoder_2")[1]
    assert not np.array_equal(loaded["text_projection"]["kernel"], params["text_projection"]["kernel"])


def test_convert_writes_an_sdxl_folder_from_a_folder_and_a_single_file(tmp_path, capsys):
    """launch/convert.py (`convert.main`) on a diffusers SDXL folder and on its SGM single file
    (the tiny model widened to SDXL's conventions, `CONVENTIONAL`, so the file's architecture
    reads off its shapes): all four components by default, the family recorded in the marker
    (the folder detects as SDXL), every component loading to the source folder's parameters,
    the tokenizers copied (from --tokenizer for the single file, which carries none) and
    loading as the folder's. Without --tokenizer, loading the single file's tokenizers is one
    line naming --tokenizer. Cost: ~25 s on a quiet machine, 70 s at load 10 (torch init, 8 orbax
    writes and 12 reads; no compile)."""
    from dynamicid_jax import base_models, convert
    from dynamicid_jax.errors import MissingFileError
    from dynamicid_jax.models import converted
    from sdxl_tiny import CONVENTIONAL

    folder = write_tiny_sdxl(tmp_path / "pipeline", **CONVENTIONAL)
    path = write_tiny_sdxl_single_file(folder, tmp_path / "small_sdxl.safetensors")
    family = base_models.get("sdxl")
    with pytest.raises(MissingFileError, match=r"--base_model .*small_sdxl.safetensors: no tokenizer/ folder .*"
                                               r"pass --tokenizer DIR"):
        family.load_tokenizer(path)
    reference = {"unet": load_unet(folder)[1], "vae": load_vae(folder)[1],
                 **{c: load_text_encoder(folder, component=c)[1] for c in ("text_encoder", "text_encoder_2")}}
    texts = ["a photo of a cat", ""]
    for source, extra in ((folder, []), (path, ["--tokenizer", str(folder)])):
        out = tmp_path / f"converted_{source.name}"
        assert convert.main(["--base_model", str(source), "--out", str(out), *extra]) == 0
        assert converted.recorded_family(out) == "sdxl" and base_models.detect(out) == "sdxl"
        assert set(converted._read_marker(out)["components"]) == set(reference)
        assert_same_tree(load_unet(out)[1], reference["unet"])
        assert_same_tree(load_vae(out)[1], reference["vae"])
        for component in ("text_encoder", "text_encoder_2"):
            assert_same_tree(load_text_encoder(out, component=component)[1], reference[component])
        for ours, theirs in zip(family.load_tokenizer(out), family.load_tokenizer(folder)):
            np.testing.assert_array_equal(ours(texts), theirs(texts))
    assert (tmp_path / "converted_pipeline" / "scheduler" / "scheduler_config.json").is_file()
