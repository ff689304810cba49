"""The SD1.5 VAE (diffusers' AutoencoderKL) in Flax linen, channels-last, and its loader.

    images (B, H, W, 3) in [-1, 1] --encode--> mean, logvar (B, H/f, W/f, latent_channels)
    latent = sample_latent(mean, logvar, rng) * scaling_factor     # what the UNet sees
    decode(latent / scaling_factor) --> images (B, H, W, 3)         # decode takes unscaled latents

f = 2 ** (len(block_out_channels) - 1) (8 for SD1.5). Param names mirror diffusers' module
names with list indices joined by an underscore (`encoder/down_blocks_0/resnets_1/conv1/kernel`,
`decoder/up_blocks_0/upsamplers_0/conv/kernel`, `encoder/mid_block/attentions_0/to_q/kernel`),
so the import is a rename plus layout transposes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax.models import single_file_configs, torch_import, weight_sources
from dynamicid_jax.models.layers import Attention, ResnetBlock2D, conv2d, group_norm

Dtype = Any

# diffusers' DiagonalGaussianDistribution clamps logvar to this range before exp.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# Every VAE norm in diffusers' AutoencoderKL uses this epsilon (GroupNorm, resnets, attention).
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Static shape of an AutoencoderKL (the diffusers config fields that change the graph)
    and its latent scale. The widths have no default (a family or the files state them)."""

    block_out_channels: tuple[int, ...]
    in_channels: int = 3
    out_channels: int = 3
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    # The UNet sees latents times this. None: the files state none (a config.json without the
    # key); the base-model family then supplies its format's default (`base_models.sd15`).
    scaling_factor: Optional[float] = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """Build from a diffusers `vae/config.json` dict; rejects variants this module lacks."""
        n = len(config["block_out_channels"])
        expected = {
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
        }
        for key, want in expected.items():
            if key in config and list(config[key]) != want:
                raise ValueError(f"VAE config: {key}={config[key]!r} is not supported (only {want})")
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"VAE config: act_fn={config['act_fn']!r} is not supported (only 'silu')")
        if config.get("shift_factor") not in (None, 0, 0.0):
            raise ValueError(f"VAE config: shift_factor={config['shift_factor']!r} is not supported (SD1.5 has none)")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        return cls(**kwargs)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """One draw from the diagonal Gaussian N(mean, exp(logvar)); shapes (B, h, w, C) in and out.

    Unscaled: multiply by the config's `scaling_factor` before feeding the UNet.
    """
    noise = jax.random.normal(rng, mean.shape, jnp.float32)
    return mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise


def _group_norm(groups: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    """The VAE's GroupNorm: eps NORM_EPS, flax's fast variance."""
    return group_norm(groups, NORM_EPS, dtype, param_dtype, name, two_pass=False)


def _resnet(channels: int, groups: int, name: str, **kw) -> ResnetBlock2D:
    """The VAE's resnet: no time embedding, the VAE's GroupNorm."""
    return ResnetBlock2D(channels, groups, NORM_EPS, two_pass_norm=False, name=name, **kw)


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: GroupNorm, one head over all channels, residual.

    (B, H, W, C) -> (B, H, W, C). The shared `Attention` shares this module's scope, so its
    projections sit beside `group_norm` (`attentions_0/to_q`), as in diffusers.
    """

    channels: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.group_norm = _group_norm(self.groups, self.dtype, self.param_dtype, "group_norm")
        self.attention = Attention(num_heads=1, head_dim=self.channels, qkv_bias=True, out_bias=True,
                                   dtype=self.dtype, param_dtype=self.param_dtype)
        nn.share_scope(self, self.attention)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        return x + self.attention(tokens).reshape(b, h, w, c).astype(x.dtype)


class MidBlock(nn.Module):
    """resnets_0, attentions_0 (optional), resnets_1 at constant width: (B, H, W, C) -> same."""

    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = _resnet(c, self.groups, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = SpatialSelfAttention(c, self.groups, name="attentions_0", **kw)(x)
        return _resnet(c, self.groups, name="resnets_1", **kw)(x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right (diffusers padding=0)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv2d(x.shape[-1], 3, self.dtype, self.param_dtype, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (torch `interpolate(scale_factor=2, mode="nearest")`), then 3x3 conv."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv2d(x.shape[-1], 3, self.dtype, self.param_dtype, "conv")(x)


class _DownEncoderBlock(nn.Module):
    """`num_layers` resnets then an optional Downsample: (B, H, W, Cin) -> (B, H/2?, W/2?, channels)."""

    channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = _resnet(self.channels, self.groups, name=f"resnets_{j}", **kw)(x)
        if self.add_downsample:
            x = Downsample(name="downsamplers_0", **kw)(x)
        return x


class _UpDecoderBlock(nn.Module):
    """`num_layers` resnets then an optional Upsample: (B, H, W, Cin) -> (B, 2H?, 2W?, channels)."""

    channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = _resnet(self.channels, self.groups, name=f"resnets_{j}", **kw)(x)
        if self.add_upsample:
            x = Upsample(name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """images (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv2d(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
        for i, channels in enumerate(cfg.block_out_channels):
            x = _DownEncoderBlock(channels, cfg.layers_per_block, cfg.norm_num_groups,
                                  add_downsample=i < len(cfg.block_out_channels) - 1,
                                  name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        x = nn.silu(_group_norm(cfg.norm_num_groups, name="conv_norm_out", **kw)(x))
        return conv2d(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = tuple(reversed(cfg.block_out_channels))
        x = conv2d(widths[0], 3, name="conv_in", **kw)(z)
        x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        for i, channels in enumerate(widths):
            x = _UpDecoderBlock(channels, cfg.layers_per_block + 1, cfg.norm_num_groups,
                                add_upsample=i < len(widths) - 1, name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(_group_norm(cfg.norm_num_groups, name="conv_norm_out", **kw)(x))
        return conv2d(cfg.out_channels, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """The KL autoencoder. `dtype` is the compute dtype; outputs are float32.

    encode: images (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels)
    decode: unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, 3), roughly [-1, 1]
    __call__: decode(encode(images).mean) (used for init and as a reconstruction check).
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = conv2d(2 * cfg.latent_channels, 1, name="quant_conv", **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv2d(cfg.latent_channels, 1, name="post_quant_conv", **kw)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        moments = self.encoder(images)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, latents: jax.Array) -> jax.Array:
        if self.config.use_post_quant_conv:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)


# ----------------------------------------------------------------------------- import

_CONV_LEAF_PARENTS = {"conv_in", "conv_out", "conv1", "conv2", "conv_shortcut", "conv", "quant_conv",
                      "post_quant_conv"}
_ATTENTION_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
# diffusers < 0.15 saved the mid attention as query/key/value/proj_attn; some folders still have it.
_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _torch_module_name(name: str) -> str:
    """`down_blocks_0` -> `down_blocks.0` (our list-index naming back to torch's)."""
    return re.sub(r"_(\d+)$", r".\1", name)


def vae_key_fn(path: tuple[str, ...]) -> Optional[tuple[str, torch_import.Transform]]:
    """Flax VAE param path -> (diffusers key, transform)."""
    *modules, leaf = path
    parent = modules[-1]
    if parent in _ATTENTION_PROJECTIONS:
        modules = modules[:-1] + [_ATTENTION_PROJECTIONS[parent]]
        transform = torch_import.linear_from_conv1x1 if leaf == "kernel" else torch_import.identity
    elif leaf == "kernel" and parent in _CONV_LEAF_PARENTS:
        transform = torch_import.conv_kernel
    elif leaf in ("scale", "bias"):
        transform = torch_import.identity
    else:
        return None
    torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return ".".join([_torch_module_name(m) for m in modules] + [torch_leaf]), transform


def rename_deprecated_attention(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old diffusers names of the mid attention (`attentions.0.query.weight`) -> current ones."""
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$", key)
        out[m.group(1) + _DEPRECATED_ATTENTION_NAMES[m.group(2)] + "." + m.group(3) if m else key] = value
    return out


def import_vae_params(config: VAEConfig, state_dict: Mapping[str, np.ndarray]):
    """diffusers-named AutoencoderKL state dict -> our params (nested dict of float32 numpy). Strict."""
    module = AutoencoderKL(config)
    f = config.downsample_factor
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, f, f, config.in_channels)))
    return torch_import.import_params(
        abstract["params"], rename_deprecated_attention(state_dict), vae_key_fn, model_name="VAE"
    )


def load_vae(path: str | os.PathLike, dtype: Dtype = jnp.float32, config: Optional[VAEConfig] = None):
    """Load the VAE -> (module, params); call `module.apply({"params": params}, x, method=...)`.

    path: a diffusers pipeline folder (uses `vae/`), a VAE component folder (config.json +
      diffusion_pytorch_model.safetensors|.bin), a single-file SD1.5 or SDXL checkpoint
      (.safetensors/.ckpt with `first_stage_model.*`), or a folder written by
      `python -m dynamicid_jax.convert`.
    config: only for single-file checkpoints, which carry no config: required for an SD1.5
      file (the family's, `base_models.single_file_config`); for an SDXL one it defaults to
      the shapes' reading with SDXL's scaling factor.
    dtype: compute dtype of the returned module; params stay float32 numpy arrays.
    """
    config, params = weight_sources.read_component(
        path, name="vae", subfolder="vae", weight_stems=["diffusion_pytorch_model"], config_cls=VAEConfig,
        config_from_json=VAEConfig.from_diffusers, import_fn=import_vae_params, single_file=True, config=config,
        single_file_config=lambda sd, where: VAEConfig(**single_file_configs.infer_vae_fields(sd, where)))
    return AutoencoderKL(config, dtype=dtype), params
