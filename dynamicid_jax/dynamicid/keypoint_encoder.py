"""KeyPointEncoder: a 96x96 landmark image -> one 768-d landmark feature for IMR.

    landmarks (B, 96, 96, 1) NHWC, the 106 landmarks drawn as white pixels, scaled to [-1, 1]
    returns   (B, embedding_dim) >= 0 (the last layer ends in BatchNorm and ReLU)

Every layer is conv -> BatchNorm -> (+ input for residual layers) -> ReLU. Stages: a 7x7
stem conv to channels[0]; per later stage a stride-2 3x3 conv then `num_residual[i]`
residual 3x3 convs; a head of a valid 3x3 conv and a 1x1 conv to embedding_dim, which must
leave a 1x1 map (96 -> 48 -> 24 -> 12 -> 6 -> 3 -> 1 for the release).

Param and batch_stats tree, 1:1 with the release's `blocks.B.J.conv_block.{0,1}`:
blocks_B_J/conv/{kernel,bias}, blocks_B_J/norm/{scale,bias} and batch_stats
blocks_B_J/norm/{mean,var}. BatchNorm uses running statistics unless `train=True`
(then batch statistics, and `batch_stats` must be mutable).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynamicid_jax.models.layers import Dtype

TORCH_BATCHNORM_EPS = 1e-5
TORCH_BATCHNORM_MOMENTUM = 0.9  # flax's momentum = 1 - torch's 0.1


class ConvNormReLU(nn.Module):
    """(B, H, W, Cin) -> (B, H', W', features): conv, BatchNorm, optional + x, ReLU."""

    features: int
    kernel_size: int
    stride: int
    padding: int
    residual: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        p = self.padding
        out = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),  # torch-style symmetric padding (SAME differs at stride 2)
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)
        out = nn.BatchNorm(
            use_running_average=not train,
            momentum=TORCH_BATCHNORM_MOMENTUM,
            epsilon=TORCH_BATCHNORM_EPS,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="norm",
        )(out)
        if self.residual:
            out = out + x
        return nn.relu(out)


class KeyPointEncoder(nn.Module):
    """Landmark image (B, H, W, 1) -> (B, embedding_dim); see the module docstring."""

    # Sizes come from the model config (`modeling.build_modules`; the release's:
    # `base_models.sd15.model_config`).
    image_size: int  # square input side; the layers must reduce it to 1x1
    channels: Sequence[int]
    num_residual: Sequence[int]
    embedding_dim: int  # the identity tokens' width (IMR's landmark_dim)
    in_channels: int = 1
    stem_kernel: int = 7
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, landmarks: jax.Array, train: bool = False) -> jax.Array:
        expected = (self.image_size, self.image_size, self.in_channels)
        if landmarks.ndim != 4 or landmarks.shape[1:] != expected:
            raise ValueError(f"KeyPointEncoder wants (B, {', '.join(map(str, expected))}) landmark images, "
                             f"got shape {landmarks.shape}")
        if len(self.channels) != len(self.num_residual):
            raise ValueError(f"channels {self.channels} and num_residual {self.num_residual} differ in length")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = landmarks
        for level, (features, repeats) in enumerate(zip(self.channels, self.num_residual)):
            if level == 0:
                first = ConvNormReLU(features, self.stem_kernel, 1, self.stem_kernel // 2, name="blocks_0_0", **kw)
            else:
                first = ConvNormReLU(features, 3, 2, 1, name=f"blocks_{level}_0", **kw)
            x = first(x, train)
            for j in range(1, repeats + 1):
                x = ConvNormReLU(features, 3, 1, 1, residual=True, name=f"blocks_{level}_{j}", **kw)(x, train)
        head = len(self.channels)
        x = ConvNormReLU(self.channels[-1], 3, 1, 0, name=f"blocks_{head}_0", **kw)(x, train)
        x = ConvNormReLU(self.embedding_dim, 1, 1, 0, name=f"blocks_{head}_1", **kw)(x, train)
        if x.shape[1:3] != (1, 1):
            raise ValueError(
                f"KeyPointEncoder: image_size {self.image_size} leaves a {x.shape[1:3]} map, not 1x1; "
                "the released encoder wants 96x96 inputs"
            )
        return x.reshape(x.shape[0], self.embedding_dim)
