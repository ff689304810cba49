"""CLIP text and vision towers (transformers' CLIPTextModel / CLIPVisionModel) and their loaders.

Both towers share one pre-LN transformer encoder built from the shared `Attention` (q/k/v/out
biases) and `MLP` of `layers.py`. The text tower is causal and pools the final-LayerNormed
state at the EOS token; the vision tower embeds 14x14 (or p x p) patches plus a class token,
applies `pre_layrnorm`, and pools the class token through `post_layernorm`.

Uses in DynamicID:
  * SD1.5 text encoder (ViT-L/14 text tower): `last_hidden_state` (B, L, D) is the UNet
    context; `pooled` (B, D) is IMR's face-prompt feature (sizes: `base_models.sd15`).
  * SDXL's two text encoders: ViT-L/14 again and OpenCLIP ViT-bigG/14 in transformers'
    `CLIPTextModelWithProjection` layout (`CLIPTextConfig.projection_dim` set: a bias-free
    `text_projection` maps the pooled EOS state); the UNet context is the penultimate raw
    hidden states of both (`output_hidden_states=True`), the pooled vector encoder 2's.
  * ViT-H/14 vision tower: `hidden_states[-2]` (B, 257, 1280), the penultimate layer, feeds
    the face encoder's perceiver resampler.

Parameter names mirror transformers (`embeddings/token_embedding`, `encoder/layers_i/self_attn`,
`layer_norm1`, `mlp/fc1`, `final_layer_norm`, `pre_layrnorm`, ...) so that import is a rename
(`models/clip_weights.py`: the weight import and the loaders).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .layers import ACTIVATIONS, MLP, Attention, LoRADense

Dtype = Any

# CLIP's image normalisation (OpenAI), applied after scaling to [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _activation_name(hidden_act: str) -> str:
    if hidden_act not in ACTIVATIONS:
        raise ValueError(f"unsupported CLIP hidden_act {hidden_act!r}; known: {sorted(ACTIVATIONS)}")
    return hidden_act


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of a CLIP text tower. The sizes have no default: a family (`base_models.sd15`'s
    OpenAI ViT-L/14) or the files (`from_transformers`) state them."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int  # the context: token ids per prompt (max_position_embeddings)
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # SD1.5's config says 2 (a legacy value): transformers then pools at argmax(input_ids),
    # which is the EOS because <|endoftext|> has the largest id. Otherwise: first EOS position.
    eos_token_id: int = 2
    # transformers' CLIPTextModelWithProjection (SDXL's bigG text_encoder_2): the pooled output
    # goes through a bias-free `text_projection` to this width. None: plain CLIPTextModel.
    projection_dim: Optional[int] = None

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a transformers `config.json` dict (a CLIPTextConfig, or a CLIPConfig's text_config).

        `projection_dim` is read only for a `CLIPTextModelWithProjection` (its `architectures`):
        transformers writes a projection_dim into every CLIPTextConfig, with or without a head.
        """
        with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or ())
        config = config["text_config"] if "text_config" in config else config
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=int(config["num_attention_heads"]),
            max_positions=int(config["max_position_embeddings"]),
            activation=_activation_name(config.get("hidden_act", "quick_gelu")),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
            eos_token_id=int(config.get("eos_token_id", 2)),
            projection_dim=int(config["projection_dim"]) if with_projection else None,
        )


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Shape of a CLIP vision tower. Defaults are OpenCLIP ViT-H/14 (laion2B), IP-Adapter's encoder."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_positions(self) -> int:
        """Class token plus (image_size / patch_size)^2 patches (257 for ViT-H/14 at 224)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def vit_h14(cls) -> "CLIPVisionConfig":
        return cls()

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
        """From a transformers `config.json` dict (a CLIPVisionConfig, or a CLIPConfig's vision_config)."""
        config = config["vision_config"] if "vision_config" in config else config
        return cls(
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=int(config["num_attention_heads"]),
            image_size=int(config["image_size"]),
            patch_size=int(config["patch_size"]),
            num_channels=int(config.get("num_channels", 3)),
            activation=_activation_name(config.get("hidden_act", "quick_gelu")),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        )


# --------------------------------------------------------------------------- encoder


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)); x + mlp(LN2(x)). (B, N, C) -> (B, N, C)."""

    num_heads: int
    intermediate_size: int
    activation: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        width = x.shape[-1]
        h = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + Attention(
            self.num_heads, width // self.num_heads, qkv_bias=True, out_bias=True, dtype=self.dtype, name="self_attn"
        )(h, mask=mask)
        h = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layer_norm2")(x)
        return x + MLP(self.intermediate_size, activation=self.activation, dtype=self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """A stack of `CLIPEncoderLayer`s.

    x (B, N, C) -> tuple of num_layers + 1 states (B, N, C): the input, then every layer's output
    (transformers' `hidden_states`).
    """

    num_layers: int
    num_heads: int
    intermediate_size: int
    activation: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> tuple[jax.Array, ...]:
        states = [x]
        for i in range(self.num_layers):
            x = CLIPEncoderLayer(
                self.num_heads, self.intermediate_size, self.activation, self.layer_norm_eps, self.dtype,
                name=f"layers_{i}",
            )(x, mask)
            states.append(x)
        return tuple(states)


def _encoder(config, dtype: Dtype) -> CLIPEncoder:
    return CLIPEncoder(
        config.num_layers, config.num_heads, config.intermediate_size, config.activation, config.layer_norm_eps,
        dtype, name="encoder",
    )


# --------------------------------------------------------------------------- towers


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the pooled (EOS) token per row, transformers' rule. (B, L) int -> (B,) int.

    eos_token_id == 2 (legacy configs such as SD1.5's): argmax of the ids, since <|endoftext|>
    has the largest id in CLIP's vocabulary. Otherwise the first position equal to the EOS id
    (padding may repeat it).
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextEmbeddings(nn.Module):
    """Token plus learned position embeddings. (B, L) int -> (B, L, D).

    extra_embeddings (B, E, D), optional: per-row input embeddings of ids >= vocab_size (id
    vocab_size + k takes row k), the textual-inversion tokens of `textual_inversion.tokenize`.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, extra_embeddings: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")
        if extra_embeddings is None:
            tokens = embed(input_ids)
        else:
            added = input_ids >= cfg.vocab_size
            tokens = embed(jnp.where(added, 0, input_ids))
            rows = jnp.clip(input_ids - cfg.vocab_size, 0, extra_embeddings.shape[1] - 1)
            extra = jnp.take_along_axis(extra_embeddings, rows[..., None], axis=1).astype(tokens.dtype)
            tokens = jnp.where(added[..., None], extra, tokens)
        positions = nn.Embed(cfg.max_positions, cfg.hidden_size, dtype=self.dtype, name="position_embedding")(
            jnp.arange(input_ids.shape[1])
        )
        return tokens + positions[None]


class CLIPTextModel(nn.Module):
    """CLIP text tower (causal), with transformers' projection head when `config.projection_dim`.

    input_ids (B, L) int, L <= max_positions ->
      last_hidden_state (B, L, D): final-LayerNormed states (the UNet context);
      pooled (B, D): last_hidden_state at the EOS token (see `eos_positions`); with
        `projection_dim` P, that through `text_projection`: (B, P), transformers' `text_embeds`;
      with `output_hidden_states=True` (static) also hidden_states: the num_layers + 1 raw
        (B, L, D) states, embeddings first, as transformers' `hidden_states` (SDXL's context is
        `hidden_states[-(clip_skip + 2)]`, without the final LayerNorm).
    clip_skip (static): take the states `clip_skip` layers before the last, final-LayerNormed
      (diffusers' `clip_skip`; 1 = the penultimate layer, A1111's "Clip skip 2"). The pooled
      output always comes from the last layer.
    extra_embeddings (B, E, D), optional: input embeddings of ids >= vocab_size (textual
      inversion, see `CLIPTextEmbeddings`). Such ids never count as the EOS in pooling
      (transformers' legacy argmax rule would pick them; the EOS is what CLIP was trained on).
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, clip_skip: int = 0, extra_embeddings: Optional[jax.Array] = None,
                 output_hidden_states: bool = False) -> tuple[jax.Array, ...]:
        cfg = self.config
        if not 0 <= clip_skip < cfg.num_layers:
            raise ValueError(f"clip_skip must be in [0, {cfg.num_layers - 1}], got {clip_skip}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        length = input_ids.shape[1]
        if length > cfg.max_positions:
            raise ValueError(f"input_ids length {length} exceeds max_positions {cfg.max_positions}")
        x = CLIPTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids, extra_embeddings)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]  # (1, 1, L, L), True = keep
        states = _encoder(cfg, self.dtype)(x, causal)
        final_norm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")
        last = final_norm(states[-1])
        pool_ids = input_ids if extra_embeddings is None else jnp.where(input_ids >= cfg.vocab_size, 0, input_ids)
        pooled = last[jnp.arange(last.shape[0]), eos_positions(pool_ids, cfg.eos_token_id)]
        if cfg.projection_dim is not None:
            pooled = LoRADense(cfg.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)
        context = final_norm(states[-1 - clip_skip]) if clip_skip else last
        return (context, pooled, states) if output_hidden_states else (context, pooled)


class CLIPVisionEmbeddings(nn.Module):
    """Class token + non-overlapping patch embeddings + learned positions.

    pixels (B, S, S, C) -> (B, 1 + (S/p)^2, D).
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        patches = nn.Conv(
            cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
            name="patch_embedding",
        )(pixels)
        b, gh, gw, d = patches.shape
        patches = patches.reshape(b, gh * gw, d)  # row-major, as torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(d**-0.5), (d,), jnp.float32)
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, d))
        positions = nn.Embed(cfg.num_positions, d, dtype=self.dtype, name="position_embedding")(
            jnp.arange(cfg.num_positions)
        )
        return jnp.concatenate([cls, patches], axis=1) + positions[None]


class CLIPVisionModel(nn.Module):
    """CLIP vision tower.

    pixels (B, S, S, C) NHWC, CLIP-normalised (see `clip_preprocess`), S = image_size ->
      last_hidden_state (B, T, D), T = 1 + (S/p)^2 (257 for ViT-H/14 at 224);
      pooled (B, D): post_layernorm of the class token;
      hidden_states: tuple of num_layers + 1 (B, T, D) states, the first being the
        pre_layrnorm'd embeddings (transformers' `hidden_states`); DynamicID uses [-2].
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"pixels must be (batch, {', '.join(map(str, expected))}) NHWC, got {pixels.shape}")
        x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixels)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
        states = _encoder(cfg, self.dtype)(x)
        pooled = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(states[-1][:, 0])
        return states[-1], pooled, states


# --------------------------------------------------------------------------- preprocessing


def _resample_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Antialiased bicubic (Keys a=-0.5, as PIL) along one axis, rounded back to uint8 levels."""
    if x.shape[axis] == size:
        return x
    shape = list(x.shape)
    shape[axis] = size
    x = jax.image.resize(x, tuple(shape), method="bicubic", antialias=True)
    return jnp.clip(jnp.round(x), 0.0, 255.0)


def clip_preprocess(images, size: int = 224) -> jax.Array:
    """CLIPImageProcessor's defaults in JAX. uint8 (B, H, W, 3) -> float32 (B, size, size, 3).

    Resize so the shorter side is `size` (the longer side `int(size * long / short)`) with
    antialiased bicubic, done as PIL does it: width pass, round to uint8, height pass, round;
    center crop at offset `int((n - size) / 2)`; scale to [0, 1]; CLIP mean/std.
    Against transformers' PIL-backed processor: within 1 uint8 level per pixel (float rounding
    in the kernels), bit-exact when no resize is needed.
    """
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (batch, height, width, 3), got {images.dtype} {images.shape}")
    _, h, w, _ = images.shape
    if w <= h:
        new_h, new_w = int(size * h / w), size
    else:
        new_h, new_w = size, int(size * w / h)
    x = _resample_axis(images.astype(jnp.float32), 2, new_w)
    x = _resample_axis(x, 1, new_h)
    top, left = int((new_h - size) / 2.0), int((new_w - size) / 2.0)
    x = x[:, top : top + size, left : left + size]
    mean = jnp.asarray(CLIP_MEAN, jnp.float32)
    std = jnp.asarray(CLIP_STD, jnp.float32)
    return (x / 255.0 - mean) / std


def clip_preprocess_host(image, size: int = 224):
    """CLIPImageProcessor's defaults on the host with PIL itself (what transformers runs):
    uint8 (H, W, 3) -> numpy float32 (size, size, 3), the sizes and crop of `clip_preprocess`.

    For a server: the output's shape never depends on the photo's, so the vision tower after
    it is one compiled program for every upload (`clip_preprocess` compiles per photo size).
    """
    import numpy as np
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8 (height, width, 3), got {image.dtype} {image.shape}")
    h, w, _ = image.shape
    new_h, new_w = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
    pil = Image.fromarray(image)
    if (new_h, new_w) != (h, w):
        pil = pil.resize((new_w, new_h), resample=Image.BICUBIC, reducing_gap=None)
    top, left = int((new_h - size) / 2.0), int((new_w - size) / 2.0)
    x = np.asarray(pil, np.float32)[top : top + size, left : left + size]
    return ((x / 255.0 - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)).astype(np.float32)
