"""SDXL's models against diffusers/transformers on diffusers' own tiny SDXL (`sdxl_tiny.py`),
saved by diffusers' save_pretrained and read through OUR loaders: the UNet with the text_time
micro-conditioning (time ids and pooled text), both text encoders (every hidden state, the
pooled/projected vector), and deliberate breakages the checks must catch.

Tolerance: relative L2 error <= 1e-4 in float32. Both sides compute the same float32 graph,
differing only in summation order and kernel implementations (a few float32 ulp, 6e-8 each,
per operation); tens of operations in sequence, and the residual streams do not amplify them,
so errors stay around 1e-6 (measured: UNet 5.1e-7 with time ids up to 1344, encoders 3.0e-7).
The largest term is the time ids' sinusoidal embedding: an argument of 1024 rad carries an
absolute rounding of 1024 x 6e-8 = 6e-5 in each sine, which add_embedding's two dense layers
average over 48 inputs and then add to the timestep embedding. The breakages move the
output far more (measured: time ids in the wrong order 0.036, another pooled vector 0.052,
text_projection transposed 1.3, encoder 1's pooled vector for encoder 2's 1.2), so
BROKEN = 1e-2 sits two orders above the bound and below every breakage.

Cost: about 40 s on 2 shared cores (torch/diffusers imports, writing the folder, three small XLA
compiles: the UNet, each encoder).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dynamicid_jax.base_models import sd15
from dynamicid_jax.models import load_text_encoder, load_unet
from dynamicid_jax.tokenizer import CLIPTokenizer
from parity import rel_l2
from sdxl_tiny import TOKENIZER_2_PAD, write_tiny_sdxl

RTOL = 1e-4
BROKEN = 1e-2  # a breakage must move the output by at least this (relative L2)
PROMPTS = ["a photo of the person, happy face", "front view", ""]
# Rows: SDXL's default for a 1024 px request, then a cropped 832 x 1216 one: (orig h, w, crop y, x, target h, w).
TIME_IDS = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 32, 832, 1216]], np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


def unet_inputs():
    rng = np.random.default_rng(0)
    return dict(
        sample=rng.standard_normal((2, 8, 12, 4), dtype=np.float32),  # NHWC, non-square latents
        timesteps=np.array([999.0, 21.0], np.float32),
        context=rng.standard_normal((2, 77, 64), dtype=np.float32),  # both encoders: 32 + 32
        text_embeds=rng.standard_normal((2, 32), dtype=np.float32),
        time_ids=TIME_IDS,
    )


@pytest.fixture(scope="module")
def unet_case(folder):
    """(reference output NHWC, our apply(params, added_cond), our params)."""
    from diffusers import UNet2DConditionModel as TorchUNet

    x = unet_inputs()
    ref = TorchUNet.from_pretrained(folder, subfolder="unet").eval()
    with torch.no_grad():
        out = ref(torch.from_numpy(x["sample"]).permute(0, 3, 1, 2), torch.from_numpy(x["timesteps"]),
                  torch.from_numpy(x["context"]),
                  added_cond_kwargs={"text_embeds": torch.from_numpy(x["text_embeds"]),
                                     "time_ids": torch.from_numpy(x["time_ids"])}).sample
    module, params = load_unet(folder)
    apply = jax.jit(lambda p, added: module.apply({"params": p}, x["sample"], x["timesteps"], x["context"],
                                                  added_cond=added))
    return out.permute(0, 2, 3, 1).numpy(), apply, params, module


def test_unet_config_reads_sdxl_fields(unet_case):
    config = unet_case[3].config
    assert config.num_attention_heads == (2, 4)  # diffusers' attention_head_dim holds head counts
    assert config.down_transformer_layers(1) == (2,) and config.up_transformer_layers(0) == (2, 2)  # 1 layer per block
    assert config.mid_transformer_layers == 2
    assert (config.addition_embed_type, config.addition_time_embed_dim,
            config.projection_class_embeddings_input_dim) == ("text_time", 8, 80)


def test_unet_matches_diffusers_with_time_ids_and_pooled_text(unet_case):
    ref, apply, params, _ = unet_case
    x = unet_inputs()
    err = rel_l2(apply(params, {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}), ref)
    assert err <= RTOL, err
    # Breakages the check must see: time ids in the wrong order (target before original
    # size), and the pooled text of another encoder (here: another row's).
    swapped = np.concatenate([x["time_ids"][:, 4:], x["time_ids"][:, 2:4], x["time_ids"][:, :2]], axis=1)
    assert rel_l2(apply(params, {"text_embeds": x["text_embeds"], "time_ids": swapped}), ref) > BROKEN
    assert rel_l2(apply(params, {"text_embeds": x["text_embeds"][::-1], "time_ids": x["time_ids"]}), ref) > BROKEN


def test_unet_added_cond_must_match_the_config(folder, unet_case):
    """text_time UNet without added_cond, SD1.5 UNet with it, missing keys: clear ValueErrors
    (raised while tracing, before any compile)."""
    module, params = unet_case[3], unet_case[2]
    x = unet_inputs()
    args = (x["sample"], x["timesteps"], x["context"])
    with pytest.raises(ValueError, match="added_cond is missing"):
        module.apply({"params": params}, *args)
    with pytest.raises(ValueError, match="exactly text_embeds and time_ids"):
        module.apply({"params": params}, *args, added_cond={"text_embeds": x["text_embeds"]})
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim 80"):
        module.apply({"params": params}, *args, added_cond={"text_embeds": x["text_embeds"],
                                                            "time_ids": x["time_ids"][:, :5]})
    plain = module.clone(config=dataclasses.replace(sd15.unet_config(), cross_attention_dim=64))
    with pytest.raises(ValueError, match="added_cond is given"):
        plain.init(jax.random.key(0), *args, added_cond={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]})


@pytest.fixture(scope="module")
def encoders(folder):
    """{component: (reference outputs, our (context, pooled, hidden_states), our module, params)}."""
    ids = {name: CLIPTokenizer.from_folder(folder, subfolder=sub)(PROMPTS)
           for name, sub in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))}
    out = {}
    for name, cls in (("text_encoder", transformers.CLIPTextModel),
                      ("text_encoder_2", transformers.CLIPTextModelWithProjection)):
        ref = cls.from_pretrained(folder, subfolder=name).eval()
        with torch.no_grad():
            ref_out = ref(torch.from_numpy(ids[name].astype(np.int64)), output_hidden_states=True)
        module, params = load_text_encoder(folder, component=name)
        ours = jax.jit(lambda p, i, m=module: m.apply({"params": p}, i, output_hidden_states=True))(params, ids[name])
        out[name] = (ref_out, ours, module, params, ids[name])
    return out


def test_tokenizers_pad_with_their_own_tokens(folder, encoders):
    """tokenizer_2 pads with "!" (its own files say so), tokenizer 1 with <|endoftext|>."""
    tok_1, tok_2 = (CLIPTokenizer.from_folder(folder, subfolder=sub) for sub in ("tokenizer", "tokenizer_2"))
    assert tok_1.pad_id == tok_1.eos_id and tok_2.pad_id == tok_2.vocab[TOKENIZER_2_PAD] != tok_2.eos_id
    ids_1, ids_2 = encoders["text_encoder"][4], encoders["text_encoder_2"][4]
    assert (ids_1[2, 1:] == tok_1.eos_id).all()  # "" -> BOS, EOS, then <|endoftext|> padding
    assert ids_2[2, 1] == tok_2.eos_id and (ids_2[2, 2:] == tok_2.pad_id).all()
    for sub, ours in (("tokenizer", ids_1), ("tokenizer_2", ids_2)):  # transformers on the saved files
        ref = transformers.CLIPTokenizer.from_pretrained(folder, subfolder=sub)
        np.testing.assert_array_equal(ours, ref(PROMPTS, padding="max_length", max_length=77,
                                                truncation=True, return_tensors="np").input_ids)


def test_text_encoders_match_transformers(encoders):
    for name, (ref, (context, pooled, states), module, _, _) in encoders.items():
        ref_pooled = ref.text_embeds if name == "text_encoder_2" else ref.pooler_output
        errors = [rel_l2(ours, r.numpy()) for ours, r in zip(states, ref.hidden_states)]
        assert len(states) == len(ref.hidden_states) == 4 and max(errors) <= RTOL, (name, errors)
        assert rel_l2(context, ref.last_hidden_state.numpy()) <= RTOL
        assert rel_l2(pooled, ref_pooled.numpy()) <= RTOL, name
        # SDXL's context (clip_skip None): the penultimate raw hidden state, no final LayerNorm.
        assert rel_l2(states[-2], ref.hidden_states[-2].numpy()) <= RTOL
    assert encoders["text_encoder_2"][2].config.projection_dim == 32
    assert encoders["text_encoder"][2].config.projection_dim is None


def test_breakages_of_the_pooled_vector_are_caught(encoders):
    ref_2, _, module_2, params_2, ids_2 = encoders["text_encoder_2"]
    target = ref_2.text_embeds.numpy()
    # text_projection transposed on import (square here, so the shapes cannot catch it).
    kernel = params_2["text_projection"]["kernel"]
    transposed = {**params_2, "text_projection": {"kernel": np.ascontiguousarray(kernel.T)}}
    _, pooled_t = module_2.apply({"params": transposed}, ids_2)
    assert rel_l2(pooled_t, target) > BROKEN
    # The pooled vector taken from encoder 1 instead of encoder 2.
    assert rel_l2(encoders["text_encoder"][1][1], target) > BROKEN


def test_text_encoder_2_must_have_a_projection(folder):
    from dynamicid_jax.models.torch_import import WeightImportError

    # encoder 1's folder (a CLIPTextModel) offered as text_encoder_2
    with pytest.raises(WeightImportError, match="not a CLIPTextModelWithProjection"):
        load_text_encoder(folder / "text_encoder", component="text_encoder_2")


def test_transformer_layer_counts_as_diffusers_reads_them():
    """An int, one per level, or one per resnet (then the up levels' must be given: diffusers'
    rule); the mid block takes the last level's first count. No model is built."""
    from dynamicid_jax.models.unet_config import UNetConfig

    base = dict(block_out_channels=(64, 128), cross_attention_dim=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), num_attention_heads=(1, 2), norm_num_groups=8)
    per_level = UNetConfig(**base, transformer_layers_per_block=(1, 3))
    assert per_level.down_transformer_layers(1) == (3, 3) and per_level.up_transformer_layers(0) == (3, 3, 3)
    assert per_level.mid_transformer_layers == 3
    with pytest.raises(ValueError, match="give reverse_transformer_layers_per_block"):
        UNetConfig(**base, transformer_layers_per_block=((1, 1), (2, 4)))
    per_resnet = UNetConfig(**base, transformer_layers_per_block=[[1, 1], [2, 4]],  # lists, as JSON gives them
                            reverse_transformer_layers_per_block=[[5, 6, 7], [1, 1, 1]])
    assert per_resnet.down_transformer_layers(1) == (2, 4) and per_resnet.up_transformer_layers(0) == (5, 6, 7)
    assert per_resnet.mid_transformer_layers == 2 and hash(per_resnet)
    with pytest.raises(ValueError, match=r"reverse_transformer_layers_per_block\[0\].*need 3 counts"):
        UNetConfig(**base, transformer_layers_per_block=((1, 1), (2, 4)),
                   reverse_transformer_layers_per_block=((5, 6), (1, 1)))
    with pytest.raises(ValueError, match="addition_embed_type: unsupported 'text'"):
        UNetConfig.from_diffusers({"addition_embed_type": "text", "addition_time_embed_dim": 8,
                                   "projection_class_embeddings_input_dim": 80})
    with pytest.raises(ValueError, match="num_attention_heads is set"):
        UNetConfig.from_diffusers({"num_attention_heads": [5, 10, 20]})
