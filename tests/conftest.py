"""Test-wide settings: CPU only, and hypothesis without wall-clock deadlines
(the first call of a jitted function compiles, which a deadline would flag)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import settings  # noqa: E402

settings.register_profile("saner_jax", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("saner_jax")
