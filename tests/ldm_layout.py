"""Test-side writers of the original single-file layouts, from diffusers/transformers state
dicts: CompVis/LDM (SD1.5: UNet, VAE) and Stability's SGM (SDXL: the same UNet and VAE names,
plus `label_emb` and OpenCLIP bigG). Written by hand from the documented key layouts, the
inverse of `dynamicid_jax/models/single_file.py`, so a renaming bug on our side shows.
"""

import numpy as np

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_ldm(sd: dict, layers_per_block: int, up_has_attention: list[bool]) -> dict:
    """diffusers UNet keys -> `model.diffusion_model.*` (CompVis names)."""
    direct = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL's
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


def open_clip_from_transformers(sd: dict) -> dict:
    """transformers CLIPTextModelWithProjection keys -> OpenCLIP names (SDXL's
    `conditioner.embedders.1.model.*`, prefix not added): q/k/v fused into `attn.in_proj_*`,
    `text_projection` stored as the (D, P) matrix OpenCLIP multiplies by, a `logit_scale`."""
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    direct = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
              "text_model.embeddings.position_embedding.weight": "positional_embedding",
              "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    out = {"logit_scale": np.asarray(np.log(1 / 0.07), np.float32)}
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")})
    for key, value in sd.items():
        if key in direct:
            out[direct[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = np.ascontiguousarray(np.asarray(value).T)
        elif key.startswith("text_model.encoder.layers.") and ".self_attn." in key and "out_proj" not in key:
            continue  # fused below
        elif key.startswith("text_model.encoder.layers."):
            _, _, _, n, *rest = key.split(".")
            name = ".".join(rest)
            for old, new in parts.items():
                if name.startswith(old + "."):
                    name = new + name[len(old):]
            out[f"transformer.resblocks.{n}.{name}"] = value
        elif not key.endswith("position_ids"):
            raise AssertionError(f"test rename misses {key}")
    for n in layers:
        for leaf in ("weight", "bias"):
            qkv = [np.asarray(sd[f"text_model.encoder.layers.{n}.self_attn.{p}_proj.{leaf}"]) for p in "qkv"]
            out[f"transformer.resblocks.{n}.attn.in_proj_{leaf}"] = np.concatenate(qkv, axis=0)
    return out
