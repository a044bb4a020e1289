"""Noise-robust training pipelines that run with any optimizer of the SAM family.

The SANER paper (arXiv 2411.17132, Table 7) runs five of them with
SGD, SAM and SANER: hard bootstrapping, Co-teaching, DivideMix, progressive
label correction (PLC) and Joint Optimization. Each module holds the
pipeline's pure, jit-able pieces (losses, selections, label updates) with
the authors' defaults; the trainer (``python -m saner_jax.train --pipeline
NAME``) runs them. docs/pipelines.md gives the maths and the references.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saner_jax import _lazy

# "none" is the plain trainer.
PIPELINES = ("none", "bootstrap", "co_teaching", "dividemix", "plc", "joint_optimization")

# The modules load on first use (PEP 562): they need JAX, the list of names does not.
_MODULES = ("bootstrap", "co_teaching", "common", "dividemix", "joint_optimization", "plc")

if TYPE_CHECKING:
  # What type checkers and editors see; at run time __getattr__ loads these.
  from saner_jax.train.pipelines import bootstrap, co_teaching, common, dividemix, joint_optimization, plc

__all__ = ["PIPELINES", "bootstrap", "co_teaching", "common", "dividemix", "joint_optimization", "plc"]


__getattr__, __dir__ = _lazy.attach(__name__, _MODULES)
