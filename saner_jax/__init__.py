"""saner_jax: SANER, SAM and its kin as composable optax transforms.

The package has three tiers:

- the core, whose names are exported here, needs only jax, optax and chex and
  works on any parameter pytree;
- ``saner_jax.train``, the training toolkit (Flax models, TFDS data, label
  noise, orbax checkpoints, the CLI), needs the ``train`` extra;
- ``saner_jax.cpu_conv``, oneDNN convolutions for XLA:CPU, needs a C++
  compiler and oneDNN at run time.
"""

import sys as _sys
import warnings
from typing import Any

from saner_jax import _cli_signals

# The training CLI handles Ctrl-C and SIGTERM from its first second on, before
# JAX is imported (saner_jax/_cli_signals.py); importing the library changes nothing.
if _cli_signals.running_the_cli(getattr(_sys, "orig_argv", [])):
  _cli_signals.install(raising=False)  # recorded, raised once the CLI runs

from saner_jax import analysis, diagnostics, parallel, policies
from saner_jax.parallel import data_mesh, sharded_sharpness_aware_grad
from saner_jax.perturbations import asam, friendly_sam, sam, vasso
from saner_jax.policies import SharpnessPolicy, adaptive_steps, every_k_steps, random_steps, with_policy
from saner_jax.saner import alpha_warmup, group_mask, gsam, saner, substitute_groups
from saner_jax.sharpness import SharpnessAwareGrads, accumulated_value_and_grad, aux_layout, sharpness_aware_grad

__version__ = "0.2.0"

__all__ = [
  "SharpnessAwareGrads",
  "SharpnessPolicy",
  "accumulated_value_and_grad",
  "adaptive_steps",
  "alpha_warmup",
  "analysis",
  "asam",
  "aux_layout",
  "data_mesh",
  "diagnostics",
  "every_k_steps",
  "friendly_sam",
  "group_mask",
  "gsam",
  "parallel",
  "policies",
  "random_steps",
  "sam",
  "saner",
  "sharded_sharpness_aware_grad",
  "sharpness_aware_grad",
  "substitute_groups",
  "vasso",
  "with_policy",
]


def __getattr__(name: str) -> Any:
  # The class behind the deprecated aux_layout, kept importable for one release.
  if name == "AuxLayout":
    warnings.warn(
      "saner_jax.AuxLayout is deprecated (saner_jax 0.3.0) and goes in 0.4.0: sharpness_aware_grad merges the aux "
      "itself (aux_reducers)",
      DeprecationWarning,
      stacklevel=2,
    )
    from saner_jax.sharpness import _AuxLayout

    return _AuxLayout
  raise AttributeError(f"module 'saner_jax' has no attribute {name!r}")
