"""Single-file SD1.5 checkpoints: our torch-free renaming against diffusers' own converters,
and the whole file through `load_unet` / `load_vae` / `load_text_encoder` against the
PyTorch models whose weights it holds.

The original (CompVis/LDM) key layout is written here, test-side, from tiny diffusers and
transformers models with random weights; diffusers' converters then check that rename too.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from dynamicid_jax.models import torch_import  # noqa: E402
from dynamicid_jax.models.single_file import extract_component  # noqa: E402
from dynamicid_jax.models.unet import UNetConfig, load_unet  # noqa: E402
from dynamicid_jax.models.vae import AutoencoderKL, VAEConfig, load_vae  # noqa: E402
from parity import TINY_SD15_UNET as TINY_UNET, TINY_VAE, rel_l2  # noqa: E402

TINY_CLIP = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                 bos_token_id=97, eos_token_id=98, pad_token_id=1)


def randomise_(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms and biases matter too
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0)
                        + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p[0].numel()))


# --------------------------------------------------------------- test-side diffusers -> LDM rename

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_ldm(sd: dict, layers_per_block: int, up_has_attention: list[bool]) -> dict:
    """diffusers UNet keys -> `model.diffusion_model.*` (CompVis names)."""
    direct = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    n = layers_per_block
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        if ".".join(p[:-1]) in direct:
            new = f"{direct['.'.join(p[:-1])]}.{p[-1]}"
        elif p[0] == "down_blocks" and p[2] == "resnets":
            new = f"input_blocks.{(n + 1) * int(p[1]) + int(p[3]) + 1}.0.{_RESNET_TO_LDM[p[4]]}.{'.'.join(p[5:])}"
        elif p[0] == "down_blocks" and p[2] == "attentions":
            new = f"input_blocks.{(n + 1) * int(p[1]) + int(p[3]) + 1}.1.{'.'.join(p[4:])}"
        elif p[0] == "down_blocks" and p[2] == "downsamplers":
            new = f"input_blocks.{(n + 1) * (int(p[1]) + 1)}.0.op.{p[-1]}"
        elif p[0] == "mid_block" and p[1] == "resnets":
            new = f"middle_block.{2 * int(p[2])}.{_RESNET_TO_LDM[p[3]]}.{'.'.join(p[4:])}"
        elif p[0] == "mid_block" and p[1] == "attentions":
            new = f"middle_block.1.{'.'.join(p[3:])}"
        elif p[0] == "up_blocks" and p[2] == "resnets":
            new = f"output_blocks.{(n + 1) * int(p[1]) + int(p[3])}.0.{_RESNET_TO_LDM[p[4]]}.{'.'.join(p[5:])}"
        elif p[0] == "up_blocks" and p[2] == "attentions":
            new = f"output_blocks.{(n + 1) * int(p[1]) + int(p[3])}.1.{'.'.join(p[4:])}"
        elif p[0] == "up_blocks" and p[2] == "upsamplers":
            sub = 2 if up_has_attention[int(p[1])] else 1
            new = f"output_blocks.{(n + 1) * int(p[1]) + n}.{sub}.conv.{p[-1]}"
        else:
            raise AssertionError(f"test rename misses {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(sd: dict, num_levels: int) -> dict:
    """diffusers AutoencoderKL keys -> `first_stage_model.*`, mid attention as 1x1 convs."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        if p[1] == "conv_norm_out":
            new = f"{p[0]}.norm_out.{p[-1]}"
        elif p[1] in ("down_blocks", "up_blocks") and p[3] in ("resnets", "downsamplers", "upsamplers"):
            level = int(p[2]) if p[1] == "down_blocks" else num_levels - 1 - int(p[2])
            stage = "down" if p[1] == "down_blocks" else "up"
            if p[3] == "resnets":
                part = "nin_shortcut" if p[5] == "conv_shortcut" else p[5]
                new = f"{p[0]}.{stage}.{level}.block.{p[4]}.{part}.{p[-1]}"
            else:
                new = f"{p[0]}.{stage}.{level}.{stage}sample.conv.{p[-1]}"
        elif p[1] == "mid_block" and p[2] == "resnets":
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}"
        elif p[1] == "mid_block" and p[2] == "attentions":
            new = f"{p[0]}.mid.attn_1.{attn[p[4]]}.{p[-1]}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        else:
            new = key  # encoder/decoder conv_in/conv_out, quant_conv, post_quant_conv
        out["first_stage_model." + new] = value
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Tiny torch models and an original-layout single file holding all three."""
    unet = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    vae = diffusers.AutoencoderKL(**TINY_VAE).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_CLIP)).eval()
    for seed, model in enumerate((unet, vae, text)):
        randomise_(model, seed)
    ldm = {}
    ldm.update(unet_to_ldm(unet.state_dict(), TINY_UNET["layers_per_block"],
                           ["CrossAttn" in t for t in TINY_UNET["up_block_types"]]))
    ldm.update(vae_to_ldm(vae.state_dict(), len(TINY_VAE["block_out_channels"])))
    # SD1.5 files keep transformers' `text_model.` level and the position_ids buffer.
    text_sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.state_dict().items()}
    text_sd["text_model.embeddings.position_ids"] = torch.arange(TINY_CLIP["max_position_embeddings"])[None]
    ldm.update({"cond_stage_model.transformer." + k: v for k, v in text_sd.items()})
    ldm["alphas_cumprod"] = torch.linspace(1, 0, 10)  # other top-level entries real files carry
    ldm = {k: v.contiguous() for k, v in ldm.items()}
    root = tmp_path_factory.mktemp("single_file")
    path = root / "tiny_sd15.safetensors"
    save_file(ldm, str(path))
    return dict(unet=unet, vae=vae, text=text, text_sd=text_sd, ldm=ldm, path=path, root=root)


def assert_same_state_dict(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)


def test_unet_keys_match_diffusers_converter(reference):
    ours = extract_component(reference["path"], "unet")
    theirs = sfu.convert_ldm_unet_checkpoint(reference["ldm"], dict(reference["unet"].config))
    assert_same_state_dict(ours, theirs)
    assert_same_state_dict(ours, reference["unet"].state_dict())  # and the test-side rename is right


def test_vae_keys_match_diffusers_converter(reference):
    ours = extract_component(reference["path"], "vae")
    theirs = sfu.convert_ldm_vae_checkpoint(reference["ldm"], dict(reference["vae"].config))
    assert_same_state_dict(ours, theirs)
    assert_same_state_dict(ours, reference["vae"].state_dict())
    assert ours["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2  # 1x1 conv squeezed to Linear


def test_text_encoder_keys_match_diffusers_converter(reference):
    ours = extract_component(reference["path"], "text_encoder")
    theirs = sfu.convert_ldm_clip_checkpoint(reference["ldm"])
    assert_same_state_dict(ours, theirs)
    assert_same_state_dict(ours, reference["text_sd"])


def test_ckpt_pickle_reads_the_same(reference):
    path = reference["root"] / "tiny_sd15.ckpt"
    vae_only = {k: v for k, v in reference["ldm"].items() if k.startswith("first_stage_model.")}
    torch.save({"state_dict": vae_only, "global_step": 1}, path)
    jax.tree.map(np.testing.assert_array_equal, extract_component(path, "vae"),
                 extract_component(reference["path"], "vae"))


def test_text_model_level_added_when_absent(reference, tmp_path):
    older = {k.replace("transformer.text_model.", "transformer."): v for k, v in reference["ldm"].items()}
    save_file(older, str(tmp_path / "old.safetensors"))
    assert sorted(extract_component(tmp_path / "old.safetensors", "text_encoder")) == sorted(reference["text_sd"])


def test_missing_component_is_named(reference, tmp_path):
    unet_only = {k: v for k, v in reference["ldm"].items() if k.startswith("model.diffusion_model.")}
    save_file(unet_only, str(tmp_path / "unet_only.safetensors"))
    with pytest.raises(torch_import.WeightImportError, match="no vae weights.*first_stage_model"):
        extract_component(tmp_path / "unet_only.safetensors", "vae")
    with pytest.raises(torch_import.WeightImportError, match="no vae weights"):
        load_vae(tmp_path / "unet_only.safetensors", config=VAEConfig.from_diffusers(TINY_VAE))
    with pytest.raises(ValueError, match="component must be one of"):
        extract_component(tmp_path / "unet_only.safetensors", "safety_checker")


def test_unknown_key_is_an_error_not_dropped(reference, tmp_path):
    extra = dict(reference["ldm"])
    extra["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(4, 4)
    extra["first_stage_model.encoder.mid.attn_1.rel_pos"] = torch.zeros(3)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(torch_import.WeightImportError, match="label_emb.0.0.weight"):
        extract_component(tmp_path / "extra.safetensors", "unet")
    with pytest.raises(torch_import.WeightImportError, match="rel_pos"):
        extract_component(tmp_path / "extra.safetensors", "vae")


def test_vae_from_single_file_matches_diffusers(reference):
    module, params = load_vae(reference["path"], config=VAEConfig.from_diffusers(TINY_VAE))
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
    mean, _ = jax.jit(lambda p, x: module.apply({"params": p}, x, method=AutoencoderKL.encode))(params, images)
    decoded = jax.jit(lambda p, z: module.apply({"params": p}, z, method=AutoencoderKL.decode))(params, mean)
    with torch.no_grad():
        vae = reference["vae"]
        ref_mean = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean
        ref_decoded = vae.decode(ref_mean).sample
    assert rel_l2(mean, ref_mean.permute(0, 2, 3, 1).numpy()) <= 1e-4
    assert rel_l2(decoded, ref_decoded.permute(0, 2, 3, 1).numpy()) <= 1e-4


def test_unet_from_single_file_matches_diffusers(reference):
    config = UNetConfig.from_diffusers(dict(reference["unet"].config))
    module, params = load_unet(reference["path"], config=config)
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, 16, 24, 4), dtype=np.float32)
    context = rng.standard_normal((2, 7, 32), dtype=np.float32)
    timesteps = np.array([10.0, 700.0], np.float32)
    out = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))(params, sample, timesteps, context)
    with torch.no_grad():
        ref = reference["unet"](torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(timesteps),
                                torch.from_numpy(context)).sample.permute(0, 2, 3, 1).numpy()
    assert rel_l2(out, ref) <= 1e-4


def test_text_encoder_from_single_file_matches_transformers(reference):
    from dynamicid_jax.models import clip, clip_weights
    config = clip.CLIPTextConfig.from_transformers(reference["text"].config.to_dict())
    module, params = clip_weights.load_text_encoder(reference["path"], config=config)
    ids = np.array([[97, 5, 17, 42, 98, 1, 1, 1], [97, 63, 98, 1, 1, 1, 1, 1]], np.int32)
    outputs = module.apply({"params": params}, ids)
    hidden = outputs[0] if isinstance(outputs, (tuple, list)) else getattr(outputs, "last_hidden_state", outputs)
    with torch.no_grad():
        ref = reference["text"](torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert rel_l2(hidden, ref) <= 1e-4


def test_half_precision_files_widen_exactly(reference, tmp_path):
    """fp16 and bf16 single files (common for fine-tunes) read torch-free, widened to float32."""
    for dtype in (torch.float16, torch.bfloat16):
        half = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in reference["ldm"].items()
                if k.startswith("first_stage_model.")}
        path = tmp_path / f"{str(dtype)[6:]}.safetensors"
        save_file(half, str(path))
        theirs = sfu.convert_ldm_vae_checkpoint({k: v.float() for k, v in half.items()},
                                                dict(reference["vae"].config))
        ours = extract_component(path, "vae")
        assert all(v.dtype == np.float32 for v in ours.values())
        assert_same_state_dict(ours, theirs)
