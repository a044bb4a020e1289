"""The built-in networks of ``--model``, one registry entry each.

Each builder imports :mod:`saner_jax.train.models` (and so flax) only when a
run builds its model, so that ``--help`` and reading a config stay free of
flax. The architectures, their parameter counts and what each equals in the
authors' code or torchvision are in :mod:`saner_jax.train.models`. A model of
one's own is one :func:`saner_jax.train.registry.register_model` call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from saner_jax.train.registry import Model, register_model

DENSENET121_BLOCKS = (6, 12, 24, 16)


def _family(name: str, *args: Any, **fixed: Any) -> Callable[..., Any]:
  """A builder of ``models.<name>(*args, **fixed)`` that loads flax when first called."""

  def build(**kwargs: Any) -> Any:
    from saner_jax.train import models

    return getattr(models, name)(*args, **fixed, **kwargs)

  return build


for _entry in (
  # resnet4 is resnet8's first stage alone (stem, one 16-channel block, classifier): a smoke-test
  # network that traces and compiles in a fraction of resnet8's time. resnet8 is resnet20 with one
  # block per stage, for quick CPU runs. Neither is in the authors' code.
  Model("resnet4", _family("cifar_resnet", (1,))),
  Model("resnet8", _family("cifar_resnet", (1, 1, 1))),
  Model("resnet20", _family("cifar_resnet", (3, 3, 3))),
  Model("resnet18", _family("resnet", (2, 2, 2, 2))),
  Model("resnet34", _family("resnet", (3, 4, 6, 3))),
  Model("resnet50", _family("resnet", (3, 4, 6, 3), block="bottleneck")),
  Model("preact_resnet18", _family("preact_resnet", (2, 2, 2, 2))),
  Model("wrn28_10", _family("wide_resnet", 28, 10)),
  Model("wrn40_2", _family("wide_resnet", 40, 2)),
  Model("densenet121", _family("densenet", DENSENET121_BLOCKS)),
  Model("densenet121_imagenet", _family("densenet", DENSENET121_BLOCKS, imagenet=True)),
  Model("resnet18_imagenet", _family("imagenet_resnet", (2, 2, 2, 2))),
  Model("resnet50_imagenet", _family("imagenet_resnet", (3, 4, 6, 3), block="bottleneck")),
  Model("inception_resnet_v2", _family("inception_resnet_v2")),
):
  register_model(_entry)
