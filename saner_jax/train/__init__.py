"""The training toolkit: configs, the on-device pipeline, steps, loop and CLI.

Needs the ``train`` extra (flax, tensorflow-datasets, orbax, matplotlib).
"""

from saner_jax.train.config import ConfigError, TrainConfig
from saner_jax.train.loop import train

__all__ = ["ConfigError", "TrainConfig", "train"]
