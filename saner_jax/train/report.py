"""Deprecated alias of :mod:`saner_jax.train.reporting` (renamed in 0.2.0, removed in 0.3.0)."""

from saner_jax._moved import redirect

redirect(__name__, "saner_jax.train.reporting")
