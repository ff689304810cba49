"""SDXL style LoRAs merged into our weights equal diffusers' `StableDiffusionXLPipeline.
load_lora_weights` + `fuse_lora(lora_scale=...)` on diffusers' tiny SDXL (`sdxl_tiny.py`):
kohya files (`lora_unet_` in SGM block names, `lora_te1_` CLIP-L, `lora_te2_` bigG) and
PEFT/diffusers files (`unet.`, `text_encoder.`, `text_encoder_2.`); a LoRA of the other
family is one line naming the file.

Tolerance: relative L2 of the outputs <= 1e-4 in float32 (both sides fold the same rank-4
products into float32 weights, then run the same float32 graph; measured 3.1e-7 .. 5.6e-7
over the three components and both layouts, as test_lora_files.py on SD1.5). The LoRAs cover
every attention, transformer projection, feed-forward and resnet conv/time projection of the
UNet (168 modules) and every attention/MLP projection of both encoders (30 each).

Cost: about 25 s on 2 shared cores (writing the folder, diffusers' loads, three small compiles).
"""

import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from safetensors.numpy import save_file  # noqa: E402

from dynamicid_jax.models import load_text_encoder, load_unet  # noqa: E402
from dynamicid_jax.models.lora_files import LoraFileError, component_targets, merge_lora_file  # noqa: E402
from ldm_layout import unet_to_ldm  # noqa: E402
from parity import rel_l2  # noqa: E402
from sdxl_tiny import write_tiny_sdxl  # noqa: E402
from test_lora_files import RANK, TEXT_MODULES, UNET_MODULES  # noqa: E402

OUTPUT_RTOL = 1e-4
TEXT = ("text_encoder", "text_encoder_2")
KOHYA_TEXT = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = write_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl_lora"))
    unet_module, unet_params = load_unet(folder)
    params, apply = {"unet": unet_params}, {}
    for name in TEXT:
        module, params[name] = load_text_encoder(folder, component=name)
        apply[name] = jax.jit(lambda p, ids, m=module: m.apply({"params": p}, ids))
    rng = np.random.default_rng(0)
    inputs = dict(sample=rng.standard_normal((2, 8, 8, 4)).astype(np.float32), t=np.array([999.0, 37.5], np.float32),
                  context=rng.standard_normal((2, 7, 64)).astype(np.float32),
                  text_embeds=rng.standard_normal((2, 32)).astype(np.float32),
                  time_ids=np.array([[64, 64, 0, 0, 64, 64]] * 2, np.float32),
                  ids=rng.integers(0, 500, (2, 77)).astype(np.int32))
    apply["unet"] = jax.jit(lambda p: unet_module.apply(
        {"params": p}, inputs["sample"], inputs["t"], inputs["context"],
        added_cond={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}))
    return dict(folder=folder, params=params, apply=apply, inputs=inputs, unet_config=unet_module.config)


def _sgm_name(module: str, config) -> str:
    """A diffusers UNet module name in kohya's SGM spelling (`input_blocks_4_1_proj_in`)."""
    up_attention = ["CrossAttn" in t for t in config.up_block_types]
    (key,) = unet_to_ldm({module + ".weight": None}, config.layers_per_block, up_attention)
    return key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")


def _random_lora(models, layout: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    params = models["params"]
    targets = component_targets(params["unet"], params["text_encoder"], params["text_encoder_2"])
    out = {}
    for comp, pattern in (("unet", UNET_MODULES), ("text_encoder", TEXT_MODULES), ("text_encoder_2", TEXT_MODULES)):
        for name in sorted(targets[comp]):
            if not pattern.search(name):
                continue
            path, transform = targets[comp][name]
            kernel = params[comp]
            for p in path:
                kernel = kernel[p]
            # torch shape of the weight: (out, in) of a Dense kernel (in, out); (out, in, kh, kw) of a conv (kh, kw, in, out)
            shape = kernel.shape[::-1] if kernel.ndim == 2 else (kernel.shape[3], kernel.shape[2]) + kernel.shape[:2]
            down_shape = (RANK,) + tuple(shape[1:])
            up_shape = (shape[0], RANK) + (1, 1) * (len(shape) == 4)
            down = (rng.standard_normal(down_shape) / np.sqrt(np.prod(down_shape[1:]))).astype(np.float32)
            up = (0.3 * rng.standard_normal(up_shape) / np.sqrt(RANK)).astype(np.float32)
            if layout == "kohya":
                stem = ("lora_unet_" + _sgm_name(name, models["unet_config"]) if comp == "unet"
                        else KOHYA_TEXT[comp] + name.replace(".", "_"))
                out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = down, up
                out[f"{stem}.alpha"] = np.asarray(2.0 if len(shape) == 4 and shape[2] > 1 else 8.0, np.float32)
            else:
                out[f"{comp}.{name}.lora_A.weight"], out[f"{comp}.{name}.lora_B.weight"] = down, up
    return out


def _diffusers_outputs(models, path, scale):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(models["folder"])
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    x = models["inputs"]
    with torch.no_grad():
        eps = pipe.unet(torch.from_numpy(x["sample"].transpose(0, 3, 1, 2).copy()), torch.from_numpy(x["t"]),
                        torch.from_numpy(x["context"]),
                        added_cond_kwargs={"text_embeds": torch.from_numpy(x["text_embeds"]),
                                           "time_ids": torch.from_numpy(x["time_ids"])}).sample
        ids = torch.from_numpy(x["ids"]).long()
        return {"unet": eps.numpy().transpose(0, 2, 3, 1),
                "text_encoder": pipe.text_encoder(ids).last_hidden_state.numpy(),
                "text_encoder_2": pipe.text_encoder_2(ids).text_embeds.numpy()}


@pytest.mark.parametrize("layout,scale", [("kohya", 0.8), ("peft", 1.3)])
def test_sdxl_lora_matches_diffusers_fuse_lora(models, tmp_path, layout, scale):
    path = tmp_path / f"{layout}.safetensors"
    lora = _random_lora(models, layout, seed=len(layout))
    save_file(lora, str(path))
    merged, report = merge_lora_file(models["params"], path, scale)
    pairs = sum(1 for k in lora if k.endswith((".lora_down.weight", ".lora_A.weight")))
    assert sum(report.merged.values()) == pairs and not report.dropped
    assert min(report.merged.values()) > 0, report.merged  # every component addressed
    theirs = _diffusers_outputs(models, path, scale)
    x = models["inputs"]
    ours = {"unet": models["apply"]["unet"](merged["unet"]),
            "text_encoder": models["apply"]["text_encoder"](merged["text_encoder"], x["ids"])[0],
            "text_encoder_2": models["apply"]["text_encoder_2"](merged["text_encoder_2"], x["ids"])[1]}
    for comp in ours:
        err = rel_l2(ours[comp], theirs[comp])
        assert err <= OUTPUT_RTOL, (comp, err)
        # the LoRA moved the output (else the check would be vacuous)
        base = {"unet": models["apply"]["unet"](models["params"]["unet"]),
                "text_encoder": models["apply"]["text_encoder"](models["params"]["text_encoder"], x["ids"])[0],
                "text_encoder_2": models["apply"]["text_encoder_2"](models["params"]["text_encoder_2"], x["ids"])[1]}
        assert rel_l2(base[comp], theirs[comp]) > 100 * OUTPUT_RTOL, comp


def test_a_lora_of_the_other_family_is_one_line(models, tmp_path):
    one = np.ones((RANK, 32), np.float32)
    sd15 = tmp_path / "sd15_style.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": one,
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": one.T.copy()}, str(sd15))
    with pytest.raises(LoraFileError, match=re.escape(f"{sd15}: an SD1.5 LoRA (lora_te_ keys) on an SDXL base model")):
        merge_lora_file(models["params"], sd15)
    sdxl = tmp_path / "sdxl_style.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": one,
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": one.T.copy()}, str(sdxl))
    sd15_params = {"unet": models["params"]["unet"], "text_encoder": models["params"]["text_encoder"]}
    with pytest.raises(LoraFileError, match=re.escape(f"{sdxl}: an SDXL LoRA")):
        merge_lora_file(sd15_params, sdxl)
