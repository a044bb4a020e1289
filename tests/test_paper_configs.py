"""The paper-scale presets in saner_jax/train/configs/paper and pipelines: complete, valid, runnable.

Each preset is checked against the paper's values. One preset per dataset,
noise setting and pipeline trains for one epoch of a tiny batch on
TFDS mock data; the others are shown to be one of those with another model
or setting, so their runs would repeat these. Only what must shrink for CI
is overridden (batch sizes, example counts, epochs, and no checkpoints or
progress output); the dataset, noise and optimizer are the preset's own, and
the model is the smoke-test ResNet-4, since what the runs pin does not depend on it (see
TRAINED and PIPELINE_CI_MODEL); the presets' own models run in test_models.py.
Presets with the same model and class count compile the same train step,
so JAX's persistent compilation cache, in a temporary directory for this
module, turns their compiles into one each."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from conftest import SMOKE_MODEL
from jax.experimental.compilation_cache import compilation_cache

from saner_jax.train import config as config_lib
from saner_jax.train import data, engine, loop, models, noise, registry

PRESETS = [p for p in config_lib.preset_names() if p.startswith("paper/")]
SETTINGS = (
    "cifar10_sym25", "cifar10_sym50", "cifar10_asym40", "cifar10n_worse",
    "cifar100_sym25", "cifar100_sym50", "cifar100_asym40", "cifar100n_noisy",
)  # fmt: skip
MODELS = ("resnet18", "resnet34", "wrn28_10")
# The authors' defaults; every paper preset must use them.
PAPER_VALUES = dict(
  epochs=200,
  batch_size=128,
  lr=0.1,
  momentum=0.9,
  weight_decay=5e-4,
  lr_schedule="multistep",
  lr_milestones=(0.5, 0.75),
  lr_decay=0.1,
  rho=0.1,
  optimizer="saner",
  alpha=0.5,
  alpha_warmup_epochs=50,
  augment=True,
)
# What each setting's presets set over paper/_base, read off their names.
SETTING_VALUES = {
  "cifar10_sym25": dict(dataset="cifar10", noise_mode="symmetric", noise_rate=0.25),
  "cifar10_sym50": dict(dataset="cifar10", noise_mode="symmetric", noise_rate=0.5),
  "cifar10_asym40": dict(dataset="cifar10", noise_mode="asymmetric", noise_rate=0.4),
  "cifar10n_worse": dict(dataset="cifar10_n", noise_mode="real", noise_rate=0.0, noise_label_key="worse_label"),
  "cifar100_sym25": dict(dataset="cifar100", noise_mode="symmetric", noise_rate=0.25),
  "cifar100_sym50": dict(dataset="cifar100", noise_mode="symmetric", noise_rate=0.5),
  # The authors' CIFAR-100 map, c -> c + 1 (the preset's header says why).
  "cifar100_asym40": dict(dataset="cifar100", noise_mode="pair_flip", noise_rate=0.4),
  "cifar100n_noisy": dict(dataset="cifar100_n", noise_mode="real", noise_rate=0.0, noise_label_key="noise_label"),
}
CI_SIZES = dict(batch_size=4, train_examples=4, test_examples=4, eval_batch_size=4, epochs=1)
CI_OUTPUT = dict(checkpoint=False, progress="none")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache_dir(tmp_path_factory):
  """Persistent compilation cache for this module only, restored afterwards."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist: share it with the other workers
    root = root.parent
  previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(root / "jax_compilation_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()  # a cache opened earlier in this process would be kept otherwise
  yield
  jax.config.update("jax_compilation_cache_dir", previous[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
  compilation_cache.reset_cache()


def test_the_grid_is_complete():
  assert sorted(f"paper/{s}_{m}" for s in SETTINGS for m in MODELS) == PRESETS


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_is_valid_with_the_paper_hyperparameters(preset):
  cfg = config_lib.from_mapping(config_lib.load_yaml(preset)).validate()
  assert {k: getattr(cfg, k) for k in PAPER_VALUES} == PAPER_VALUES
  header = config_lib.resolve_preset(preset).read_text()
  assert f"--config {preset}" in header, "the header must show the command line"
  assert "arXiv 2411.17132" in header and "Hardware:" in header


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_sets_its_setting_model_and_out_dir(preset):
  setting, model = next((preset[6 : -len(m) - 1], m) for m in MODELS if preset.endswith(m))
  cfg = config_lib.from_mapping(config_lib.load_yaml(preset))
  expected = {**SETTING_VALUES[setting], "model": model, "out_dir": f"runs/{preset}", "seed": 0, "pipeline": "none"}
  assert {k: getattr(cfg, k) for k in expected} == expected


def test_cifar100_asymmetric_preset_draws_the_authors_map(mock_tfds):
  """Every wrong label of the preset's run is (y + 1) mod 100, across super-classes, as the header says.

  The super-class map (noise_mode asymmetric) agrees with it on 6 classes
  only, so a preset that drew it would fail here.
  """
  preset = "paper/cifar100_asym40_resnet18"
  header = config_lib.resolve_preset(preset).read_text()
  assert "(c + 1) mod 100" in header and "noise_mode pair_flip" in header
  cfg = config_lib.from_mapping({**config_lib.load_yaml(preset), "train_examples": 400, "test_examples": 4})
  with mock_tfds(num_examples=400):
    prepared = engine.prepare_data(cfg)
  true, labels = np.asarray(prepared.train.true_labels), np.asarray(prepared.train.labels)
  wrong = labels != true
  assert wrong.sum() >= 100  # about 40% of 400
  np.testing.assert_array_equal(labels[wrong], (true[wrong] + 1) % 100)
  superclass = noise.asymmetric_map("cifar100")
  assert np.sum(superclass != (np.arange(100) + 1) % 100) == 94
  assert np.mean(superclass[true[wrong]] != labels[wrong]) > 0.8


# Every setting's ResNet-18 preset trains, which covers each dataset and
# noise setting. What a setting pins (its data, labels and noise reaching the
# run, the model the loop asks for) does not depend on the network, so they
# train the smoke-test ResNet-4. The presets' own networks (ResNet-18, ResNet-34, WRN-28-10)
# each run a forward and backward pass in test_models.py, where a compile
# without LLVM's optimisations costs a third of a training run's. The other
# presets are their setting's ResNet-18 preset with another model
# (test_preset_is_its_settings_resnet18_preset_with_another_model), so
# training them would repeat a run above.
TRAINED = [p for p in PRESETS if p.endswith("resnet18")]
CI_MODEL = SMOKE_MODEL


@pytest.mark.parametrize("preset", [p for p in PRESETS if not p.endswith("resnet18")])
def test_preset_is_its_settings_resnet18_preset_with_another_model(preset):
  model = next(m for m in MODELS if preset.endswith(m))
  resnet18 = config_lib.load_yaml(preset[: -len(model)] + "resnet18")
  assert config_lib.load_yaml(preset) == {**resnet18, "model": model, "out_dir": f"runs/{preset}"}


@pytest.mark.parametrize("preset", TRAINED)
def test_preset_trains_on_mock_data(preset, tmp_path, mock_tfds, monkeypatch):
  values = config_lib.load_yaml(preset)
  values = {**values, "model": CI_MODEL}
  cfg = config_lib.from_mapping({**values, **CI_SIZES, **CI_OUTPUT, "out_dir": str(tmp_path / "run")})
  create = models.create_model
  built = []

  def create_model(name, num_classes, **kwargs):
    built.append((name, num_classes))
    return create(name, num_classes, **kwargs)

  monkeypatch.setattr(models, "create_model", create_model)
  with mock_tfds(num_examples=CI_SIZES["train_examples"]):
    summary = loop.train(cfg)
  # The run trained (built last: validation builds one to check the input
  # size) the model asked for, for its dataset's classes; a preset key the
  # loop ignored, or a dataset read as another, would build another.
  assert built[-1] == (values["model"], data.DATASETS[values["dataset"]].num_classes), built
  final = summary["final"]
  assert np.isfinite(final["train_loss"])
  assert final["group_B"] is not None  # the two-pass (SAM-family) step ran
  # SANER reweighted with the preset's alpha and warm-up: in the first of the
  # warm-up epochs the authors' alpha is 1 - (1 - alpha) / warm-up epochs.
  assert final["alpha"] == pytest.approx(1 - (1 - values["alpha"]) / values["alpha_warmup_epochs"])


# ---------------------------------------------------------------------------
# The noise-robust pipelines' presets (saner_jax/train/configs/pipelines)

PIPELINE_PRESETS = [p for p in config_lib.preset_names() if p.startswith("pipelines/") and p.endswith("_resnet18")]
PIPELINE_NAMES = ("bootstrap", "co_teaching", "dividemix", "plc", "joint_optimization")
# In one CI epoch: the mixture split, a label correction and both stages happen.
# What these runs pin (the pipeline's keys and schedules at work in a run)
# does not depend on the network, so they train the smoke-test ResNet-4: the presets' own
# ResNet-18 (test_pipeline_preset_sets_its_pipeline_setting_and_out_dir)
# runs in test_models.py, and in each pipeline's two-network step it would
# be ten more cold compiles of a minute each.
PIPELINE_CI_MODEL = {"model": CI_MODEL}
PIPELINE_CI = {
  "dividemix": {"pipeline_warmup_epochs": 0},
  "plc": {"pipeline_warmup_epochs": 1},
  "joint_optimization": {"epochs": 2, "jo_stage1_epochs": 1, "jo_update_start": 1},
}


def test_the_pipeline_grid_is_complete():
  settings = ("cifar10_sym25", "cifar10_sym50", "cifar100_sym25", "cifar100_sym50")
  assert sorted(f"pipelines/{p}_{s}_resnet18" for p in PIPELINE_NAMES for s in settings) == PIPELINE_PRESETS


@pytest.mark.parametrize("preset", PIPELINE_PRESETS)
def test_pipeline_preset_has_the_authors_values(preset):
  cfg = config_lib.from_mapping(config_lib.load_yaml(preset)).validate()
  two_stages = cfg.pipeline == "joint_optimization"
  assert {k: getattr(cfg, k) for k in PAPER_VALUES} == {**PAPER_VALUES, "epochs": 400 if two_stages else 200}
  defaults = config_lib.TrainConfig()
  for field in registry.owned_fields("pipelines"):
    expected = 200 if field == "jo_stage1_epochs" and two_stages else getattr(defaults, field)
    assert getattr(cfg, field) == expected, field
  header = config_lib.resolve_preset(preset).read_text()
  assert f"--config {preset}" in header and "arXiv 2411.17132" in header and "Hardware:" in header


@pytest.mark.parametrize("preset", PIPELINE_PRESETS)
def test_pipeline_preset_sets_its_pipeline_setting_and_out_dir(preset):
  pipeline, setting = next(
    (p, preset[len(f"pipelines/{p}_") : -len("_resnet18")]) for p in PIPELINE_NAMES if f"/{p}_" in preset
  )
  cfg = config_lib.from_mapping(config_lib.load_yaml(preset))
  expected = {**SETTING_VALUES[setting], "pipeline": pipeline, "model": "resnet18", "out_dir": f"runs/{preset}"}
  assert {k: getattr(cfg, k) for k in expected} == expected


@pytest.mark.parametrize("pipeline", PIPELINE_NAMES)
def test_fashion_mnist_pipeline_preset_is_the_quick_preset_in_its_pipeline(pipeline):
  values = config_lib.load_yaml(f"pipelines/fashion_mnist_{pipeline}")
  config_lib.from_mapping(values).validate()
  quick = config_lib.load_yaml("fashion_mnist_quick")
  assert values["pipeline"] == pipeline
  assert {k: v for k, v in values.items() if k in quick} == quick
  assert set(values) - set(quick) - {"pipeline", "out_dir"} <= set(registry.owned_fields("pipelines"))


def _over_paper_preset(preset: str) -> tuple[str, dict]:
  """A pipeline preset's pipeline, and what it sets over its setting's paper ResNet-18 preset (out_dir aside)."""
  pipeline, setting = next(
    (p, preset[len(f"pipelines/{p}_") : -len("_resnet18")]) for p in PIPELINE_NAMES if f"/{p}_" in preset
  )
  values, paper = config_lib.load_yaml(preset), config_lib.load_yaml(f"paper/{setting}_resnet18")
  assert set(paper) <= set(values)
  missing = object()
  return pipeline, {k: v for k, v in values.items() if k != "out_dir" and paper.get(k, missing) != v}


def test_a_pipelines_presets_set_the_same_values_over_their_settings_paper_preset():
  over = {}
  for preset in PIPELINE_PRESETS:
    pipeline, values = _over_paper_preset(preset)
    over.setdefault(pipeline, []).append(values)
  for pipeline, sets in over.items():
    assert len(sets) == 4 and all(v == sets[0] for v in sets), pipeline
    assert sets[0]["pipeline"] == pipeline


# One preset per pipeline trains, the settings spread over them: the others
# are the same values over another setting's paper preset (the test above),
# and every setting trains in the paper presets' runs.
PIPELINES_TRAINED = [
  "pipelines/bootstrap_cifar100_sym50_resnet18",
  "pipelines/co_teaching_cifar10_sym25_resnet18",
  "pipelines/dividemix_cifar100_sym25_resnet18",
  "pipelines/plc_cifar10_sym50_resnet18",
  "pipelines/joint_optimization_cifar10_sym25_resnet18",
]


@pytest.mark.parametrize("preset", PIPELINES_TRAINED)
def test_pipeline_preset_trains_on_mock_data(preset, tmp_path, mock_tfds):
  values = config_lib.load_yaml(preset)
  ci = PIPELINE_CI.get(values["pipeline"], {})
  cfg = config_lib.from_mapping(
    {**values, **CI_SIZES, **CI_OUTPUT, **PIPELINE_CI_MODEL, **ci, "out_dir": str(tmp_path / "run")}
  )
  with mock_tfds(num_examples=CI_SIZES["train_examples"]):
    summary = loop.train(cfg)
  final = summary["final"]
  assert np.isfinite(final["train_loss"]) and final["group_B"] is not None
  expected = {
    # Forget rate 0.02 in epoch 1: int(0.98 x 4) = 3 of the 4 samples kept.
    "co_teaching": ("clean_fraction", 0.75),
    "plc": ("tau", 0.9),
    "joint_optimization": ("stage", 2),
  }
  if values["pipeline"] in expected:
    key, value = expected[values["pipeline"]]
    assert final[key] == value
  if values["pipeline"] == "dividemix":
    assert final["clean_fraction"] is not None  # the mixture split ran
