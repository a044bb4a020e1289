"""On-device input pipeline: the dataset lives on the accelerator as uint8.

The host uploads the images once. Each epoch's permutation is drawn on the
device from ``(seed, epoch)``, and every step gathers its batch, augments it
(random crop with zero padding, horizontal flip where the dataset allows)
and normalises it inside the jitted step, so the host only launches steps.
Augmentation randomness comes from ``(seed, step)``: a resumed run draws the
same crops as an uninterrupted one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class DeviceData(NamedTuple):
  """A training or test set resident on the device.

  ``labels`` are the labels trained on (noisy); ``true_labels`` and
  ``noise_mask`` are kept to measure memorisation.
  """

  images: jax.Array  # uint8 [N, H, W, C]
  labels: jax.Array  # int32 [N]
  true_labels: jax.Array  # int32 [N]
  noise_mask: jax.Array  # bool [N]

  @property
  def size(self) -> int:
    return self.images.shape[0]


def place(tree, sharding=None):
  """Puts a pytree of host (or single-device) arrays on devices.

  With a ``sharding`` every process uploads only the pieces its own devices
  hold, from its own copy of the values: the same on every process, since
  data, noise and initialisation derive from the seed. That works on one
  host and on several, and sends nothing between hosts.
  """
  if sharding is None:
    return jax.device_put(tree)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, jax.device_get(tree))


def to_device(images, labels, true_labels=None, noise_mask=None, sharding=None) -> DeviceData:
  """Uploads numpy arrays once; ``sharding`` replicates or places them (:func:`place`)."""
  true_labels = labels if true_labels is None else true_labels
  noise_mask = np.zeros(len(labels), bool) if noise_mask is None else noise_mask
  arrays = (
    np.asarray(images, np.uint8),
    np.asarray(labels, np.int32),
    np.asarray(true_labels, np.int32),
    np.asarray(noise_mask, bool),
  )
  return DeviceData(*place(arrays, sharding))


def epoch_permutation(key: jax.Array, epoch: int | jax.Array, size: int) -> jax.Array:
  """The shuffled order of one epoch, a pure function of ``(key, epoch)``."""
  return jax.random.permutation(jax.random.fold_in(key, epoch), size)


def gather(data: DeviceData, indices: jax.Array) -> DeviceData:
  return DeviceData(*(x[indices] for x in data))


def random_crop_flip(key: jax.Array, images: jax.Array, padding: int, flip: bool) -> jax.Array:
  """Per-example random crop from a zero-padded image, and optional h-flip.

  Matches torchvision's ``RandomCrop(size, padding)`` with zero fill and
  ``RandomHorizontalFlip()``, the authors' CIFAR augmentation.
  """
  n, h, w, _ = images.shape
  crop_key, flip_key = jax.random.split(key)
  if padding:
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * padding + 1)
    images = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1])))(
      padded, offsets
    )
  if flip:
    mirrored = jax.random.bernoulli(flip_key, 0.5, (n,))
    images = jnp.where(mirrored[:, None, None, None], images[:, :, ::-1, :], images)
  return images


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
  """uint8 [0, 255] to ``(x / 255 - mean) / std`` per channel."""
  scaled = images.astype(jnp.float32) / 255.0
  out = (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return out.astype(dtype)
