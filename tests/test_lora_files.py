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
from parity import TINY_DEMO_VAE, TINY_LDM_UNET, rel_l2  # noqa: E402
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
    unet = diffusers.UNet2DConditionModel(**TINY_LDM_UNET).eval()
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


def _random_lora(models, layout: str, seed: int, unet_modules: re.Pattern = UNET_MODULES) -> dict:
    """A LoRA over every trainable-looking module, in `layout`'s key names and torch shapes."""
    rng = np.random.default_rng(seed)
    targets = component_targets(models["params"]["unet"], models["params"]["text_encoder"])
    modules = dict(models["unet"].named_modules())
    modules.update({"text_model." + k if not k.startswith("text_model.") else k: v
                    for k, v in models["text"].named_modules()})
    out = {}
    for comp, pattern in (("unet", unet_modules), ("text_encoder", TEXT_MODULES)):
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
    lora["lora_unet_label_emb_0_0.lora_down.weight"] = np.zeros((RANK, 32), np.float32)  # SDXL's added MLP
    lora["lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"] = np.ones((), np.float32)  # SDXL's 2nd encoder
    path = tmp_path / "mixed.safetensors"
    save_file(lora, str(path))
    with pytest.raises(LoraFileError, match="2 key.*lora_te2_text_model.*lora_unet_label_emb_0_0"):
        merge_lora_file(models["params"], path)
    _, report = merge_lora_file(models["params"], path, skip_unknown=True)
    assert report.dropped == sorted(["lora_unet_label_emb_0_0.lora_down.weight",
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


def test_kohya_file_in_ldm_naming_matches_diffusers(models, tmp_path):
    """kohya UNet keys in the original LDM naming (input_blocks / middle_block / output_blocks,
    resnet in_layers/out_layers/emb_layers/skip_connection, samplers' op/conv, time_embed)
    merge exactly as the same file in diffusers naming, and as diffusers' own conversion
    (`lora_state_dict(..., unet_config=...)`, which SD1.5's load_lora_weights does not call)."""
    from flax import traverse_util

    from ldm_layout import unet_to_ldm

    modules = re.compile(UNET_MODULES.pattern + r"|(downsamplers\.0\.conv|upsamplers\.0\.conv|conv_shortcut"
                         r"|time_embedding\.linear_1)$")
    config = models["unet"].config
    up_attention = [t.startswith("CrossAttn") for t in config.up_block_types]
    ldm, named = {}, {}
    for key, value in _random_lora(models, "peft", seed=11, unet_modules=modules).items():
        comp, rest = key.split(".", 1)
        module, role = rest.rsplit(".lora_", 1)
        if comp != "unet":
            continue
        ldm_name = next(iter(unet_to_ldm({module + ".weight": value}, config.layers_per_block, up_attention)))
        for out, stem in ((ldm, ldm_name[len("model.diffusion_model."):-len(".weight")]), (named, module)):
            stem = "lora_unet_" + stem.replace(".", "_")
            out[f"{stem}.lora_{'down' if role == 'A.weight' else 'up'}.weight"] = value
            out[f"{stem}.alpha"] = np.asarray(2.0, np.float32)
    keys = " ".join(ldm)
    for part in ("input_blocks_1_1_proj_in", "input_blocks_2_0_op", "middle_block_0_in_layers_2",
                 "middle_block_1_transformer_blocks_0_attn2_to_k", "output_blocks_1_1_conv", "output_blocks_3_2_conv",
                 "skip_connection", "emb_layers_1", "out_layers_3", "time_embed_0"):
        assert part in keys
    for name, lora in (("ldm", ldm), ("named", named)):
        save_file(lora, str(tmp_path / f"{name}.safetensors"))
    merged, report = merge_lora_file(models["params"], tmp_path / "ldm.safetensors", 0.9)
    want, _ = merge_lora_file(models["params"], tmp_path / "named.safetensors", 0.9)
    assert report.merged["unet"] == len(ldm) // 3 and not report.dropped
    flat, flat_want = traverse_util.flatten_dict(merged["unet"]), traverse_util.flatten_dict(want["unet"])
    assert all(np.array_equal(flat[k], flat_want[k]) for k in flat_want)

    # diffusers maps output_blocks_N_1_conv to attentions.1.conv even where slot 1 is the
    # upsampler (a level without attention): leave that module out of its file.
    partial = {k: v for k, v in ldm.items() if not k.startswith("lora_unet_output_blocks_1_1_conv.")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    merged, _ = merge_lora_file(models["params"], tmp_path / "partial.safetensors", 0.9)
    state_dict, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(
        str(tmp_path / "partial.safetensors"), unet_config=config)
    unet = diffusers.UNet2DConditionModel.from_pretrained(models["folder"] / "unet").eval()
    diffusers.StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet)
    unet.fuse_lora(lora_scale=0.9)
    x = models["inputs"]
    with torch.no_grad():
        want_eps = unet(torch.from_numpy(x["sample"].transpose(0, 3, 1, 2)), torch.from_numpy(x["t"]),
                        torch.from_numpy(x["context"])).sample.numpy().transpose(0, 2, 3, 1)
    assert rel_l2(models["unet_apply"](merged["unet"], x["sample"], x["t"], x["context"]), want_eps) <= OUTPUT_RTOL


def test_peft_folder_with_adapter_config_equals_peft_merge_and_unload(models, tmp_path):
    """A PEFT `save_pretrained` folder of a UNet adapter (adapter_model.safetensors with
    `base_model.model.*` keys + adapter_config.json, lora_alpha != r) merges as PEFT's own
    merge_and_unload does."""
    from peft import LoraConfig, get_peft_model

    unet = diffusers.UNet2DConditionModel.from_pretrained(models["folder"] / "unet").eval()
    peft_unet = get_peft_model(unet, LoraConfig(r=4, lora_alpha=10, target_modules=["to_q", "to_v", "conv2"],
                                                alpha_pattern={"to_v": 2}))
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in peft_unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen) / np.sqrt(p[0].numel()))
    peft_unet.save_pretrained(tmp_path / "adapter")
    merged, report = merge_lora_file(models["params"], tmp_path / "adapter" / "adapter_model.safetensors")
    assert report.merged["unet"] > 0 and report.merged["text_encoder"] == 0
    x = models["inputs"]
    with torch.no_grad():
        want = peft_unet.merge_and_unload()(torch.from_numpy(x["sample"].transpose(0, 3, 1, 2)), torch.from_numpy(x["t"]),
                                            torch.from_numpy(x["context"])).sample.numpy().transpose(0, 2, 3, 1)
    assert rel_l2(models["unet_apply"](merged["unet"], x["sample"], x["t"], x["context"]), want) <= OUTPUT_RTOL


def _old_diffusers_key(key: str, prefixed: bool) -> str:
    """A PEFT-layout key of `_random_lora` in diffusers' older layout: attention projections as
    attention-processor LoRAs (`attn1.processor.to_q_lora.down.weight`), other text-encoder
    modules as patched linears (`fc1.lora_linear_layer.down.weight`); None for modules the
    older UNet layout had no key for (proj_in/out, feed-forward, convs)."""
    comp, rest = key.split(".", 1)
    module, role = rest.rsplit(".lora_", 1)
    role = "down" if role == "A.weight" else "up"
    if comp == "unet":
        match = re.fullmatch(r"(.+attn[12])\.to_(q|k|v|out)(?:\.0)?", module)
        if not match:
            return None
        return ("unet." if prefixed else "") + f"{match[1]}.processor.to_{match[2]}_lora.{role}.weight"
    return f"text_encoder.{module}.lora_linear_layer.{role}.weight"


@pytest.mark.parametrize("prefixed", [True, False], ids=["unet.-prefixed", "save_attn_procs"])
def test_older_diffusers_layout_matches_diffusers(models, tmp_path, prefixed):
    """diffusers' older LoRA layout (attention processors `...attn1.processor.to_q_lora.down.weight`,
    text encoder `...q_proj.lora_linear_layer.down.weight`), with and without the `unet.`
    prefix (save_attn_procs wrote UNet-only files without it), merges as diffusers' own
    loader does, within OUTPUT_RTOL. Cost: two diffusers loads, ~5 s."""
    lora = {}
    for key, value in _random_lora(models, "peft", seed=13).items():
        old = _old_diffusers_key(key, prefixed)
        if old is not None and (prefixed or not old.startswith("text_encoder.")):  # save_attn_procs: UNet only
            lora[old] = value
    path = tmp_path / "old.safetensors"
    save_file(lora, str(path))
    merged, report = merge_lora_file(models["params"], path, 0.6)
    assert report.merged["unet"] == sum(".to_q_lora.down." in k for k in lora) * 4 > 0 and not report.dropped
    assert report.merged["text_encoder"] == sum(k.startswith("text_encoder.") for k in lora) // 2
    x = models["inputs"]
    eps = models["unet_apply"](merged["unet"], x["sample"], x["t"], x["context"])
    base_eps = models["unet_apply"](models["params"]["unet"], x["sample"], x["t"], x["context"])
    if prefixed:
        want_eps, want_states = _diffusers_outputs(models, path, 0.6)
        assert report.merged["text_encoder"] > 0
        assert rel_l2(models["text_apply"](merged["text_encoder"], x["ids"]), want_states) <= OUTPUT_RTOL
    else:  # the pipeline's loader skips keys without a component prefix; the UNet's own loader reads them
        unet = diffusers.UNet2DConditionModel.from_pretrained(models["folder"] / "unet").eval()
        unet.load_lora_adapter(str(path), prefix=None)
        unet.fuse_lora(lora_scale=0.6)
        with torch.no_grad():
            want_eps = unet(torch.from_numpy(x["sample"].transpose(0, 3, 1, 2)), torch.from_numpy(x["t"]),
                            torch.from_numpy(x["context"])).sample.numpy().transpose(0, 2, 3, 1)
    assert rel_l2(base_eps, want_eps) > 100 * OUTPUT_RTOL  # the LoRA changes the output visibly
    assert rel_l2(eps, want_eps) <= OUTPUT_RTOL
