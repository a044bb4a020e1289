"""The toolkit's extension points: a perturbation, a pipeline, a noise mode, a model and a dataset added through their registries alone.

Each toy is checked against the built-in it reduces to, so the test pins
that the registry entry, not a hard-wired list, drives the config, the
optimizer, the trainer and the reports.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SMOKE_MODEL

from saner_jax.train import cli, data, loop, models, noise, registry, reporting
from saner_jax.train import config as config_lib
from saner_jax.train.config import ConfigError, TrainConfig, fail
from saner_jax.train.engine import supervised

ONE_EPOCH = dict(
  model=SMOKE_MODEL,
  epochs=1,
  batch_size=32,
  train_examples=96,
  test_examples=64,
  eval_batch_size=32,
  alpha_warmup_epochs=1,
  progress="none",
  checkpoint=False,
)
COMPARED = ("train_loss", "train_acc", "test_acc", "clean_acc", "noisy_memorised")


def _zero_ascent(config: TrainConfig) -> optax.GradientTransformation:
  """A perturbation of zero: the second gradient is the clean one, so the step is SGD's."""
  return optax.stateless(lambda updates, params: jax.tree.map(jnp.zeros_like, updates))


def _check_rho(config: TrainConfig) -> None:
  if config.rho > 1.0:
    fail("rho", f"zero_ascent takes rho <= 1, got {config.rho}")


@pytest.fixture
def toy_perturbation():
  entry = registry.register_perturbation(registry.Perturbation("zero_ascent", build=_zero_ascent, check=_check_rho))
  yield entry
  registry.unregister("perturbation", entry.name)


def _toy_recipe(run):
  """The supervised recipe, with a metric of its own in every epoch's record."""
  plain = supervised(run)

  def epoch(state, number):
    state, fields = plain.epoch(state, number)
    return state, {**fields, "toy_share": 0.25}

  return plain._replace(epoch=epoch)


@pytest.fixture
def toy_pipeline():
  entry = registry.register_pipeline(
    registry.Pipeline(
      "toy",
      _toy_recipe,
      panels=(("toy_share", "toy: share"),),
      columns=(("toy_share", "toy share % (final)"),),
    )
  )
  yield entry
  registry.unregister("pipeline", entry.name)


def _metrics(run_dir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_toy_perturbation_trains_through_its_entry_alone(toy_perturbation, idx_dir, tmp_path):
  assert "zero_ascent" in config_lib.choices("optimizer")
  with pytest.raises(ConfigError, match=r"^--rho: zero_ascent takes rho <= 1, got 2.0$"):
    TrainConfig(optimizer="zero_ascent", rho=2.0, data_dir=str(idx_dir), **ONE_EPOCH).validate()
  runs = {}
  for optimizer in ("zero_ascent", "sgd"):
    cfg = TrainConfig(optimizer=optimizer, data_dir=str(idx_dir), out_dir=str(tmp_path / optimizer), **ONE_EPOCH)
    loop.train(cfg.validate())
    runs[optimizer] = _metrics(tmp_path / optimizer)[-1]
  # Two passes ran (SGD logs no group shares), and they took SGD's step.
  assert runs["zero_ascent"]["group_B"] == 0.0 and runs["sgd"]["group_B"] is None
  for key in COMPARED:
    assert runs["zero_ascent"][key] == pytest.approx(runs["sgd"][key], rel=1e-4, abs=1.5 / 64), key


def test_a_toy_pipeline_trains_and_reports_through_its_entry_alone(toy_pipeline, idx_dir, tmp_path, capsys):
  assert "toy" in config_lib.choices("pipeline")
  flags = [f"--{k}={v}" for k, v in {**ONE_EPOCH, "data_dir": idx_dir, "optimizer": "sgd"}.items()]
  out = tmp_path / "cmp"
  # compare runs the toy beside plain training: the toy's column joins the table, its panel the figure.
  assert cli.main(["compare", "--runs", "sgd", "--set", "pipeline=toy", "--out_dir", str(out), *flags]) == 0
  toy = _metrics(out / "sgd_seed0")[-1]
  assert toy["toy_share"] == 0.25
  assert "toy share % (final)" in (out / "compare.md").read_text()
  assert ("toy_share", "toy: share") in registry.report("panels")
  plain_dir = tmp_path / "plain"
  plain_cfg = TrainConfig(optimizer="sgd", data_dir=str(idx_dir), out_dir=str(plain_dir), **ONE_EPOCH)
  loop.train(plain_cfg.validate())
  plain = _metrics(plain_dir)[-1]
  for key in COMPARED:
    assert toy[key] == plain[key], key
  assert "toy share" not in reporting.markdown_table({"plain": [json.loads((plain_dir / "summary.json").read_text())]})


def _next_class(request: noise.NoiseRequest) -> np.ndarray:
  """Each chosen label moves to the next class: pair_flip, written as a user would, from the request alone."""
  labels = request.true.copy()
  for c in range(request.num_classes):
    members = np.flatnonzero(request.true == c)
    order = request.rng.permutation(members.size)
    labels[members[order[: round(request.rate * members.size)]]] = (c + 1) % request.num_classes
  return labels


def _ten_classes_only(config: TrainConfig, spec) -> None:
  if spec.num_classes != 10:
    fail("noise_mode", f"next_class is written for 10 classes, {config.dataset} has {spec.num_classes}")


@pytest.fixture
def toy_noise_mode():
  entry = registry.register_noise_mode(
    registry.NoiseMode("next_class", _next_class, max_rate=lambda num_classes: 0.3, check=_ten_classes_only)
  )
  yield entry
  registry.unregister("noise_mode", entry.name)


def test_a_toy_noise_mode_trains_through_its_entry_alone(toy_noise_mode, idx_dir, tmp_path):
  assert "next_class" in config_lib.choices("noise_mode") and "next_class" in noise.modes()
  # Its own bound, not pair_flip's 0.5, and its own check.
  with pytest.raises(
    ConfigError, match=r"^--noise_rate: next_class noise on 10 classes is defined up to 0.3, got 0.4$"
  ):
    TrainConfig(noise_mode="next_class", noise_rate=0.4, data_dir=str(idx_dir), **ONE_EPOCH).validate()
  with pytest.raises(ValueError, match="rate 0.4 is too high for mode 'next_class'"):
    noise.inject_noise(np.arange(20) % 10, num_classes=10, mode="next_class", rate=0.4)
  broken = registry.register_noise_mode(registry.NoiseMode("off_by_ten", lambda request: request.true + 10))
  try:
    with pytest.raises(ValueError, match=r"the labels mode 'off_by_ten' drew must lie in \[0, 10\)"):
      noise.inject_noise(np.arange(20) % 10, num_classes=10, mode="off_by_ten", rate=0.1)
  finally:
    registry.unregister("noise_mode", broken.name)
  with pytest.raises(ConfigError, match=r"^--noise_mode: next_class is written for 10 classes, cifar100 has 100$"):
    TrainConfig(dataset="cifar100", noise_mode="next_class", noise_rate=0.2, **ONE_EPOCH).validate()
  runs = {}
  for mode in ("next_class", "pair_flip"):
    cfg = TrainConfig(noise_mode=mode, noise_rate=0.3, data_dir=str(idx_dir), out_dir=str(tmp_path / mode), **ONE_EPOCH)
    loop.train(cfg.validate())
    runs[mode] = _metrics(tmp_path / mode)[-1]
  # The same draws from the same generator: the same labels, so the same run.
  for key in COMPARED:
    assert runs["next_class"][key] == runs["pair_flip"][key], key
  assert runs["next_class"]["noisy_memorised"] is not None


def _tiny_mlp(num_classes, dtype=jnp.float32, conv_general_dilated=None):
  """A one-hidden-layer network with BatchNorm: the smallest model the trainer takes."""
  from flax import linen as nn

  class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.Dense(8, dtype=dtype)(x.reshape(x.shape[0], -1))
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
      return nn.Dense(num_classes, dtype=dtype)(x).astype(jnp.float32)

  return TinyMLP()


@pytest.fixture
def toy_model():
  entry = registry.register_model(registry.Model("tiny_mlp", build=_tiny_mlp))
  yield entry
  registry.unregister("model", entry.name)


def test_a_toy_model_trains_through_its_entry_alone(toy_model, idx_dir, tmp_path):
  assert "tiny_mlp" in config_lib.choices("model") and "tiny_mlp" in models.MODELS
  cfg = TrainConfig(data_dir=str(idx_dir), out_dir=str(tmp_path), **{**ONE_EPOCH, "model": "tiny_mlp"})
  loop.train(cfg.validate())
  (last,) = _metrics(tmp_path)
  assert last["epoch"] == 1 and 0.0 <= last["test_acc"] <= 1.0
  # Its parameters, not a built-in's: 784 * 8 + 8 Dense, 2 * 8 BatchNorm, 8 * 10 + 10 Dense.
  params, stats = models.init_model(models.create_model("tiny_mlp", 10), jax.random.key(0), (28, 28, 1))
  assert sum(x.size for x in jax.tree.leaves(params)) == 784 * 8 + 8 + 16 + 90
  assert sum(x.size for x in jax.tree.leaves(stats)) == 16
  with pytest.raises(ConfigError, match=r"^--model_width: "):
    TrainConfig(model_width=2.0, data_dir=str(idx_dir), **{**ONE_EPOCH, "model": "tiny_mlp"}).validate()


@pytest.fixture
def toy_dataset():
  spec = registry.register_dataset(dataclasses.replace(data.DATASETS["fashion_mnist"], name="my_fashion"))
  yield spec
  registry.unregister("dataset", spec.name)


def test_a_toy_dataset_trains_through_its_entry_alone(toy_dataset, idx_dir, tmp_path):
  assert "my_fashion" in config_lib.choices("dataset") and data.DATASETS["my_fashion"] is toy_dataset
  runs = {}
  for name in ("my_fashion", "fashion_mnist"):
    cfg = TrainConfig(dataset=name, noise_rate=0.4, data_dir=str(idx_dir), out_dir=str(tmp_path / name), **ONE_EPOCH)
    loop.train(cfg.validate())
    runs[name] = _metrics(tmp_path / name)[-1]
  # The same spec under another name reads the same files, draws the same noise and trains the same run.
  for key in COMPARED:
    assert runs["my_fashion"][key] == runs["fashion_mnist"][key], key


def test_a_name_is_registered_once():
  with pytest.raises(ValueError, match="perturbation 'sam' is already registered"):
    registry.register_perturbation(registry.Perturbation("sam", build=_zero_ascent))
  with pytest.raises(ValueError, match="pipeline 'none' is already registered"):
    registry.register_pipeline(registry.Pipeline("none", _toy_recipe))
  with pytest.raises(ValueError, match="must be an identifier"):
    registry.register_pipeline(registry.Pipeline("my pipeline", _toy_recipe))
  for name in ("symmetric", "real", "none"):
    with pytest.raises(ValueError, match=f"noise mode '{name}' is already registered"):
      registry.register_noise_mode(registry.NoiseMode(name, _next_class))
  with pytest.raises(ValueError, match="model 'resnet8' is already registered"):
    registry.register_model(registry.Model("resnet8", build=_tiny_mlp))
  with pytest.raises(ValueError, match="dataset 'mnist' is already registered"):
    registry.register_dataset(data.DATASETS["mnist"])


def test_an_entrys_fields_may_be_set_only_with_it():
  assert registry.owned_fields("perturbations")["fsam_sigma"] == ("friendly_sam",)
  with pytest.raises(ConfigError, match=r"^--fsam_sigma: applies to --optimizer friendly_sam only, not 'sam'"):
    TrainConfig(optimizer="sam", fsam_sigma=0.5, **ONE_EPOCH).validate()
  with pytest.raises(ConfigError, match=r"^--tau_end: applies to --pipeline plc only, not 'dividemix'"):
    TrainConfig(pipeline="dividemix", tau_end=0.1, **ONE_EPOCH).validate()


def test_the_docs_example_registers_a_working_perturbation():
  """docs/training.md's example, up to its training line: sign_sam's ascent has length rho."""
  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
  section = text.split("## Adding a perturbation, a pipeline, a noise mode, a model or a dataset")[1]
  code = section.split("```python\n")[1].split("```")[0]
  assert 'train(TrainConfig(optimizer="sign_sam"' in code
  exec(code.split("\ntrain(")[0], {})  # the docs' own example
  try:
    entry = registry.perturbations()["sign_sam"]
    config = TrainConfig(optimizer="sign_sam", saner=True, rho=0.5, **ONE_EPOCH)
    grads = {"w": jnp.array([3.0, -4.0]), "b": jnp.array([0.0, 1.0])}
    tx = entry.build(config)
    eps, _ = tx.update(grads, tx.init(grads), grads)
    assert float(optax.tree.norm(eps)) == pytest.approx(0.5 * (3 / 4) ** 0.5)  # one coordinate of 4 is 0
    assert eps["w"].tolist() == pytest.approx([0.25, -0.25])
  finally:
    registry.unregister("perturbation", "sign_sam")
