"""The SAM family the trainer runs, ``--optimizer NAME``: one registry entry each.

Each entry builds its core transform (:mod:`saner_jax.perturbations`) from
the config and owns the config fields only it reads. ``--optimizer saner`` is
not an entry: it is SAM with SANER on. The optimizer chain around them is
built by :func:`saner_jax.train.step.build_optimizer`.
"""

from __future__ import annotations

import saner_jax  # lazy: the builders load the core when a run is built
from saner_jax.train.config import at_least, in_unit_interval
from saner_jax.train.registry import Perturbation, register_perturbation

register_perturbation(Perturbation("sgd", build=lambda config: None, two_pass=False))
register_perturbation(Perturbation("sam", build=lambda config: saner_jax.sam(config.rho)))
register_perturbation(
  Perturbation(
    "asam",
    build=lambda config: saner_jax.asam(config.rho, config.asam_eta),
    fields=("asam_eta",),
    check=lambda config: at_least(config, 0, "asam_eta"),
  )
)


def _check_friendly_sam(config) -> None:
  at_least(config, 0, "fsam_sigma")
  in_unit_interval(config, "fsam_lmbda")


register_perturbation(
  Perturbation(
    "friendly_sam",
    build=lambda config: saner_jax.friendly_sam(config.rho, config.fsam_sigma, config.fsam_lmbda),
    fields=("fsam_sigma", "fsam_lmbda"),
    check=_check_friendly_sam,
  )
)
register_perturbation(
  Perturbation(
    "vasso",
    build=lambda config: saner_jax.vasso(config.rho, config.vasso_theta),
    fields=("vasso_theta",),
    check=lambda config: in_unit_interval(config, "vasso_theta"),
  )
)
# GSAM ascends as SAM does; its projection of the clean gradient heads the update chain.
register_perturbation(
  Perturbation(
    "gsam",
    build=lambda config: saner_jax.sam(config.rho),
    update=lambda config: saner_jax.gsam(config.gsam_alpha),
    fields=("gsam_alpha",),
    check=lambda config: at_least(config, 0, "gsam_alpha"),
  )
)
