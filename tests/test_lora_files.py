"""Style LoRA files (kohya/sd-scripts and diffusers/PEFT layouts) merged into our UNet and text
encoder equal diffusers' `load_lora_weights` + `fuse_lora(lora_scale=...)` on tiny random
models; unknown keys are an error unless skipped.
"""

import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from safetensors.numpy import save_file  # noqa: E402

from dynamicid_jax.models import load_text_encoder, load_unet  # noqa: E402
from dynamicid_jax.models.lora_files import LoraFileError, component_targets, merge_lora_file  # noqa: E402
from parity import TINY_DEMO_UNET, TINY_DEMO_VAE, rel_l2  # noqa: E402
from test_single_file import TINY_CLIP, randomise_  # noqa: E402

RANK = 4
# The modules community files train: attention projections, transformer proj_in/out and
# feed-forward, resnet convs (LoCon, 3x3) and time projections; CLIP attention and MLP.
UNET_MODULES = re.compile(r"(attn[12]\.to_(q|k|v|out\.0)|proj_(in|out)|ff\.net\.(0\.proj|2)"
                          r"|resnets\.\d+\.(conv1|conv2|time_emb_proj))$")
TEXT_MODULES = re.compile(r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
# Relative L2 of outputs, float32 both sides (the bound); measured about 1e-6.
OUTPUT_RTOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_base")
    unet = diffusers.UNet2DConditionModel(**TINY_DEMO_UNET).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**TINY_CLIP, "hidden_size": 32})).eval()
    randomise_(unet, 0)
    randomise_(text, 1)
    unet.save_pretrained(folder / "unet")
    text.save_pretrained(folder / "text_encoder")
    unet_module, unet_params = load_unet(folder)
    text_module, text_params = load_text_encoder(folder)
    rng = np.random.default_rng(0)
    inputs = dict(sample=rng.standard_normal((2, 8, 8, 4)).astype(np.float32), t=np.array([999.0, 37.5], np.float32),
                  context=rng.standard_normal((2, 7, 32)).astype(np.float32),
                  ids=rng.integers(0, 97, (2, TINY_CLIP["max_position_embeddings"])).astype(np.int32))
    return dict(folder=folder, unet=unet, text=text, inputs=inputs, params={"unet": unet_params, "text_encoder": text_params},
                unet_apply=jax.jit(lambda p, x, t, c: unet_module.apply({"params": p}, x, t, c)),
                text_apply=jax.jit(lambda p, ids: text_module.apply({"params": p}, ids)[0]))


def _random_lora(models, layout: str, seed: int) -> dict:
    """A LoRA over every trainable-looking module, in `layout`'s key names and torch shapes."""
    rng = np.random.default_rng(seed)
    targets = component_targets(models["params"]["unet"], models["params"]["text_encoder"])
    modules = dict(models["unet"].named_modules())
    modules.update({"text_model." + k if not k.startswith("text_model.") else k: v
                    for k, v in models["text"].named_modules()})
    out = {}
    for comp, pattern in (("unet", UNET_MODULES), ("text_encoder", TEXT_MODULES)):
        for name in sorted(targets[comp]):
            if not pattern.search(name):
                continue
            weight = modules[name].weight.detach().numpy()
            down_shape = (RANK,) + weight.shape[1:]
            up_shape = (weight.shape[0], RANK) + (1, 1) * (weight.ndim == 4)
            down = (rng.standard_normal(down_shape) / np.sqrt(np.prod(down_shape[1:]))).astype(np.float32)
            up = (0.3 * rng.standard_normal(up_shape) / np.sqrt(RANK)).astype(np.float32)
            if layout == "kohya":
                stem = ("lora_unet_" if comp == "unet" else "lora_te_") + name.replace(".", "_")
                out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = down, up
                # One network alpha for linear layers and one conv alpha for 3x3 convs, as
                # sd-scripts writes them (network_alpha, conv_alpha).
                out[f"{stem}.alpha"] = np.asarray(2.0 if weight.ndim == 4 and weight.shape[2] > 1 else 8.0, np.float32)
            else:
                out[f"{comp}.{name}.lora_A.weight"], out[f"{comp}.{name}.lora_B.weight"] = down, up
    return out


def _diffusers_outputs(models, path, scale):
    unet = diffusers.UNet2DConditionModel.from_pretrained(models["folder"] / "unet").eval()
    text = transformers.CLIPTextModel.from_pretrained(models["folder"] / "text_encoder").eval()
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**TINY_DEMO_VAE), text_encoder=text, tokenizer=None, unet=unet,
        scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    x = models["inputs"]
    with torch.no_grad():
        eps = unet(torch.from_numpy(x["sample"].transpose(0, 3, 1, 2)), torch.from_numpy(x["t"]),
                   torch.from_numpy(x["context"])).sample.numpy().transpose(0, 2, 3, 1)
        states = text(torch.from_numpy(x["ids"]).long()).last_hidden_state.numpy()
    return eps, states


@pytest.mark.parametrize("layout,scale", [("kohya", 0.8), ("peft", 1.3)])
def test_merge_matches_diffusers_fuse_lora(models, tmp_path, layout, scale):
    path = tmp_path / f"{layout}.safetensors"
    lora = _random_lora(models, layout, seed=len(layout))
    save_file(lora, str(path))
    merged, report = merge_lora_file(models["params"], path, scale)
    pairs = sum(1 for k in lora if k.endswith((".lora_down.weight", ".lora_A.weight")))
    assert report.merged["unet"] + report.merged["text_encoder"] == pairs and not report.dropped
    assert report.merged["unet"] > 0 and report.merged["text_encoder"] > 0
    want_eps, want_states = _diffusers_outputs(models, path, scale)
    x = models["inputs"]
    eps = models["unet_apply"](merged["unet"], x["sample"], x["t"], x["context"])
    states = models["text_apply"](merged["text_encoder"], x["ids"])
    base_eps = models["unet_apply"](models["params"]["unet"], x["sample"], x["t"], x["context"])
    assert rel_l2(base_eps, want_eps) > 100 * OUTPUT_RTOL  # the LoRA changes the output visibly
    assert rel_l2(eps, want_eps) <= OUTPUT_RTOL
    assert rel_l2(states, want_states) <= OUTPUT_RTOL


def test_unknown_keys_are_an_error_unless_skipped(models, tmp_path):
    lora = _random_lora(models, "kohya", seed=5)
    lora["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"] = np.zeros((RANK, 32), np.float32)  # LDM naming
    lora["lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"] = np.ones((), np.float32)  # SDXL's 2nd encoder
    path = tmp_path / "mixed.safetensors"
    save_file(lora, str(path))
    with pytest.raises(LoraFileError, match="2 key.*lora_te2_text_model.*lora_unet_input_blocks_1_1"):
        merge_lora_file(models["params"], path)
    _, report = merge_lora_file(models["params"], path, skip_unknown=True)
    assert report.dropped == sorted(["lora_unet_input_blocks_1_1_proj_in.lora_down.weight",
                                     "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"])


def test_peft_saved_alpha_and_patterns_are_read_from_the_file(models, tmp_path):
    """A diffusers `save_lora_weights` file of PEFT adapters whose lora_alpha != r (plus an
    alpha_pattern, a rank_pattern and rsLoRA's alpha / sqrt(r)) carries its LoraConfig as
    safetensors metadata: the merge reads it, as diffusers does."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    unet = diffusers.UNet2DConditionModel.from_pretrained(models["folder"] / "unet").eval()
    text = transformers.CLIPTextModel.from_pretrained(models["folder"] / "text_encoder").eval()
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                           rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3}),
        "text_encoder": LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "fc1"]),
    }
    gen = torch.Generator().manual_seed(7)
    for model, config in ((unet, configs["unet"]), (text, configs["text_encoder"])):
        inject_adapter_in_model(config, model)  # what diffusers' add_adapter does (transformers' wants a newer peft)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:  # lora_B starts at zero: make the adapter do something
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen) / np.sqrt(p[0].numel()))
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=get_peft_model_state_dict(text),
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    merged, report = merge_lora_file(models["params"], path, 0.7)
    assert report.merged["unet"] > 0 and report.merged["text_encoder"] == 3 * 2
    want_eps, want_states = _diffusers_outputs(models, path, 0.7)
    x = models["inputs"]
    eps = models["unet_apply"](merged["unet"], x["sample"], x["t"], x["context"])
    states = models["text_apply"](merged["text_encoder"], x["ids"])
    assert rel_l2(eps, want_eps) <= OUTPUT_RTOL and rel_l2(states, want_states) <= OUTPUT_RTOL
    # The breakage the metadata prevents: alpha = r for every module (the file's tensors alone).
    from dynamicid_jax.models.lora_files import merge_lora_state_dict
    from dynamicid_jax.models.torch_import import read_state_dict

    naive, _ = merge_lora_state_dict(models["params"], read_state_dict(path), 0.7)
    assert rel_l2(models["unet_apply"](naive["unet"], x["sample"], x["t"], x["context"]), want_eps) > 30 * OUTPUT_RTOL
    assert rel_l2(models["text_apply"](naive["text_encoder"], x["ids"]), want_states) > 30 * OUTPUT_RTOL
