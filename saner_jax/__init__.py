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
import types
import warnings
from typing import TYPE_CHECKING, Any

from saner_jax import _cli_signals, _lazy

# The training CLI handles Ctrl-C and SIGTERM from its first second on, before
# JAX is imported (saner_jax/_cli_signals.py); importing the library changes nothing.
if _cli_signals.running_the_cli(getattr(_sys, "orig_argv", [])):
  _cli_signals.install(raising=False)  # recorded, raised once the CLI runs

__version__ = "0.2.0"

# The core's names load on first use (PEP 562), so that what needs none of
# them (the CLI's --help, reading a config) does not pay for importing JAX.
_SUBMODULES = ("analysis", "diagnostics", "parallel", "policies")
_NAMES = {
  "data_mesh": "parallel",
  "sharded_sharpness_aware_grad": "parallel",
  "asam": "perturbations",
  "friendly_sam": "perturbations",
  "sam": "perturbations",
  "vasso": "perturbations",
  "SharpnessPolicy": "policies",
  "adaptive_steps": "policies",
  "every_k_steps": "policies",
  "random_steps": "policies",
  "scale_one_pass_steps": "policies",
  "with_policy": "policies",
  "alpha_warmup": "saner",
  "group_mask": "saner",
  "gsam": "saner",
  "saner": "saner",
  "substitute_groups": "saner",
  "SharpnessAwareGrads": "two_pass",
  "accumulated_value_and_grad": "two_pass",
  "aux_layout": "two_pass",
  "sharpness_aware_grad": "two_pass",
}

if TYPE_CHECKING:
  # What type checkers and editors see; at run time __getattr__ loads these.
  from saner_jax import analysis, diagnostics, parallel, policies
  from saner_jax.parallel import data_mesh, sharded_sharpness_aware_grad
  from saner_jax.perturbations import asam, friendly_sam, sam, vasso
  from saner_jax.policies import (
    SharpnessPolicy,
    adaptive_steps,
    every_k_steps,
    random_steps,
    scale_one_pass_steps,
    with_policy,
  )
  from saner_jax.saner import alpha_warmup, group_mask, gsam, saner, substitute_groups
  from saner_jax.two_pass import SharpnessAwareGrads, accumulated_value_and_grad, aux_layout, sharpness_aware_grad

# Written out, not computed, so that type checkers see what the package exports.
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
  "scale_one_pass_steps",
  "sharded_sharpness_aware_grad",
  "sharpness_aware_grad",
  "substitute_groups",
  "vasso",
  "with_policy",
]


def _deprecated(name: str) -> Any:
  # The class behind the deprecated aux_layout, kept importable for one release.
  if name == "AuxLayout":
    warnings.warn(
      "saner_jax.AuxLayout is deprecated (saner_jax 0.3.0) and goes in 0.4.0: sharpness_aware_grad merges the aux "
      "itself (aux_reducers)",
      DeprecationWarning,
      stacklevel=3,
    )
    from saner_jax.two_pass import _AuxLayout

    return _AuxLayout
  raise AttributeError(f"module 'saner_jax' has no attribute {name!r}")


__getattr__, __dir__ = _lazy.attach(__name__, _SUBMODULES, _NAMES, _deprecated)


class _Package(types.ModuleType):
  # ``saner`` names both the transform and its module. Importing the module
  # (``from saner_jax.saner import ...``, done by other core modules) makes
  # the import system set the package attribute to the module; the public
  # name is the transform, as it was when this package imported eagerly.
  def __setattr__(self, name: str, value: Any) -> None:
    if not (name == "saner" and isinstance(value, types.ModuleType)):
      super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
