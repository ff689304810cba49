"""The static shape of a diffusers `UNet2DConditionModel`: `UNetConfig`, read from a diffusers
`unet/config.json` (`UNetConfig.from_diffusers`, which rejects every feature `models/unet.py`
does not implement, naming the field), plus the interface of a replacement cross-attention
(`CrossAttentionFactory`). No linen module here; `models/unet.py` builds the network.

Covers SD1.5's and SDXL's UNets (several transformer blocks per attention, and the
`text_time` micro-conditioning embedding); their sizes are the families'
(`base_models.sd15`, `base_models.sdxl`), none is assumed here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Protocol

import flax.linen as nn

CROSS_ATTN_DOWN = "CrossAttnDownBlock2D"
PLAIN_DOWN = "DownBlock2D"
CROSS_ATTN_UP = "CrossAttnUpBlock2D"
PLAIN_UP = "UpBlock2D"
TEXT_TIME = "text_time"  # SDXL's addition_embed_type


class CrossAttentionFactory(Protocol):
    """What `UNetConfig.saa` holds: a hashable (frozen dataclass) factory.

    factory(num_heads=, head_dim=, lora_rank=, dtype=, param_dtype=, name="attn2") returns a
    linen module called as module(x (B, N, C), context (B, L, Cc), conditioning,
    spatial_shape=(h, w)) -> (B, N, C), where `conditioning` is the UNet's own argument,
    passed through untouched.
    """

    def __call__(self, **attention_kwargs) -> nn.Module: ...



@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Static shape of a UNet2DConditionModel. The widths, heads and context width have no
    default (a family or the files state them); the other defaults are the four-level layout
    diffusers' UNet2DConditionModel defaults to.

    num_attention_heads: heads per down level (up levels use them reversed, the mid block
      the last one), as diffusers does. diffusers' SD1.5 config spells this
      `attention_head_dim: 8`, which in fact means 8 heads (see `from_diffusers`).
    transformer_layers_per_block: BasicTransformerBlocks per attention, as diffusers accepts it:
      an int (every attention), one int per level, or one tuple per level with one count per
      resnet of the level's down block. The mid block uses the last level's (first) count.
    reverse_transformer_layers_per_block: the up levels' counts, one tuple per up level with
      one count per resnet (layers_per_block + 1); None = the down levels' ints reversed (then
      `transformer_layers_per_block` must not be per resnet, as in diffusers).
    addition_embed_type: None (SD1.5) or "text_time" (SDXL's micro-conditioning): the UNet
      then takes `added_cond={"text_embeds": (B, P), "time_ids": (B, N)}`; each time id goes
      through the sinusoidal embedding of width `addition_time_embed_dim`, flattened after
      the pooled text embedding, through `add_embedding` (linear, SiLU, linear) and added to
      the timestep embedding; P + N * addition_time_embed_dim must equal
      `projection_class_embeddings_input_dim` (SDXL base: 1280 + 6 * 256 = 2816).
    lora_rank: LoRA rank on to_q/to_k/to_v/to_out of every attn1 and attn2 (0 = none).
    saa: None = plain attention in every attn2; else a `CrossAttentionFactory` whose modules
      replace them and take the UNet's `conditioning`. Named for its one user (DynamicID's
      Semantic-Activated Attention) because the field name is part of the converted-folder
      JSON (`convert.py`), which must keep reading folders written before.
    attention_block: execution choice, not a weight shape: attention over more keys than
      this runs through `layers.attend_long` (CPU: blockwise in blocks of this size, 512 the
      fastest block measured; GPU in bfloat16: cuDNN flash attention; both faster than
      materialised logits, figures in benchmarks/design_choices_report.md and
      benchmarks/gpu_report.md). None = always materialise all logits.
    """

    block_out_channels: tuple[int, ...]
    num_attention_heads: tuple[int, ...]
    cross_attention_dim: int
    in_channels: int = 4
    out_channels: int = 4
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    # Latent side the UNet was trained at (metadata: the native picture size is this times the
    # VAE factor, `base_models.native_size`); None when the files state none.
    sample_size: int | tuple[int, int] | None = None
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    use_linear_projection: bool = False
    transformer_layers_per_block: int | tuple[int | tuple[int, ...], ...] = 1
    reverse_transformer_layers_per_block: Optional[tuple[tuple[int, ...], ...]] = None
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    lora_rank: int = 0
    saa: Optional[CrossAttentionFactory] = None
    attention_block: Optional[int] = 512

    def __post_init__(self):
        # Normalise list-valued fields to tuples so the config stays hashable.
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        heads = self.num_attention_heads
        heads = (heads,) * len(self.block_out_channels) if isinstance(heads, int) else tuple(heads)
        object.__setattr__(self, "num_attention_heads", heads)
        if isinstance(self.sample_size, (list, tuple)):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        layers = self.transformer_layers_per_block
        layers = (layers,) * len(self.block_out_channels) if isinstance(layers, int) else _nested_tuple(layers)
        object.__setattr__(self, "transformer_layers_per_block", layers)
        if self.reverse_transformer_layers_per_block is not None:
            reverse = _nested_tuple(self.reverse_transformer_layers_per_block)
            object.__setattr__(self, "reverse_transformer_layers_per_block", reverse)
        self._validate()

    def _validate(self):
        levels = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "num_attention_heads"):
            if len(getattr(self, name)) != levels:
                raise ValueError(
                    f"UNetConfig.{name} has {len(getattr(self, name))} entries, "
                    f"block_out_channels has {levels}"
                )
        for t in self.down_block_types:
            if t not in (CROSS_ATTN_DOWN, PLAIN_DOWN):
                raise ValueError(f"UNetConfig.down_block_types: unsupported block {t!r}")
        for t in self.up_block_types:
            if t not in (CROSS_ATTN_UP, PLAIN_UP):
                raise ValueError(f"UNetConfig.up_block_types: unsupported block {t!r}")
        for level, (c, h) in enumerate(zip(self.block_out_channels, self.num_attention_heads)):
            if c % self.norm_num_groups:
                raise ValueError(
                    f"UNetConfig.block_out_channels[{level}]={c} is not divisible by norm_num_groups="
                    f"{self.norm_num_groups}"
                )
            if c % h:
                raise ValueError(
                    f"UNetConfig.block_out_channels[{level}]={c} is not divisible by "
                    f"num_attention_heads[{level}]={h}"
                )
        if self.layers_per_block < 1:
            raise ValueError(f"UNetConfig.layers_per_block must be >= 1, got {self.layers_per_block}")
        if self.lora_rank < 0:
            raise ValueError(f"UNetConfig.lora_rank must be >= 0, got {self.lora_rank}")
        if self.attention_block is not None and self.attention_block < 1:
            raise ValueError(f"UNetConfig.attention_block must be None or >= 1, got {self.attention_block}")
        self._validate_transformer_layers()
        self._validate_addition_embedding()

    def _validate_transformer_layers(self):
        levels, down = len(self.block_out_channels), self.transformer_layers_per_block
        if len(down) != levels:
            raise ValueError(f"UNetConfig.transformer_layers_per_block has {len(down)} entries, {levels} levels")
        reverse = self.reverse_transformer_layers_per_block
        if reverse is None and any(isinstance(d, tuple) for d in down):
            raise ValueError("UNetConfig.transformer_layers_per_block is per resnet: "
                             "give reverse_transformer_layers_per_block too (as diffusers requires)")
        if reverse is not None and len(reverse) != levels:
            raise ValueError(
                f"UNetConfig.reverse_transformer_layers_per_block has {len(reverse)} entries, {levels} levels")
        for level in range(levels):  # the accessors check per-resnet lengths and counts
            self.down_transformer_layers(level), self.up_transformer_layers(level)

    def _validate_addition_embedding(self):
        kind, time_dim, proj_dim = (self.addition_embed_type, self.addition_time_embed_dim,
                                    self.projection_class_embeddings_input_dim)
        if kind is None:
            if time_dim is not None or proj_dim is not None:
                raise ValueError("UNetConfig: addition_time_embed_dim/projection_class_embeddings_input_dim "
                                 "are set but addition_embed_type is None")
            return
        if kind != TEXT_TIME:
            raise ValueError(f"UNetConfig.addition_embed_type: unsupported {kind!r} (only {TEXT_TIME!r})")
        if not (isinstance(time_dim, int) and time_dim > 0 and isinstance(proj_dim, int) and proj_dim > time_dim):
            raise ValueError(
                f"UNetConfig: addition_embed_type={TEXT_TIME!r} needs addition_time_embed_dim > 0 and "
                f"projection_class_embeddings_input_dim > it, got {time_dim!r} and {proj_dim!r}"
            )

    def down_transformer_layers(self, level: int) -> tuple[int, ...]:
        """BasicTransformerBlocks of each of down level `level`'s layers_per_block attentions."""
        return self._per_resnet(self.transformer_layers_per_block[level], self.layers_per_block,
                                f"transformer_layers_per_block[{level}]")

    def up_transformer_layers(self, level: int) -> tuple[int, ...]:
        """Counts for up level `level` (0 = the coarsest), one per its layers_per_block + 1 attentions."""
        if self.reverse_transformer_layers_per_block is None:
            value = self.transformer_layers_per_block[::-1][level]
            where = f"transformer_layers_per_block[{len(self.block_out_channels) - 1 - level}]"
        else:
            value = self.reverse_transformer_layers_per_block[level]
            where = f"reverse_transformer_layers_per_block[{level}]"
        return self._per_resnet(value, self.layers_per_block + 1, where)

    @property
    def mid_transformer_layers(self) -> int:
        """The mid block's count: the last level's (its first entry when per resnet), as diffusers."""
        last = self.transformer_layers_per_block[-1]
        return last if isinstance(last, int) else last[0]

    @staticmethod
    def _per_resnet(value, resnets: int, where: str) -> tuple[int, ...]:
        counts = (value,) * resnets if isinstance(value, int) else value
        if len(counts) != resnets or any(not isinstance(n, int) or n < 1 for n in counts):
            raise ValueError(f"UNetConfig.{where}={value!r}: need {resnets} counts >= 1 (one per resnet)")
        return counts

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], **overrides) -> "UNetConfig":
        """From a diffusers `unet/config.json` dict; rejects features this model lacks.

        Fields absent from `config` take diffusers' own defaults. Unknown fields and fields
        whose value we do not implement raise ValueError naming the field.
        """
        unknown = sorted(
            k for k in config
            if not k.startswith("_") and k not in _DIFFUSERS_USED and k not in _DIFFUSERS_FIXED
            and k not in _DIFFUSERS_IGNORED
        )
        if unknown:
            raise ValueError(f"unsupported UNet config fields: {', '.join(unknown)}")
        for field, accepted in _DIFFUSERS_FIXED.items():
            if field in config and not _accepts(config[field], accepted):
                raise ValueError(
                    f"unsupported UNet config: {field}={config[field]!r} (only {accepted!r} is implemented)"
                )
        get = lambda k: config.get(k, _DIFFUSERS_USED[k])  # noqa: E731
        levels = len(get("block_out_channels"))
        if config.get("num_attention_heads") is not None:
            raise ValueError(
                "unsupported UNet config: num_attention_heads is set; diffusers' UNet2DConditionModel "
                "takes the head count from attention_head_dim"
            )
        if get("norm_num_groups") is None:
            raise ValueError("unsupported UNet config: norm_num_groups=None (no output GroupNorm)")
        # diffusers' historical naming: `attention_head_dim` holds the number of HEADS.
        heads = get("attention_head_dim")
        heads = (heads,) * levels if isinstance(heads, int) else tuple(heads)
        kwargs = dict(
            in_channels=get("in_channels"),
            out_channels=get("out_channels"),
            block_out_channels=tuple(get("block_out_channels")),
            layers_per_block=_uniform(get("layers_per_block"), "layers_per_block"),
            down_block_types=tuple(get("down_block_types")),
            up_block_types=tuple(get("up_block_types")),
            num_attention_heads=heads,
            cross_attention_dim=_uniform(get("cross_attention_dim"), "cross_attention_dim"),
            norm_num_groups=get("norm_num_groups"),
            norm_eps=float(get("norm_eps")),
            sample_size=get("sample_size"),
            flip_sin_to_cos=bool(get("flip_sin_to_cos")),
            freq_shift=get("freq_shift"),
            use_linear_projection=bool(get("use_linear_projection")),
            transformer_layers_per_block=get("transformer_layers_per_block"),
            reverse_transformer_layers_per_block=get("reverse_transformer_layers_per_block"),
            addition_embed_type=get("addition_embed_type"),
            addition_time_embed_dim=get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=get("projection_class_embeddings_input_dim"),
        )
        kwargs.update(overrides)
        return cls(**kwargs)


# Fields we read, with diffusers' UNet2DConditionModel defaults for absent ones.
_DIFFUSERS_USED: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, PLAIN_DOWN),
    "up_block_types": (PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP),
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "cross_attention_dim": 1280,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "sample_size": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "use_linear_projection": False,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
}
# Fields that change the computation: only these values are implemented.
_DIFFUSERS_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "mid_block_only_cross_attention": (None, False),
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}
# Fields with no effect on inference here: dropout (inference only); upcast_attention (our
# logits and softmax are always float32); addition_embed_type_num_heads (only read for
# addition_embed_type "text", which UNetConfig rejects).
_DIFFUSERS_IGNORED = {"dropout", "upcast_attention", "addition_embed_type_num_heads"}


def _accepts(value, accepted) -> bool:
    options = accepted if isinstance(accepted, tuple) else (accepted,)
    if isinstance(value, list):  # per-block lists are fine when every entry is accepted
        return all(v in options for v in value)
    return value in options


def _uniform(value, name: str) -> int:
    if isinstance(value, int):
        return value
    values = set(value)
    if len(values) != 1:
        raise ValueError(f"unsupported UNet config: per-block {name}={list(value)!r} (must be one value)")
    return values.pop()


def _nested_tuple(value):
    """Lists (from JSON) -> tuples, recursively, so the config stays hashable."""
    return tuple(_nested_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
