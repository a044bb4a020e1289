"""Flax (linen) ResNets, DenseNets and Inception-ResNet-v2 for the SANER paper's experiments.

Every model takes NHWC float images of any size at least its smallest one
(28x28x1 Fashion-MNIST and 32x32x3 CIFAR for the CIFAR models: a 3x3
stride-1 stem, no max-pool; 224 px and 299 px for the ImageNet-style ones),
ends with global average pooling and a Dense classifier, and returns float32
logits. Build one by name::

  model = create_model("resnet18", num_classes=10)
  params, batch_stats = init_model(model, jax.random.key(0), (32, 32, 3))
  logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True,
      mutable=["batch_stats"])   # updates["batch_stats"]: new running stats
  logits = model.apply({"params": params, "batch_stats": batch_stats}, x,
                       train=False)

BatchNorm running statistics live in their own ``batch_stats`` collection, so
a sharpness-aware step keeps the clean pass's ``updates`` and drops the
perturbed pass's: nothing is mutated in place.

The built-in entries of :data:`MODELS` (registered in
:mod:`saner_jax.train.model_entries`; parameter counts for 10 classes, 3 channels;
PyTorch's convention: BatchNorm scales and biases are parameters, running
statistics are not):

=====================  =========================================  ==========
name                   architecture                               parameters
=====================  =========================================  ==========
resnet4                resnet8's first stage, 16 channels             5,306
resnet8                He et al. CIFAR ResNet, 3x1 blocks, 16-64      75,290
resnet20               He et al. CIFAR ResNet, 3x3 blocks, 16-64     269,722
resnet18               CIFAR ResNet-18, BasicBlock [2,2,2,2]      11,173,962
resnet34               CIFAR ResNet-34, BasicBlock [3,4,6,3]      21,282,122
resnet50               CIFAR ResNet-50, Bottleneck [3,4,6,3]      23,520,842
preact_resnet18        pre-activation ResNet-18                   11,172,170
wrn28_10               WideResNet-28-10, pre-activation           36,479,194
wrn40_2                WideResNet-40-2, pre-activation             2,243,546
densenet121            DenseNet-BC-121, the authors' CIFAR form    6,956,298
densenet121_imagenet   DenseNet-BC-121, torchvision's              6,964,106
resnet18_imagenet      torchvision's ResNet-18 (7x7 stem, pool)   11,181,642
resnet50_imagenet      torchvision's ResNet-50                    23,528,522
inception_resnet_v2    Inception-ResNet-v2 (299 px)               54,321,834
=====================  =========================================  ==========

At 1000 classes the ImageNet-style models have exactly torchvision's
counts (densenet121 7,978,856, resnet18 11,689,512, resnet50 25,557,032)
and ``inception_resnet_v2`` the authors' port's (timm's), 55,843,464: Keras's
55,813,192 trainable weights plus the 30,272 BatchNorm scales Keras leaves
out. ``create_model(..., width=k)`` widens the CIFAR ResNets (the paper's
width ablation). docs/models.md has the details.

They follow the authors' PyTorch models (github lhchau/saner,
``models/resnet.py``, ``resnetv2.py``, ``wideresnet.py``, ``densenet.py``,
``inceptionresnetv2.py``) and torchvision's layer for layer,
including 3x3 convolutions padded by one pixel on each side (not 'SAME', which
would shift stride-2 windows by a pixel), bias-free convolutions, PyTorch's
BatchNorm (momentum 0.1, i.e. flax ``momentum=0.9``; epsilon 1e-5) and each
file's initialisation. Deliberate differences:

- ``resnet4`` is ``resnet8``'s first stage alone, a smoke-test network
  (a run's plumbing in seconds; it learns little). It is not in the authors' code.
- ``resnet8`` is ``resnet20`` with one block per stage (He et al.'s 6n+2
  family with n=1), for quick CPU runs; it is not in the authors' code.
  ``width=k`` widens it like the others; k times the width costs about
  k^2 times the compute, so a 2x one costs what ``resnet20`` does.
- ``preact_resnet18`` is not in the authors' code either. It is He et al.'s
  (2016) pre-activation ResNet-18 with the final BatchNorm-ReLU before pooling
  (1,024 parameters more than the common PyTorch copy that leaves it out),
  initialised like ``resnet18``.
- Dense biases (and the biases of Inception-ResNet's residual 1x1
  convolutions) start at zero (PyTorch draws them uniformly in
  +-1/sqrt(fan_in)); the kernels follow each file's initialisation.
- ``inception_resnet_v2`` pools globally where the port has a fixed 8x8
  average pool: the same at 299 px, and it takes other sizes (75 px up).
- Running variances average the biased batch variance (PyTorch averages the
  unbiased one): a relative difference of 1/n, n >= 2,048 values per channel
  at batch 128.
- ``dtype`` sets the compute dtype (bfloat16 for mixed precision); parameters
  and BatchNorm statistics stay float32, and the logits are returned in
  float32 so the loss (log-softmax) is computed at full precision.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from saner_jax.train import registry

ModuleDef = Any
ConvFn = Callable[..., jax.Array]
Initializer = Callable[..., jax.Array]

# PyTorch's kaiming_normal_ draws from an untruncated normal: jax's "normal"
# (flax's he_normal is the truncated one).
HE_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
HE_FAN_IN = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# PyTorch's default nn.Linear kernel: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
TORCH_LINEAR = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# Lua Torch's BatchNorm drew its scale from U(0, 1); the WideResNet code the
# authors use keeps that.
UNIFORM_01 = nn.initializers.uniform(1.0)


def _check_shape(what: str, shape: Sequence[int], min_size: int) -> None:
  """Raises ValueError unless ``shape`` is (N,) H, W, C with H, W >= min_size."""
  shape = tuple(shape)
  sizes_ok = all(isinstance(d, (int, np.integer)) and d > 0 for d in shape)  # a NumPy shape entry counts too
  if len(shape) not in (3, 4) or not sizes_ok:
    raise ValueError(
      f"{what} takes images of shape (H, W, C) or (N, H, W, C) with positive "
      f"sizes (channels last; a grayscale image needs a channel axis of 1), "
      f"got {shape}"
    )
  height, width = shape[-3:-1]
  if min(height, width) < min_size:
    raise ValueError(
      f"{what} needs images of at least {min_size}x{min_size} pixels (its "
      f"total stride, so that no stride-2 layer reads a 1-pixel map), got "
      f"shape {shape}"
    )


class BasicBlock(nn.Module):
  """Post-activation residual block: conv-BN-ReLU-conv-BN, add, ReLU.

  Attributes:
    features: output channels.
    strides: stride of the first convolution (and of the shortcut).
    shortcut: how a shortcut changes shape: "projection" (1x1 conv + BN, the
      torchvision-style CIFAR ResNet-18/34) or "pad" (subsample and pad
      channels with zeros, He et al.'s parameter-free option A for CIFAR).
    conv: ``nn.Conv`` with the network's dtype, init and convolution bound.
    norm: ``nn.BatchNorm`` bound to the network's mode.
  """

  features: int
  strides: int
  shortcut: str
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.features, (3, 3), self.strides, padding=1, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.features, (3, 3), 1, padding=1, name="conv2")(y)
    y = self.norm(name="bn2")(y)
    residual = x
    if self.strides != 1 or x.shape[-1] != self.features:
      if self.shortcut == "projection":
        residual = self.conv(self.features, (1, 1), self.strides, padding=0, name="shortcut_conv")(x)
        residual = self.norm(name="shortcut_bn")(residual)
      elif self.shortcut == "pad":
        # Pixels 0, 2, 4, ...: the ones the stride-2 3x3 convolution (padded
        # by one) is centred on, so both branches stay aligned.
        residual = x[:, :: self.strides, :: self.strides, :]
        extra = self.features - x.shape[-1]
        residual = jnp.pad(residual, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
      else:
        raise ValueError(f"shortcut must be 'projection' or 'pad', got {self.shortcut!r}")
    return nn.relu(y + residual)


class PreActBlock(nn.Module):
  """Pre-activation residual block: BN-ReLU-conv-(dropout)-BN-ReLU-conv, add.

  When the shape changes, the 1x1 projection shortcut reads the
  pre-activated input, as in the authors' WideResNet and the usual
  pre-activation ResNet; otherwise the shortcut is the raw input.

  Attributes:
    features: output channels.
    strides: stride of the first convolution (and of the shortcut).
    dropout_rate: dropout between the two convolutions (WideResNet); needs a
      ``'dropout'`` rng in training when positive.
    conv: ``nn.Conv`` with the network's dtype, init and convolution bound.
    norm: ``nn.BatchNorm`` bound to the network's mode.
  """

  features: int
  strides: int
  dropout_rate: float
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = nn.relu(self.norm(name="bn1")(x))
    residual = x
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = self.conv(self.features, (1, 1), self.strides, padding=0, name="shortcut_conv")(y)
    y = self.conv(self.features, (3, 3), self.strides, padding=1, name="conv1")(y)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.features, (3, 3), 1, padding=1, name="conv2")(y)
    return y + residual


class _Network(nn.Module):
  """What the ResNets share: layer factories, the input check, the head.

  Subclasses declare ``stage_sizes`` and ``stage_widths`` fields; stage i
  has ``stage_sizes[i]`` blocks of ``stage_widths[i]`` channels, the first
  stage at stride 1 and each later one at stride 2.
  """

  @property
  def min_input_size(self) -> int:
    """Smallest image side the model accepts: its total stride."""
    return 2 ** (len(self.stage_sizes) - 1)

  def _layers(self, train: bool) -> tuple[ModuleDef, ModuleDef]:
    # flax marks Conv's conv_general_dilated field deprecated (for
    # conv_general_dilated_cls, a factory) but honours it; it takes the plain
    # function that callers hand to create_model.
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      dtype=self.dtype,
      kernel_init=self.conv_init,
      conv_general_dilated=self.conv_general_dilated,
    )
    # BatchNorm computes its statistics and normalises in float32 whatever
    # the input dtype (the float32 statistics promote the arithmetic); its
    # dtype is only the output's.
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      scale_init=self.bn_scale_init,
    )
    return conv, norm

  def _check(self, x: jax.Array) -> None:
    if x.ndim != 4:
      raise ValueError(f"{type(self).__name__} takes a batch of images (N, H, W, C), got shape {x.shape}")
    _check_shape(type(self).__name__, x.shape, self.min_input_size)

  def _head(self, x: jax.Array) -> jax.Array:
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=self.dense_init, name="head")(x)
    return x.astype(jnp.float32)


class Bottleneck(nn.Module):
  """ResNet-50's residual block: 1x1 conv-BN-ReLU, 3x3 conv-BN-ReLU, 1x1 conv-BN, add, ReLU.

  The 3x3 convolution carries the stride (torchvision's "ResNet v1.5"); the
  last 1x1 widens to ``4 * features`` channels, and a 1x1 projection with
  BatchNorm adapts the shortcut when the shape changes.

  Attributes:
    features: channels of the two inner convolutions; the block outputs four
      times as many.
    strides: stride of the 3x3 convolution (and of the shortcut).
    conv: ``nn.Conv`` with the network's dtype, init and convolution bound.
    norm: ``nn.BatchNorm`` bound to the network's mode.
  """

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_features = self.expansion * self.features
    y = self.conv(self.features, (1, 1), 1, padding=0, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.features, (3, 3), self.strides, padding=1, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(out_features, (1, 1), 1, padding=0, name="conv3")(y)
    y = self.norm(name="bn3")(y)
    residual = x
    if self.strides != 1 or x.shape[-1] != out_features:
      residual = self.conv(out_features, (1, 1), self.strides, padding=0, name="shortcut_conv")(x)
      residual = self.norm(name="shortcut_bn")(residual)
    return nn.relu(y + residual)


def _imagenet_stem(x: jax.Array, width: int, conv: ModuleDef, norm: ModuleDef) -> jax.Array:
  """torchvision's ImageNet stem: 7x7 stride-2 conv (padded by 3)-BN-ReLU, 3x3 stride-2 max-pool (padded by 1)."""
  x = conv(width, (7, 7), 2, padding=3, name="stem_conv")(x)
  x = nn.relu(norm(name="stem_bn")(x))
  # Padding with -inf, as PyTorch's MaxPool2d does: a padded pixel never wins.
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNet(_Network):
  """Post-activation ResNet (He et al., 2016), for small images or ImageNet's.

  A stem, stages of :class:`BasicBlock` or :class:`Bottleneck`, global
  average pooling and a Dense classifier. The "cifar" stem is a 3x3
  stride-1 conv-BN-ReLU; the "imagenet" stem is torchvision's 7x7 stride-2
  conv-BN-ReLU and 3x3 stride-2 max-pool, a total stride 4 times larger.

  Attributes:
    stage_sizes: blocks per stage.
    stage_widths: channels per stage before ``width_factor``; the stem has
      ``stage_widths[0]``, a bottleneck stage outputs 4 times its width.
    num_classes: number of logits.
    shortcut: "projection" or "pad" (see :class:`BasicBlock`); bottleneck
      blocks always project.
    block: "basic" (:class:`BasicBlock`) or "bottleneck" (:class:`Bottleneck`).
    stem: "cifar" or "imagenet".
    width_factor: every width (stem and stages) becomes
      ``int(width_factor * width)``, the authors' ``widen_factor`` (their
      width ablation); 1 is the published network.
    conv_init: initialiser of every convolution kernel.
    dense_init: initialiser of the classifier's kernel.
    bn_scale_init: initialiser of every BatchNorm scale.
    dtype: compute dtype; parameters are float32 whatever it is.
    conv_general_dilated: replacement for ``lax.conv_general_dilated`` in
      every convolution, or None for XLA's.
  """

  stage_sizes: Sequence[int]
  stage_widths: Sequence[int]
  num_classes: int
  shortcut: str = "projection"
  block: str = "basic"
  stem: str = "cifar"
  width_factor: float = 1.0
  conv_init: Initializer = HE_FAN_OUT
  dense_init: Initializer = TORCH_LINEAR
  bn_scale_init: Initializer = nn.initializers.ones
  dtype: Any = jnp.float32
  conv_general_dilated: ConvFn | None = None

  @property
  def min_input_size(self) -> int:
    """Smallest image side the model accepts: its total stride."""
    return (4 if self.stem == "imagenet" else 1) * 2 ** (len(self.stage_sizes) - 1)

  @property
  def widths(self) -> tuple[int, ...]:
    """The stage widths after ``width_factor``, rounded down as the authors' ``int()`` does."""
    return tuple(int(self.width_factor * w) for w in self.stage_widths)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits (float32) of a batch of NHWC images."""
    self._check(x)
    if self.stem not in ("cifar", "imagenet") or self.block not in ("basic", "bottleneck"):
      raise ValueError(
        f"stem must be 'cifar' or 'imagenet' and block 'basic' or 'bottleneck', got {self.stem!r}, {self.block!r}"
      )
    if min(self.widths) < 1:
      raise ValueError(f"width_factor {self.width_factor} leaves a stage without channels: widths {self.widths}")
    conv, norm = self._layers(train)
    if self.stem == "imagenet":
      x = _imagenet_stem(x, self.widths[0], conv, norm)
    else:
      x = conv(self.widths[0], (3, 3), 1, padding=1, name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
    for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(size):
        strides = 2 if i > 0 and j == 0 else 1
        name = f"stage{i + 1}_block{j + 1}"
        if self.block == "bottleneck":
          x = Bottleneck(width, strides, conv, norm, name=name)(x)
        else:
          x = BasicBlock(width, strides, self.shortcut, conv, norm, name=name)(x)
    return self._head(x)


class PreActResNet(_Network):
  """Pre-activation ResNet (He et al., 2016) and WideResNet (Zagoruyko, 2016).

  A 3x3 stride-1 stem convolution, stages of :class:`PreActBlock`, a final
  BN-ReLU, global average pooling and a Dense classifier.

  Attributes:
    stem_width: channels of the stem convolution.
    stage_sizes: blocks per stage.
    stage_widths: channels per stage.
    num_classes: number of logits.
    dropout_rate: dropout inside every block; positive values need a
      ``'dropout'`` rng in training (``model.clone(dropout_rate=0.3)``).
    conv_init: initialiser of every convolution kernel.
    dense_init: initialiser of the classifier's kernel.
    bn_scale_init: initialiser of every BatchNorm scale.
    dtype: compute dtype; parameters are float32 whatever it is.
    conv_general_dilated: replacement for ``lax.conv_general_dilated`` in
      every convolution, or None for XLA's.
  """

  stem_width: int
  stage_sizes: Sequence[int]
  stage_widths: Sequence[int]
  num_classes: int
  dropout_rate: float = 0.0
  conv_init: Initializer = HE_FAN_OUT
  dense_init: Initializer = TORCH_LINEAR
  bn_scale_init: Initializer = nn.initializers.ones
  dtype: Any = jnp.float32
  conv_general_dilated: ConvFn | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits (float32) of a batch of NHWC images."""
    self._check(x)
    conv, norm = self._layers(train)
    x = conv(self.stem_width, (3, 3), 1, padding=1, name="stem_conv")(x)
    for i, (size, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      for j in range(size):
        strides = 2 if i > 0 and j == 0 else 1
        name = f"stage{i + 1}_block{j + 1}"
        x = PreActBlock(width, strides, self.dropout_rate, conv, norm, name=name)(x, train)
    x = nn.relu(norm(name="final_bn")(x))
    return self._head(x)


def wide_resnet(depth: int, widen_factor: int, **kwargs: Any) -> PreActResNet:
  """WideResNet-depth-k: (depth - 4) / 6 blocks per stage, widths 16k, 32k, 64k."""
  return PreActResNet(
    stem_width=16,
    stage_sizes=((depth - 4) // 6,) * 3,
    stage_widths=(16 * widen_factor, 32 * widen_factor, 64 * widen_factor),
    # wideresnet.py: kaiming_normal_ (fan_in) convolutions, U(0, 1) BatchNorm
    # scales, PyTorch's default Linear kernel.
    conv_init=HE_FAN_IN,
    bn_scale_init=UNIFORM_01,
    **kwargs,
  )


class DenseLayer(nn.Module):
  """DenseNet-BC's layer: BN-ReLU-1x1 conv (``bn_size * growth_rate``)-BN-ReLU-3x3 conv (``growth_rate``).

  Its output is the input with the ``growth_rate`` new channels concatenated
  after it.

  Attributes:
    growth_rate: channels the layer adds.
    bn_size: the bottleneck's width in multiples of ``growth_rate``.
    conv: ``nn.Conv`` with the network's dtype, init and convolution bound.
    norm: ``nn.BatchNorm`` bound to the network's mode.
  """

  growth_rate: int
  bn_size: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(self.norm(name="bn1")(x))
    y = self.conv(self.bn_size * self.growth_rate, (1, 1), 1, padding=0, name="conv1")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.growth_rate, (3, 3), 1, padding=1, name="conv2")(y)
    return jnp.concatenate([x, y], axis=-1)


class DenseNet(_Network):
  """DenseNet-BC (Huang et al., 2017, "Densely Connected Convolutional Networks").

  A stem of ``2 * growth_rate`` channels, dense blocks of :class:`DenseLayer`
  separated by transitions (BN, optionally ReLU, a 1x1 convolution to
  ``int(compression * channels)`` channels, 2x2 average pooling), then
  BN-ReLU, global average pooling and a Dense classifier.

  Attributes:
    stage_sizes: layers per dense block, (6, 12, 24, 16) for DenseNet-121.
    num_classes: number of logits.
    growth_rate: channels each layer adds (k).
    bn_size: bottleneck width in multiples of ``growth_rate``.
    compression: the share of channels a transition keeps (theta).
    stem: "cifar" (a 3x3 stride-1 convolution alone, as in the authors'
      code) or "imagenet" (torchvision's 7x7 stride-2 conv-BN-ReLU and 3x3
      stride-2 max-pool).
    transition_relu: a ReLU between a transition's BN and its convolution
      (torchvision's, and the original Lua code's); the authors' CIFAR
      DenseNet has none.
    conv_init: initialiser of every convolution kernel.
    dense_init: initialiser of the classifier's kernel.
    bn_scale_init: initialiser of every BatchNorm scale.
    dtype: compute dtype; parameters are float32 whatever it is.
    conv_general_dilated: replacement for ``lax.conv_general_dilated`` in
      every convolution, or None for XLA's.
  """

  stage_sizes: Sequence[int]
  num_classes: int
  growth_rate: int = 32
  bn_size: int = 4
  compression: float = 0.5
  stem: str = "cifar"
  transition_relu: bool = False
  conv_init: Initializer = TORCH_LINEAR
  dense_init: Initializer = TORCH_LINEAR
  bn_scale_init: Initializer = nn.initializers.ones
  dtype: Any = jnp.float32
  conv_general_dilated: ConvFn | None = None

  @property
  def min_input_size(self) -> int:
    """Smallest image side the model accepts: its total stride."""
    return (4 if self.stem == "imagenet" else 1) * 2 ** (len(self.stage_sizes) - 1)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits (float32) of a batch of NHWC images."""
    self._check(x)
    conv, norm = self._layers(train)
    if self.stem == "imagenet":
      x = _imagenet_stem(x, 2 * self.growth_rate, conv, norm)
    elif self.stem == "cifar":
      x = conv(2 * self.growth_rate, (3, 3), 1, padding=1, name="stem_conv")(x)
    else:
      raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")
    for i, size in enumerate(self.stage_sizes):
      if i > 0:
        name = f"transition{i}"
        x = norm(name=f"{name}_bn")(x)
        if self.transition_relu:
          x = nn.relu(x)
        x = conv(int(self.compression * x.shape[-1]), (1, 1), 1, padding=0, name=f"{name}_conv")(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      for j in range(size):
        x = DenseLayer(self.growth_rate, self.bn_size, conv, norm, name=f"block{i + 1}_layer{j + 1}")(x)
    x = nn.relu(norm(name="final_bn")(x))
    return self._head(x)


class ConvBN(nn.Module):
  """Inception's unit: convolution (no bias), BatchNorm, ReLU.

  Attributes:
    features: output channels.
    kernel_size: (height, width) of the kernel.
    strides: stride of the convolution.
    padding: pixels added (low and high) on each side, per spatial axis;
      0 is 'VALID'.
    conv: ``nn.Conv`` with the network's dtype, init and convolution bound.
    norm: ``nn.BatchNorm`` bound to the network's mode.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: int
  padding: tuple[int, int]
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    padding = tuple((p, p) for p in self.padding)
    x = self.conv(self.features, self.kernel_size, self.strides, padding=padding, name="conv")(x)
    return nn.relu(self.norm(name="bn")(x))


def _unit(conv: ModuleDef, norm: ModuleDef) -> Callable[..., ConvBN]:
  """``unit(features, kernel, strides=1, padding=0, name=)``: a :class:`ConvBN` with the network's layers."""

  def unit(
    features: int, kernel: int | tuple[int, int], strides: int = 1, padding: int | tuple[int, int] = 0, *, name: str
  ) -> ConvBN:
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (padding, padding) if isinstance(padding, int) else padding
    return ConvBN(features, kernel, strides, padding, conv, norm, name=name)

  return unit


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionResidual(nn.Module):
  """Inception-ResNet-v2's residual blocks: branches, concat, 1x1 conv (with bias), scale, add, ReLU.

  Attributes:
    kind: "35" (block A, 35x35 at 299 px), "17" (block B) or "8" (block C).
    scale: the residual's weight (0.17, 0.10, 0.20).
    relu: the ReLU after the addition (the very last block 8 has none).
    conv: ``nn.Conv`` with the network's dtype, init and convolution bound.
    norm: ``nn.BatchNorm`` bound to the network's mode.
  """

  kind: str
  scale: float
  relu: bool
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    unit = _unit(self.conv, self.norm)
    # Each branch: its units in order.
    if self.kind == "35":
      branches = [
        [unit(32, 1, name="branch0")],
        [unit(32, 1, name="branch1_0"), unit(32, 3, padding=1, name="branch1_1")],
        [
          unit(32, 1, name="branch2_0"),
          unit(48, 3, padding=1, name="branch2_1"),
          unit(64, 3, padding=1, name="branch2_2"),
        ],
      ]
    elif self.kind == "17":
      branches = [
        [unit(192, 1, name="branch0")],
        [
          unit(128, 1, name="branch1_0"),
          unit(160, (1, 7), padding=(0, 3), name="branch1_1"),
          unit(192, (7, 1), padding=(3, 0), name="branch1_2"),
        ],
      ]
    elif self.kind == "8":
      branches = [
        [unit(192, 1, name="branch0")],
        [
          unit(192, 1, name="branch1_0"),
          unit(224, (1, 3), padding=(0, 1), name="branch1_1"),
          unit(256, (3, 1), padding=(1, 0), name="branch1_2"),
        ],
      ]
    else:
      raise ValueError(f"kind must be '35', '17' or '8', got {self.kind!r}")
    outputs = []
    for units in branches:
      y = x
      for layer in units:
        y = layer(y)
      outputs.append(y)
    y = jnp.concatenate(outputs, axis=-1)
    y = self.conv(x.shape[-1], (1, 1), 1, padding=0, use_bias=True, name="up")(y)
    y = x + self.scale * y
    return nn.relu(y) if self.relu else y


class InceptionResNetV2(_Network):
  """Inception-ResNet-v2 (Szegedy et al., 2017, "Inception-v4, Inception-ResNet and the Impact of Residual Connections").

  The stem, mixed 5b, ``block_repeats[0]`` blocks 35 (scale 0.17), mixed
  6a, ``block_repeats[1]`` blocks 17 (scale 0.10), mixed 7a,
  ``block_repeats[2]`` blocks 8 (scale 0.20) and one more without ReLU, a
  1x1 conv to 1536 channels, global average pooling and a Dense classifier.
  Every convolution but the blocks' residual 1x1 is a :class:`ConvBN` with
  BatchNorm epsilon 1e-3. The published network, ``(10, 20, 9)``, maps 299
  px images to 8x8 before pooling; the smallest image it takes is 75 px.

  Attributes:
    num_classes: number of logits.
    block_repeats: blocks 35, 17 and 8 (before the last block 8).
    conv_init: initialiser of every convolution kernel.
    dense_init: initialiser of the classifier's kernel.
    bn_scale_init: initialiser of every BatchNorm scale.
    dtype: compute dtype; parameters are float32 whatever it is.
    conv_general_dilated: replacement for ``lax.conv_general_dilated`` in
      every convolution, or None for XLA's.
  """

  num_classes: int
  block_repeats: Sequence[int] = (10, 20, 9)
  conv_init: Initializer = TORCH_LINEAR
  dense_init: Initializer = TORCH_LINEAR
  bn_scale_init: Initializer = nn.initializers.ones
  dtype: Any = jnp.float32
  conv_general_dilated: ConvFn | None = None

  @property
  def min_input_size(self) -> int:
    """Smallest image side the model accepts: 75 px leaves mixed 7a a 3x3 map and the head a 1x1 one."""
    # Five 3x3 'VALID' stride-2 reductions and two 'VALID' 3x3 convolutions:
    # 75 -> 37 -> 35 -> 17 -> 15 -> 7 -> 3 -> 1.
    return 75

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits (float32) of a batch of NHWC images."""
    self._check(x)
    conv, norm = self._layers(train)
    norm = functools.partial(norm, epsilon=1e-3)  # TensorFlow's value, kept by the PyTorch ports
    unit = _unit(conv, norm)
    x = unit(32, 3, 2, name="conv2d_1a")(x)
    x = unit(32, 3, name="conv2d_2a")(x)
    x = unit(64, 3, padding=1, name="conv2d_2b")(x)
    x = _max_pool_3x3_s2(x)
    x = unit(80, 1, name="conv2d_3b")(x)
    x = unit(192, 3, name="conv2d_4a")(x)
    x = _max_pool_3x3_s2(x)
    # Mixed 5b: 192 -> 96 + 64 + 96 + 64 = 320 channels.
    pooled = nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)
    x = jnp.concatenate(
      [
        unit(96, 1, name="mixed_5b_branch0")(x),
        unit(64, 5, padding=2, name="mixed_5b_branch1_1")(unit(48, 1, name="mixed_5b_branch1_0")(x)),
        unit(96, 3, padding=1, name="mixed_5b_branch2_2")(
          unit(96, 3, padding=1, name="mixed_5b_branch2_1")(unit(64, 1, name="mixed_5b_branch2_0")(x))
        ),
        unit(64, 1, name="mixed_5b_branch3")(pooled),
      ],
      axis=-1,
    )
    for j in range(self.block_repeats[0]):
      x = InceptionResidual("35", 0.17, True, conv, norm, name=f"block35_{j + 1}")(x)
    # Mixed 6a: 320 -> 384 + 384 + 320 = 1088 channels.
    x = jnp.concatenate(
      [
        unit(384, 3, 2, name="mixed_6a_branch0")(x),
        unit(384, 3, 2, name="mixed_6a_branch1_2")(
          unit(256, 3, padding=1, name="mixed_6a_branch1_1")(unit(256, 1, name="mixed_6a_branch1_0")(x))
        ),
        _max_pool_3x3_s2(x),
      ],
      axis=-1,
    )
    for j in range(self.block_repeats[1]):
      x = InceptionResidual("17", 0.10, True, conv, norm, name=f"block17_{j + 1}")(x)
    # Mixed 7a: 1088 -> 384 + 288 + 320 + 1088 = 2080 channels.
    x = jnp.concatenate(
      [
        unit(384, 3, 2, name="mixed_7a_branch0_1")(unit(256, 1, name="mixed_7a_branch0_0")(x)),
        unit(288, 3, 2, name="mixed_7a_branch1_1")(unit(256, 1, name="mixed_7a_branch1_0")(x)),
        unit(320, 3, 2, name="mixed_7a_branch2_2")(
          unit(288, 3, padding=1, name="mixed_7a_branch2_1")(unit(256, 1, name="mixed_7a_branch2_0")(x))
        ),
        _max_pool_3x3_s2(x),
      ],
      axis=-1,
    )
    for j in range(self.block_repeats[2]):
      x = InceptionResidual("8", 0.20, True, conv, norm, name=f"block8_{j + 1}")(x)
    x = InceptionResidual("8", 1.0, False, conv, norm, name="block8_last")(x)
    x = unit(1536, 1, name="conv2d_7b")(x)
    return self._head(x)


# He et al.'s CIFAR ResNets as in resnetv2.py: option-A shortcuts and
# kaiming_normal_ (fan_in) for convolutions and the classifier alike.
_WIDTHS_64_512 = (64, 128, 256, 512)


# The families the --model entries of saner_jax.train.model_entries build from.
def cifar_resnet(stage_sizes: Sequence[int], **kwargs: Any) -> ResNet:
  """He et al.'s CIFAR ResNet (6n+2 layers): widths 16, 32, 64, zero-padded shortcuts.

  The authors' ``resnetv2.py``: kaiming_normal_ (fan_in) convolutions and Dense kernel.
  """
  return ResNet(
    stage_sizes=tuple(stage_sizes),
    stage_widths=(16, 32, 64),
    shortcut="pad",
    conv_init=HE_FAN_IN,
    dense_init=HE_FAN_IN,
    **kwargs,
  )


def resnet(stage_sizes: Sequence[int], **kwargs: Any) -> ResNet:
  """The authors' CIFAR ``resnet.py`` (3x3 stem, no max-pool): widths 64 to 512.

  Projection shortcuts, kaiming_normal_(mode="fan_out") convolutions and
  PyTorch's default Linear kernel: :class:`ResNet`'s defaults.
  """
  return ResNet(stage_sizes=tuple(stage_sizes), stage_widths=_WIDTHS_64_512, **kwargs)


def imagenet_resnet(stage_sizes: Sequence[int], **kwargs: Any) -> ResNet:
  """torchvision's ImageNet ResNet (7x7 stem and max-pool; the authors' ``resnet*_webvision``).

  kaiming_normal_(mode="fan_out") convolutions, BatchNorm scales 1, PyTorch's default Linear kernel.
  """
  return ResNet(stage_sizes=tuple(stage_sizes), stage_widths=_WIDTHS_64_512, stem="imagenet", **kwargs)


def preact_resnet(stage_sizes: Sequence[int], **kwargs: Any) -> PreActResNet:
  """He et al.'s (2016) pre-activation ResNet, widths 64 to 512, initialised like :func:`resnet`."""
  return PreActResNet(stem_width=64, stage_sizes=tuple(stage_sizes), stage_widths=_WIDTHS_64_512, **kwargs)


def densenet(stage_sizes: Sequence[int], *, imagenet: bool = False, **kwargs: Any) -> DenseNet:
  """DenseNet-BC: the authors' CIFAR ``densenet.py``, or torchvision's with ``imagenet``.

  The CIFAR form has a 3x3 stem without BatchNorm, transitions without ReLU
  and PyTorch's default initialisation everywhere (:class:`DenseNet`'s
  defaults); torchvision's has the ImageNet stem, ReLU in the transitions
  and kaiming_normal_ (fan_in) convolutions.
  """
  if imagenet:
    kwargs = dict(stem="imagenet", transition_relu=True, conv_init=HE_FAN_IN, **kwargs)
  return DenseNet(stage_sizes=tuple(stage_sizes), **kwargs)


def inception_resnet_v2(**kwargs: Any) -> InceptionResNetV2:
  """Inception-ResNet-v2, the authors' port (timm's)."""
  return InceptionResNetV2(**kwargs)


MODELS: Mapping[str, Callable[..., nn.Module]] = registry.View("model", lambda entry: entry.build)
"""Model name -> builder taking ``num_classes``, ``dtype`` and ``conv_general_dilated``.

A live view of :func:`saner_jax.train.registry.models`: a model registered
with :func:`saner_jax.train.registry.register_model` shows up here and in
``--model``."""


def width_models() -> tuple[str, ...]:
  """The models of :data:`MODELS` that take a width factor (``create_model(..., width=)``): the CIFAR ResNets."""
  return tuple(
    name
    for name, factory in MODELS.items()
    if isinstance(model := factory(num_classes=1), ResNet) and model.stem == "cifar"
  )


def create_model(
  name: str,
  num_classes: int,
  *,
  width: float = 1.0,
  dtype: Any = jnp.float32,
  conv_general_dilated: ConvFn | None = None,
) -> nn.Module:
  """Builds a model of :data:`MODELS` by name.

  Args:
    name: a key of :data:`MODELS`.
    num_classes: number of logits.
    width: multiplies every channel count of a CIFAR ResNet (rounded down,
      as the authors' ``widen_factor`` does): ``width=2`` doubles the
      widths and about quadruples the parameters and the compute. Only the
      models of :func:`width_models` take a width other than 1.
    dtype: compute dtype (``jnp.bfloat16`` for mixed precision). Parameters
      and BatchNorm statistics stay float32, logits are float32.
    conv_general_dilated: a function with ``jax.lax.conv_general_dilated``'s
      signature, used by every convolution of the model instead of XLA's
      (flax passes it ``(inputs, kernel, strides, padding, lhs_dilation=,
      rhs_dilation=, dimension_numbers=, feature_group_count=, precision=)``
      with NHWC inputs, HWIO kernels and ``padding`` as explicit (low, high)
      pairs: one pixel for the 3x3 convolutions of the ResNets, none for
      the 1x1); None keeps XLA's.

  Returns:
    The flax module; call it as ``model.apply(variables, x, train=...)``.

  Raises:
    ValueError: unknown name, a non-positive ``num_classes``, or a width
      that the model does not take or that leaves a layer without channels.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  model = MODELS[name](num_classes=num_classes, dtype=dtype, conv_general_dilated=conv_general_dilated)
  if width == 1.0:
    return model
  if name not in width_models():
    raise ValueError(f"model {name!r} has no width factor; the models that do: {', '.join(width_models())}")
  if not (isinstance(width, (int, float, np.integer, np.floating)) and math.isfinite(width) and width > 0):
    raise ValueError(f"width must be a positive number, got {width!r}")
  model = model.clone(width_factor=float(width))
  if min(model.widths) < 1:
    raise ValueError(
      f"width {width} leaves model {name!r} a stage without channels (widths {model.widths}); "
      f"the smallest width it takes is {1 / min(model.stage_widths):g}"
    )
  return model


def check_input(name: str, input_shape: Sequence[int]) -> None:
  """Raises ValueError when model ``name`` cannot take images of ``input_shape``.

  Meant for failing fast, before any data is loaded or anything compiled.

  Args:
    name: a key of :data:`MODELS`.
    input_shape: one image's shape (H, W, C), or a batch's (N, H, W, C).

  Raises:
    ValueError: unknown name, a shape that is not (N,) H, W, C with positive
      sizes, or an image smaller than the model's total stride; the message
      names the model and the shape.
  """
  model = create_model(name, 1)
  _check_shape(f"model {name!r}", input_shape, getattr(model, "min_input_size", 1))


def init_model(model: nn.Module, rng: jax.Array, input_shape: Sequence[int]) -> tuple[Any, Any]:
  """Initialises a model from one dummy image, compiled.

  Args:
    model: a module from :func:`create_model`.
    rng: a PRNG key.
    input_shape: one image's shape (H, W, C), or a batch's (N, H, W, C)
      whose batch size is ignored.

  Returns:
    ``(params, batch_stats)``, float32 pytrees.

  Raises:
    ValueError: the model cannot take images of ``input_shape``.
  """
  _check_shape(type(model).__name__, input_shape, getattr(model, "min_input_size", 1))
  dummy = jnp.zeros((1, *tuple(input_shape)[-3:]), jnp.float32)
  init = jax.jit(functools.partial(model.init, train=False)).lower(rng, dummy)
  # It runs once: on the CPU, LLVM's optimisation of its random-number kernels
  # takes longer than it saves (ResNet-8 on a busy 2-core machine: 42 s against 7 s).
  # Unoptimised code rounds a few initial weights differently in the last bit.
  # Any: jax's CompilerOptions alias says str | bool, but XLA takes this int option as an int.
  options: dict[str, Any] = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
  variables = init.compile(compiler_options=options)(rng, dummy)
  return variables["params"], variables["batch_stats"]
