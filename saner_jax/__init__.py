"""saner_jax: SANER, SAM and its kin as composable optax transforms.

The names here are the core: they need only jax, optax and chex. The training
toolkit (Flax models, TFDS data, the CLI) lives in submodules with optional
dependencies: ``saner_jax.data``, ``saner_jax.noise``, ``saner_jax.models``,
``saner_jax.train``.
"""

from saner_jax import diagnostics, parallel
from saner_jax.parallel import data_mesh, sharded_sharpness_aware_grad
from saner_jax.perturbations import asam, friendly_sam, sam, vasso
from saner_jax.saner import alpha_warmup, group_mask, gsam, saner
from saner_jax.sharpness import SharpnessAwareGrads, accumulated_value_and_grad, sharpness_aware_grad

__version__ = "0.1.0"

__all__ = [
    "SharpnessAwareGrads",
    "accumulated_value_and_grad",
    "alpha_warmup",
    "asam",
    "data_mesh",
    "diagnostics",
    "friendly_sam",
    "group_mask",
    "gsam",
    "parallel",
    "sam",
    "saner",
    "sharded_sharpness_aware_grad",
    "sharpness_aware_grad",
    "vasso",
]
