"""Deprecated: the two-pass helper's module is :mod:`saner_jax.two_pass`; this alias goes in saner_jax 0.4.0.

``saner_jax.sharpness_aware_grad`` and the other names are unchanged; only
the module was renamed, because the sharpness *measures* live in
:mod:`saner_jax.analysis`.
"""

import warnings

from saner_jax.two_pass import SharpnessAwareGrads, accumulated_value_and_grad, aux_layout, sharpness_aware_grad

warnings.warn(
  "saner_jax.sharpness is deprecated (saner_jax 0.3.0) and goes in 0.4.0: import saner_jax.two_pass, or use "
  "saner_jax.sharpness_aware_grad",
  DeprecationWarning,
  stacklevel=2,
)

__all__ = ["SharpnessAwareGrads", "accumulated_value_and_grad", "aux_layout", "sharpness_aware_grad"]
