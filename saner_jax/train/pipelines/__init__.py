"""Noise-robust training pipelines that run with any optimizer of the SAM family.

The SANER paper (arXiv 2411.17132, Table 7) runs five of them with
SGD, SAM and SANER: hard bootstrapping, Co-teaching, DivideMix, progressive
label correction (PLC) and Joint Optimization. Each module holds the
pipeline's pure, jit-able pieces (losses, selections, label updates) with
the authors' defaults; :mod:`saner_jax.train.pipelines.recipes` runs them in
the trainer (``python -m saner_jax.train --pipeline NAME``). Each is
registered below (:mod:`saner_jax.train.registry`) with its config fields,
their checks and its report columns. docs/pipelines.md gives the maths and
the references.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from saner_jax import _lazy
from saner_jax.train.config import at_least, fail, in_unit_interval
from saner_jax.train.registry import Pipeline, register_pipeline

# The modules load on first use (PEP 562): they need JAX, the registry entries do not.
_MODULES = ("bootstrap", "co_teaching", "common", "dividemix", "joint_optimization", "plc", "recipes")

if TYPE_CHECKING:
  # What type checkers and editors see; at run time __getattr__ loads these.
  from saner_jax.train.pipelines import bootstrap, co_teaching, common, dividemix, joint_optimization, plc, recipes

__all__ = ["bootstrap", "co_teaching", "common", "dividemix", "joint_optimization", "plc", "recipes"]


__getattr__, __dir__ = _lazy.attach(__name__, _MODULES)


def _recipe(name: str) -> Callable[[Any], Any]:
  """The recipe ``recipes.<name>``, imported when a run is built."""

  def recipe(run):
    from saner_jax.train.pipelines import recipes

    return getattr(recipes, name)(run)

  recipe.__name__ = recipe.__qualname__ = name
  return recipe


def _check_warmup(config, last_warm: int) -> None:
  # A warm-up over the whole run would train plainly under the pipeline's name.
  at_least(config, 0, "pipeline_warmup_epochs")
  if config.pipeline_warmup_epochs >= last_warm:
    fail(
      "pipeline_warmup_epochs",
      f"{config.pipeline_warmup_epochs} covers all {config.epochs} epochs, so {config.pipeline} would never act "
      f"(plain training); use at most {last_warm - 1}, or more --epochs",
    )


def _check_co_teaching(config) -> None:
  if not 0.0 <= config.forget_rate < 1.0:
    fail("forget_rate", f"must be in [0, 1), got {config.forget_rate}")
  at_least(config, 0, "num_gradual", "forget_exponent")


def _check_dividemix(config) -> None:
  in_unit_interval(config, "p_threshold")
  at_least(config, 0, "lambda_u")
  for field in ("sharpen_temperature", "mixup_alpha"):
    if getattr(config, field) <= 0:
      fail(field, f"must be > 0, got {getattr(config, field)}")
  _check_warmup(config, config.epochs)  # co-divides from the epoch after its warm-up


def _check_plc(config) -> None:
  at_least(config, 0, "tau_step")
  if config.tau_end > config.tau_start:
    fail("tau_end", f"must be <= tau_start {config.tau_start}, got {config.tau_end}")
  _check_warmup(config, config.epochs + 1)  # corrects labels after epoch warmup_epochs


def _check_joint_optimization(config) -> None:
  at_least(config, 0, "jo_alpha", "jo_beta")
  at_least(config, 1, "jo_window")
  if not 1 <= config.jo_stage1_epochs_resolved < config.epochs:
    fail(
      "jo_stage1_epochs", f"must leave both stages an epoch: in [1, {config.epochs - 1}], got {config.jo_stage1_epochs}"
    )


# What the selection and correction pipelines log, drawn and tabulated when a run logged it.
_SELECTION_PANELS = (
  ("clean_precision", "judged clean: label precision"),
  ("clean_recall", "judged clean: share of the clean samples"),
  ("clean_fraction", "share of samples judged clean"),
)
_SELECTION_COLUMNS = (
  ("clean_precision", "judged clean: precision % (final)"),
  ("clean_recall", "judged clean: recall % (final)"),
)
_LABEL_PANELS = (("label_accuracy", "corrected labels: accuracy"),)
_LABEL_COLUMNS = (("label_accuracy", "label accuracy % (final)"),)

register_pipeline(
  Pipeline(
    "bootstrap",
    _recipe("bootstrap_recipe"),
    fields=("bootstrap_beta",),
    check=lambda config: in_unit_interval(config, "bootstrap_beta"),
  )
)
register_pipeline(
  Pipeline(
    "co_teaching",
    _recipe("co_teaching_recipe"),
    fields=("forget_rate", "num_gradual", "forget_exponent"),
    check=_check_co_teaching,
    panels=_SELECTION_PANELS,
    columns=_SELECTION_COLUMNS,
  )
)
register_pipeline(
  Pipeline(
    "dividemix",
    _recipe("dividemix_recipe"),
    fields=("pipeline_warmup_epochs", "p_threshold", "lambda_u", "sharpen_temperature", "mixup_alpha"),
    check=_check_dividemix,
    panels=_SELECTION_PANELS,
    columns=_SELECTION_COLUMNS,
  )
)
register_pipeline(
  Pipeline(
    "plc",
    _recipe("plc_recipe"),
    fields=("pipeline_warmup_epochs", "tau_start", "tau_end", "tau_step"),
    check=_check_plc,
    panels=_LABEL_PANELS,
    columns=_LABEL_COLUMNS,
  )
)
register_pipeline(
  Pipeline(
    "joint_optimization",
    _recipe("joint_optimization_recipe"),
    fields=("jo_alpha", "jo_beta", "jo_window", "jo_update_start", "jo_stage1_epochs"),
    check=_check_joint_optimization,
    panels=_LABEL_PANELS,
    columns=_LABEL_COLUMNS,
  )
)
