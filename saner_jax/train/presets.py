"""The presets of saner_jax/train/configs, generated from the paper's grid: one function per family.

The YAML files are what users read and what ``--config NAME`` loads; this
module writes them, so the grid (the settings, models and pipelines of the
paper's tables, and the authors' hyperparameters) is written once:

  python -m saner_jax.train.presets           # rewrite the generated files
  python -m saner_jax.train.presets --check   # exit 1 naming each file that differs

A pipeline's values are its registry entry's fields at their defaults, the
authors' (:mod:`saner_jax.train.pipelines`). ``fashion_mnist_quick.yaml`` and
``real/`` are written by hand: single presets, each with its own notes.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

import yaml

from saner_jax.train import registry
from saner_jax.train.config import PRESET_DIR, TrainConfig

PAPER = "Luong et al. (arXiv 2411.17132)"
# The authors' defaults (github.com/lhchau/saner, the paper's App. B), shared by every paper preset.
AUTHORS: dict[str, Any] = {
  "optimizer": "saner",
  "alpha": 0.5,
  "alpha_warmup_epochs": 50,
  "rho": 0.1,
  "lr": 0.1,
  "lr_schedule": "multistep",
  "lr_milestones": [0.5, 0.75],
  "lr_decay": 0.1,
  "momentum": 0.9,
  "weight_decay": 0.0005,
  "batch_size": 128,
  "epochs": 200,
  "augment": True,
  "seed": 0,
}


@dataclasses.dataclass(frozen=True)
class Setting:
  """A dataset and its label noise, a row of the paper's tables."""

  title: str
  values: dict[str, Any]
  note: str = ""

  @property
  def real(self) -> bool:
    return self.values["noise_mode"] == "real"


def _synthetic(dataset: str, title: str, mode: str, rate: float, note: str = "") -> Setting:
  kind = {"symmetric": "symmetric", "asymmetric": "asymmetric", "pair_flip": "asymmetric"}[mode]
  values = {"dataset": dataset, "noise_mode": mode, "noise_rate": rate}
  return Setting(f"{title}, {round(100 * rate)}% {kind} label noise", values, note)


def _real(dataset: str, title: str, key: str, note: str) -> Setting:
  values = {"dataset": dataset, "noise_mode": "real", "noise_rate": 0.0, "noise_label_key": key}
  return Setting(f"{title}, real human label noise ({key}, about 40%)", values, note)


_CIFAR10_ASYM = (
  "Asymmetric noise: the standard CIFAR-10 map (Patrini et al., 2017), truck -> automobile, bird -> airplane, "
  "deer -> horse, cat <-> dog; 40% of each of those five classes is moved."
)
_CIFAR100_ASYM = (
  "Asymmetric noise: the authors' CIFAR-100 map, class c -> (c + 1) mod 100, which is saner_jax's noise_mode "
  "pair_flip (40% of each class is moved; the authors move 40% of all samples, the same in expectation). "
  "saner_jax's noise_mode asymmetric is the other common CIFAR-100 map, each class to the next one within its "
  "super-class: pass --noise_mode asymmetric for it."
)
_REAL = "noise_rate is unused with real labels; the realised rate is logged."
SETTINGS = {
  "cifar10_sym25": _synthetic("cifar10", "CIFAR-10", "symmetric", 0.25),
  "cifar10_sym50": _synthetic("cifar10", "CIFAR-10", "symmetric", 0.5),
  "cifar10_asym40": _synthetic("cifar10", "CIFAR-10", "asymmetric", 0.4, _CIFAR10_ASYM),
  "cifar10n_worse": _real(
    "cifar10_n",
    "CIFAR-10N",
    "worse_label",
    f"Real noise: CIFAR-10N's worse_label set, the one the authors train on. {_REAL}",
  ),
  "cifar100_sym25": _synthetic("cifar100", "CIFAR-100", "symmetric", 0.25),
  "cifar100_sym50": _synthetic("cifar100", "CIFAR-100", "symmetric", 0.5),
  "cifar100_asym40": _synthetic("cifar100", "CIFAR-100", "pair_flip", 0.4, _CIFAR100_ASYM),
  "cifar100n_noisy": _real(
    "cifar100_n", "CIFAR-100N", "noise_label", f"Real noise: CIFAR-100N's noise_label set, its only one. {_REAL}"
  ),
}
# The paper's networks: their names in the text, and the estimated hours of a SAM or SANER run.
MODELS = {"resnet18": ("ResNet-18", "1-2"), "resnet34": ("ResNet-34", "2-4"), "wrn28_10": ("WRN-28-10", "5-10")}


@dataclasses.dataclass(frozen=True)
class PipelinePresets:
  """How a pipeline's presets describe it and what its CPU preset changes."""

  title: str  # the method and its reference
  time: str  # the paper-scale run time, after "Hardware: see paper/_base.yaml."
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # over its fields' defaults
  quick: dict[str, Any] = dataclasses.field(default_factory=dict)  # its Fashion-MNIST preset's values
  quick_note: str = ""


_CPU_COST = (
  "Time: not measured on a GPU. An epoch ({why}) cost {factor} times the plain trainer's on a 2-core CPU with "
  "ResNet-8 (benchmarks/pipeline_cost.py), so plan for a few times the plain trainer's 1-2 hours on an A100/H100."
)
PIPELINE_PRESETS = {
  "bootstrap": PipelinePresets(
    "hard bootstrapping (Reed et al. 2015)",
    "Time, estimated and not measured, on one A100/H100-class GPU: about 1-2 hours per SAM or SANER run, as the "
    "plain trainer.",
    quick={"bootstrap_beta": 0.8},
  ),
  "co_teaching": PipelinePresets(
    "Co-teaching (Han et al. 2018)",
    _CPU_COST.format(why="two networks, one extra forward pass each", factor="3.2"),
    quick={"forget_rate": 0.2, "num_gradual": 5},
    quick_note="num_gradual 5 (authors: 10 of 200 epochs): the forget rate is reached before the quick preset's "
    "networks memorise the wrong labels.",
  ),
  "dividemix": PipelinePresets(
    "DivideMix (Li et al. 2020)",
    _CPU_COST.format(why="two networks, plus a pass over the training set for the mixture", factor="4.0"),
    quick={"pipeline_warmup_epochs": 5},
    quick_note="A 5-epoch warm-up (authors: 10 of 200): the mixture needs the clean/noisy loss gap that the "
    "first epochs open and memorisation later closes.",
  ),
  "plc": PipelinePresets(
    "progressive label correction (PLC, Zhang et al. 2021)",
    "Time, estimated and not measured, on one A100/H100-class GPU: about the plain trainer's, plus one pass over "
    "the training set per epoch for the correction.",
    quick={"pipeline_warmup_epochs": 5},
    quick_note="A 5-epoch warm-up (authors: 10 of 200), so that tau reaches 0.5 by epoch 13 and the last "
    "corrections still precede the lr decays.",
  ),
  "joint_optimization": PipelinePresets(
    "Joint Optimization (Tanaka et al. 2018)",
    "Time, estimated and not measured, on one A100/H100-class GPU: about twice one plain run: two stages of 200 "
    "epochs.",
    extra={"jo_stage1_epochs": 200, "epochs": 400},
    quick={"jo_stage1_epochs": 15, "jo_update_start": 8, "jo_window": 5},
    quick_note="Two stages of 15 epochs in the 30 (same total as the other pipelines); labels updated from epoch 8 "
    "of stage 1, as the authors do from its middle, averaged over 5 epochs (authors: 10).",
  ),
}
# The settings of the paper's Table 7, each run with every pipeline.
PIPELINE_SETTINGS = ("cifar10_sym25", "cifar10_sym50", "cifar100_sym25", "cifar100_sym50")


def _comment(*paragraphs: str | Sequence[str]) -> str:
  """``# `` lines: a string is a paragraph wrapped at 78 columns, a sequence its lines as they are."""
  blocks = []
  for paragraph in paragraphs:
    lines = [paragraph] if isinstance(paragraph, str) else list(paragraph)
    if isinstance(paragraph, str):
      lines = textwrap.wrap(paragraph, 76, break_on_hyphens=False)
    blocks.append("\n".join(f"# {line}" if line else "#" for line in lines))
  return "\n#\n".join(blocks) + "\n"


def _yaml(values: dict[str, Any]) -> str:
  """``key: value`` lines in the given order, a list on one line (``[0.5, 0.75]``)."""
  return "".join(
    f"{k}: [{', '.join(str(x) for x in v)}]\n" if isinstance(v, list) else yaml.safe_dump({k: v}, sort_keys=False)
    for k, v in values.items()
  )


def _file(header: str, values: dict[str, Any]) -> str:
  return f"{header}\n{_yaml(values)}"


def _commands(name: str, seeds: str = "0 1 2") -> list[str]:
  runs = "three seeds" if seeds == "0 1 2" else "two seeds"
  return [
    f"All three optimizers and {runs}, with one figure and one table:",
    f"  python -m saner_jax.train compare --config {name} \\",
    f"      --runs sgd sam saner --seeds {seeds} --out_dir runs/{name}",
    "One run (add --resume to continue it from its last checkpoint):",
    f"  python -m saner_jax.train --config {name} --optimizer sam \\",
    f"      --out_dir runs/{name}/sam_seed0",
  ]


def paper_family() -> dict[str, str]:
  """``paper/_base.yaml`` and ``paper/<setting>_<model>.yaml``: the paper's main tables."""
  base = _comment(
    "The shared part of the paper presets, paper/<setting>_<model>.yaml, which name it with `base: paper/_base` "
    "and add the dataset, the noise, the model and out_dir. Not a preset itself: run one of those.",
    "Luong et al., 'Understanding SAM's Robustness to Noisy Labels through Gradient Down-weighting' (AISTATS "
    "2026, arXiv 2411.17132). The hyperparameters are the authors' defaults. The optimizer is a flag; the "
    "presets' is SANER (SAM with the reweighting).",
    "Data: the preset's TFDS dataset prepared in the array_record format; nothing is downloaded at run time "
    "(docs/data_and_noise.md says how to prepare it; CIFAR-N needs a manual download, which the error message "
    "explains).",
    "Hardware: one GPU with 16 GB or more, or a TPU host (v2-8, v3-8 or larger): the trainer splits each batch "
    "of 128 over all devices, and its default perturbation_mode, synced, keeps the single-GPU algorithm on any "
    "number of them. Each preset gives its time, estimated from the model's FLOPs and not measured; SGD takes "
    "about half of SAM's or SANER's.",
  )
  files = {"paper/_base.yaml": _file(base, AUTHORS)}
  for setting_name, setting in SETTINGS.items():
    for model, (model_title, hours) in MODELS.items():
      name = f"paper/{setting_name}_{model}"
      kind = "real" if setting.real else "synthetic"
      header = _comment(
        f"{setting.title}, {model_title}, 200 epochs.",
        f"The main comparison of SGD, SAM and SANER under {kind} label noise in {PAPER}: best and last test "
        "accuracy and the memorisation of the noisy labels over training. The authors' hyperparameters, the "
        "data and the hardware are in paper/_base.yaml.",
        *([setting.note] if setting.note else []),
        _commands(name),
        f"Hardware: see paper/_base.yaml; about {hours} hours per SAM or SANER run on one A100/H100-class GPU "
        "(estimated, not measured).",
      )
      values = {"base": "paper/_base", **setting.values, "model": model, "out_dir": f"runs/{name}"}
      files[f"{name}.yaml"] = _file(header, values)
  return files


def pipeline_values(pipeline: str) -> dict[str, Any]:
  """The pipeline's own fields at the authors' values: its registry entry's, at their defaults."""
  defaults = TrainConfig()
  fields = registry.pipelines()[pipeline].fields
  return {"pipeline": pipeline, **{f: getattr(defaults, f) for f in fields}, **PIPELINE_PRESETS[pipeline].extra}


def pipeline_family() -> dict[str, str]:
  """``pipelines/_<pipeline>.yaml`` and ``pipelines/<pipeline>_<setting>_resnet18.yaml``: the paper's Table 7."""
  files = {}
  for pipeline, presets in PIPELINE_PRESETS.items():
    base = _comment(
      f"The shared part of the pipelines/{pipeline}_<setting>_resnet18 presets, which name it with "
      f"`base: pipelines/_{pipeline}`: {presets.title} in the noise-robust pipelines of {PAPER[:-1]}, Table 7), "
      "with SGD, SAM or SANER as its optimizer. Not a preset itself: run one of those.",
      "The pipeline's hyperparameters are the authors' (github lhchau/saner, configs/ and baselines/); "
      "docs/pipelines.md gives the maths. The rest, and the data and hardware notes, are paper/_base.yaml's.",
    )
    values = pipeline_values(pipeline)
    files[f"pipelines/_{pipeline}.yaml"] = _file(base, {"base": "paper/_base", **values})
    epochs = values.get("epochs", AUTHORS["epochs"])
    for setting_name in PIPELINE_SETTINGS:
      name = f"pipelines/{pipeline}_{setting_name}_resnet18"
      header = _comment(
        f"{SETTINGS[setting_name].title}, ResNet-18, {epochs} epochs, in {presets.title}.",
        f"The pipeline's values are in pipelines/_{pipeline}.yaml; the authors' hyperparameters, the data and "
        f"the hardware in paper/_base.yaml ({PAPER[:-1]}, Table 7).",
        _commands(name),
        f"Hardware: see paper/_base.yaml. {presets.time}",
      )
      setting = {"base": f"pipelines/_{pipeline}", **SETTINGS[setting_name].values, "model": "resnet18"}
      files[f"{name}.yaml"] = _file(header, {**setting, "out_dir": f"runs/{name}"})
  return files


def quick_pipeline_family() -> dict[str, str]:
  """``pipelines/fashion_mnist_<pipeline>.yaml``: each pipeline on the quick CPU preset."""
  files = {}
  for pipeline, presets in PIPELINE_PRESETS.items():
    name = f"pipelines/fashion_mnist_{pipeline}"
    header = _comment(
      f"Fashion-MNIST with 40% symmetric label noise in {presets.title}: the quick preset (fashion_mnist_quick: "
      "2,000 training images, no augmentation, ResNet-8, 30 epochs, lr 0.05 decayed at epochs 15 and 22), sized "
      "for a 2-core CPU, with the pipeline's epoch counts shortened to 30 epochs; its other hyperparameters are "
      "the authors' defaults." + (f" {presets.quick_note}" if presets.quick_note else ""),
      _commands(name, seeds="0 1")[:3] + ["(benchmarks/reproduce_pipelines.sh runs them all)"],
    )
    values = {"base": "fashion_mnist_quick", "pipeline": pipeline, **presets.quick, "out_dir": f"runs/{name}"}
    files[f"{name}.yaml"] = _file(header, values)
  return files


FAMILIES = (paper_family, pipeline_family, quick_pipeline_family)


def generated() -> dict[str, str]:
  """Every generated preset file's text, by its path under saner_jax/train/configs."""
  return {path: text for family in FAMILIES for path, text in family().items()}


def stale(directory: pathlib.Path = PRESET_DIR) -> list[str]:
  """The generated files that are missing or differ under ``directory``."""
  return [path for path, text in generated().items() if _read(directory / path) != text]


def _read(path: pathlib.Path) -> str | None:
  try:
    return path.read_text()
  except FileNotFoundError:
    return None


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv not in ([], ["--check"]):
    print("usage: python -m saner_jax.train.presets [--check]", file=sys.stderr)
    return 2
  differ = stale()
  if argv == ["--check"]:
    for path in differ:
      print(
        f"error: {PRESET_DIR / path} is not what saner_jax/train/presets.py generates; run "
        "python -m saner_jax.train.presets",
        file=sys.stderr,
      )
    return 1 if differ else 0
  for path, text in generated().items():
    (PRESET_DIR / path).parent.mkdir(parents=True, exist_ok=True)
    (PRESET_DIR / path).write_text(text)
  print(f"wrote {len(differ)} of {len(generated())} generated presets under {PRESET_DIR}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
