"""The training toolkit end to end: configs, flags, runs, resume, compare.

Runs use the smoke-test ResNet-4 on a few hundred images so that each compiles and trains
in seconds; the kill-and-resume test runs the real CLI in subprocesses on
IDX files written here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import SMOKE_MODEL, kill_after_first_epoch
from conftest import read_metrics as _metrics

from saner_jax.train import cli, loop, reporting
from saner_jax.train import config as config_lib
from saner_jax.train import step as step_lib
from saner_jax.train.config import ConfigError, TrainConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
TIME_KEYS = ("epoch_time_s", "wall_time_s")
TINY = dict(
  model=SMOKE_MODEL,
  epochs=2,
  batch_size=32,
  train_examples=96,
  test_examples=64,
  eval_batch_size=32,
  alpha_warmup_epochs=2,
  progress="none",
)


def _without_times(records):
  return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]


# ---------------------------------------------------------------------------
# Configs and flags


@pytest.mark.parametrize(
  "flags, names",
  [
    (["--optimizer", "adamw"], "--optimizer"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--noise_rate", "1.5"], "--noise_rate"),
    (["--noise_rate", "-0.1"], "--noise_rate"),
    (["--noise_mode", "sideways"], "--noise_mode"),
    (["--model", "resnet1000"], "--model"),
    (["--alpha", "1.5"], "--alpha"),
    (["--rho", "-0.1"], "--rho"),
    (["--epochs", "ten"], "--epochs"),
    (["--optimizer", "sgd", "--saner", "true"], "--saner"),
    (["--m_sharpness", "3"], "--m_sharpness"),
    (["--config", "no_such_preset"], "--config"),
    (["--dataset", "svhn_cropped", "--noise_mode", "asymmetric"], "--noise_mode"),
    (["--noise_mode", "real"], "--noise_mode"),
    (["--dataset", "cifar10_n", "--noise_mode", "real", "--noise_label_key", "best_label"], "--noise_label_key"),
    (["--data_source", "ftp"], "--data_source"),
    (["--cpu_conv", "maybe"], "--cpu_conv"),
    (["--bn_stats", "noisy"], "--bn_stats"),
    (["--model", "wrn40_2", "--model_width", "2"], "--model_width: model 'wrn40_2' has no width factor"),
    (["--model", "resnet20", "--model_width", "0.01"], "--model_width: width 0.01 leaves"),
    (["--model", "inception_resnet_v2"], "--model: model 'inception_resnet_v2' needs images of at least 75x75"),
    (["--tensorboard", "maybe"], "--tensorboard"),
  ],
)
def test_bad_flags_name_the_flag(flags, names, capsys, tmp_path):
  assert cli.main(flags + ["--out_dir", str(tmp_path / "never")]) == 2
  err = capsys.readouterr().err
  assert names in err, err


def _help(argv, capsys, monkeypatch) -> str:
  monkeypatch.setenv("COLUMNS", "1000")  # one line per flag
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 0
  return capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["compare", "--help"]])
def test_help_lists_each_flag_under_its_section_with_default_and_choices(argv, capsys, monkeypatch):
  out = _help(argv, capsys, monkeypatch)
  sections = list(config_lib.SECTIONS)
  starts = [out.index(f"\n{config_lib.SECTIONS[section]}:\n") for section in sections]
  assert starts == sorted(starts)
  ends = starts[1:] + [len(out)]
  for field in dataclasses.fields(TrainConfig):
    section = sections.index(field.metadata["section"])
    assert starts[section] < out.index(f"  --{field.name} ") < ends[section], field.name
  flat = " ".join(out.split())  # a long flag's help starts on the next line
  for line in (
    "--lr_schedule NAME the learning-rate schedule (one of: multistep, cosine, constant; default: multistep)",
    "--rho FLOAT the SAM-family perturbation radius (default: 0.1)",
    "--lr_milestones FLOAT,... multistep: the fractions of training at which the lr decays, comma-separated "
    "(default: 0.5,0.75)",
    "--train_examples INT|none train on a seeded subset of this many examples; none: all (default: none)",
    "--augment BOOL random crops and flips of the training images (default: true)",
  ):
    assert line in flat, line
  assert (
    "--noise_mode NAME how the training labels are corrupted (one of: none, symmetric, uniform, asymmetric, " in flat
  )
  assert "--config FILE|PRESET" in out and "--debug" in out


def test_compare_help_explains_its_own_flags(capsys, monkeypatch):
  out = _help(["compare", "--help"], capsys, monkeypatch)
  comparison = out[out.index("\ncomparison:\n") : out.index(f"\n{config_lib.SECTIONS['data']}:\n")]
  assert "(default: sgd sam saner)" in comparison and "OPT+grX" in comparison
  assert "--seeds SEED [SEED ...] one run of each per seed (default: 0)" in " ".join(comparison.split())
  assert "  --resume " not in out


# One case per check, with its whole message: validate's checks are split by
# topic, and a user reads these lines, so their wording is pinned.
@pytest.mark.parametrize(
  "values, message",
  [
    (
      dict(dataset="cifar11"),
      "--dataset: unknown value 'cifar11'; choose one of ['animal10n', 'cifar10', 'cifar100', 'cifar100_n', "
      "'cifar10_n', 'clothing1m', 'fashion_mnist', 'image_folder', 'mini_webvision', 'mnist', 'svhn_cropped', "
      "'tiny_imagenet']",
    ),
    (dict(lr=float("nan")), "--lr: must be a finite number, got nan"),
    (dict(seed=-1), "--seed: must be in [0, 2**32), got -1"),
    (dict(noise_rate=1.5), "--noise_rate: must be in [0, 1], got 1.5"),
    (dict(noise_rate=0.95), "--noise_rate: symmetric noise on 10 classes is defined up to 0.9, got 0.95"),
    (
      dict(noise_mode="asymmetric", dataset="svhn_cropped"),
      "--noise_mode: no asymmetric noise map for dataset 'svhn_cropped'; maps exist for ['cifar10', 'cifar100', 'cifar100_n', 'cifar10_n', 'fashion_mnist', 'mnist']. Use mode='pair_flip' or 'symmetric', or pass dataset= with one of those.",
    ),
    (
      dict(noise_mode="real"),
      "--noise_mode: 'real' needs human labels; fashion_mnist has none (use cifar10_n or cifar100_n)",
    ),
    (
      dict(dataset="cifar10_n", noise_mode="real", noise_label_key="x"),
      "--noise_label_key: cifar10_n has ['worse_label', 'aggre_label', 'random_label1', 'random_label2', 'random_label3'], got 'x'",
    ),
    (dict(alpha=1.5), "--alpha: must be in [0, 1] for group B, got 1.5"),
    (dict(alpha=-1.0, saner_group="A"), "--alpha: must be >= 0, got -1.0"),
    (
      dict(optimizer="sgd", saner=True),
      "--saner: SANER reweights SAM's second gradient; it needs a SAM-family optimizer, not sgd",
    ),
    (
      dict(optimizer="sam", saner_params="head"),
      "--saner_params: 'head' chooses where SANER acts; turn SANER on (--optimizer saner or --saner)",
    ),
    (dict(rho=-0.1), "--rho: must be >= 0, got -0.1"),
    (dict(lr=-1.0), "--lr: must be >= 0, got -1.0"),
    (dict(momentum=1.5), "--momentum: must be in [0, 1], got 1.5"),
    (dict(optimizer="vasso", vasso_theta=-0.1), "--vasso_theta: must be in [0, 1], got -0.1"),
    (dict(vasso_theta=0.5), "--vasso_theta: applies to --optimizer vasso only, not 'sam'; drop it or set --optimizer"),
    (dict(substitute_outside=True), "--substitute_outside: needs --substitute_groups, e.g. B"),
    (
      dict(optimizer="sam", substitute_groups=""),
      "--substitute_groups: is empty, which substitutes nothing; give letters from ABC or leave it out",
    ),
    (
      dict(substitute_groups="B"),
      "--substitute_groups: replaces SANER's reweighting; use --optimizer sam (or another SAM variant) without SANER",
    ),
    (
      dict(optimizer="sgd", substitute_groups="B"),
      "--substitute_groups: substitutes SAM's second gradient; it needs a SAM-family optimizer, not sgd",
    ),
    (dict(batch_size=0), "--batch_size: must be >= 1, got 0"),
    (dict(epochs=0), "--epochs: must be >= 1, got 0"),
    (dict(alpha_warmup_epochs=-1), "--alpha_warmup_epochs: must be >= 0, got -1"),
    (dict(lr_decay=-0.1), "--lr_decay: must be >= 0, got -0.1"),
    (dict(m_sharpness=3), "--m_sharpness: must divide batch_size 128, got 3"),
    (dict(grad_accum_steps=3), "--grad_accum_steps: m_sharpness x grad_accum_steps = 1 x 3 must divide batch_size 128"),
    (dict(lr_milestones=(0.5, 1.0)), "--lr_milestones: must be fractions of training in (0, 1), got (0.5, 1.0)"),
    (dict(train_examples=0), "--train_examples: must be in [1, 60000], the size of fashion_mnist's train split; got 0"),
    (
      dict(test_examples=10**6),
      "--test_examples: must be in [1, 10000], the size of fashion_mnist's test split; got 1000000",
    ),
    (dict(train_examples=100, batch_size=128), "--batch_size: 128 exceeds the 100 training examples"),
    (dict(sharpness_every=-1), "--sharpness_every: must be >= 0 (0: never), got -1"),
    (dict(probe_examples=0), "--probe_examples: must be >= 1, got 0"),
    (
      dict(forget_rate=0.5),
      "--forget_rate: applies to --pipeline co_teaching only, not 'none'; drop it or set --pipeline",
    ),
    (dict(pipeline="co_teaching", forget_rate=1.0), "--forget_rate: must be in [0, 1), got 1.0"),
    (dict(pipeline="bootstrap", bootstrap_beta=2.0), "--bootstrap_beta: must be in [0, 1], got 2.0"),
    (dict(pipeline="co_teaching", num_gradual=-1), "--num_gradual: must be >= 0, got -1"),
    (dict(pipeline="dividemix", mixup_alpha=0.0), "--mixup_alpha: must be > 0, got 0.0"),
    (dict(pipeline="plc", tau_end=0.95), "--tau_end: must be <= tau_start 0.9, got 0.95"),
    (dict(pipeline="joint_optimization", jo_window=0), "--jo_window: must be >= 1, got 0"),
    (
      dict(pipeline="joint_optimization", jo_stage1_epochs=200),
      "--jo_stage1_epochs: must leave both stages an epoch: in [1, 199], got 200",
    ),
    (dict(pipeline="dividemix", lambda_u=-1.0), "--lambda_u: must be >= 0, got -1.0"),
    (
      dict(pipeline="nope"),
      "--pipeline: unknown value 'nope'; choose one of ['bootstrap', 'co_teaching', 'dividemix', 'joint_optimization', 'none', 'plc']",
    ),
    (dict(saner_params="last"), "--saner_params: unknown value 'last'; choose one of ['all', 'head']"),
  ],
)
def test_validate_names_the_flag_and_the_fix(values, message):
  with pytest.raises(ConfigError) as error:
    config_lib.from_mapping(values).validate()
  assert str(error.value) == message


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--learning_rate", "0.1"], "unrecognized arguments: --learning_rate 0.1; see python -m saner_jax.train --help"),
    (["--saner"], "argument --saner: expected one argument; see python -m saner_jax.train --help"),
    (
      ["compare", "--seeds", "x"],
      "argument --seeds: invalid int value: 'x'; see python -m saner_jax.train compare --help",
    ),
  ],
)
def test_a_bad_flag_is_one_error_line_pointing_to_help(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == f"error: {message}\n"


def test_unknown_config_key_is_named(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("lr: 0.1\nmomentun: 0.9\n")
  with pytest.raises(ConfigError, match="momentun"):
    config_lib.from_mapping(config_lib.load_yaml(str(path)))


def test_base_is_read_first_and_the_file_overrides_it(tmp_path, monkeypatch):
  monkeypatch.setattr(config_lib, "PRESET_DIR", tmp_path)
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "_root.yaml").write_text("lr: 0.3\nepochs: 5\nseed: 1\n")
  (tmp_path / "sub" / "_mid.yaml").write_text("base: sub/_root\nepochs: 6\nrho: 0.2\n")
  (tmp_path / "run.yaml").write_text("base: sub/_mid.yaml\nseed: 2\n")
  assert config_lib.load_yaml("run") == {"lr": 0.3, "epochs": 6, "rho": 0.2, "seed": 2}
  assert config_lib.preset_names() == ["run"]  # the bases are not presets
  with pytest.raises(ConfigError, match="'sub/_mid' is the shared base of other presets, not a preset; run one of"):
    config_lib.load_yaml("sub/_mid")


def test_a_users_config_builds_on_a_file_beside_it_or_on_a_preset(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the base is found next to the file, not in the working directory
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "common.yaml").write_text("base: paper/_base\nepochs: 7\nlr: 0.05\n")
  (tmp_path / "mine" / "run.yaml").write_text("base: common\nseed: 3\nlr: 0.02\n")
  paper_base = yaml.safe_load((config_lib.PRESET_DIR / "paper" / "_base.yaml").read_text())
  expected = {**paper_base, "epochs": 7, "lr": 0.02, "seed": 3}
  assert config_lib.load_yaml(str(tmp_path / "mine" / "run.yaml")) == expected
  (tmp_path / "mine" / "paper").mkdir()  # a file beside it comes before the preset of the same name
  (tmp_path / "mine" / "paper" / "_base.yaml").write_text("momentum: 0.5\n")
  assert config_lib.load_yaml(str(tmp_path / "mine" / "run.yaml")) == {
    "momentum": 0.5,
    "epochs": 7,
    "lr": 0.02,
    "seed": 3,
  }


@pytest.mark.parametrize(
  "files, message",
  [
    (
      {"run.yaml": "base: nowhere\n"},
      r"run.yaml has base 'nowhere', which is neither a YAML file beside it nor a preset; give a path relative to .*",
    ),
    ({"run.yaml": "base: [a]\n"}, r"run.yaml has base \['a'\], which is neither a YAML file beside it nor a preset"),
    ({"run.yaml": "base:\n"}, r"run.yaml has base None, which is neither"),
    ({"run.yaml": "base: _a\n", "_a.yaml": "base: _b\n", "_b.yaml": "base: _a\n"}, r"form a cycle \(.*run.yaml -> "),
    ({"run.yaml": "base: run\n"}, r"run.yaml -> .*run.yaml\); remove the base: key that closes it"),
    ({"run.yaml": "base: _a\n", "_a.yaml": "- lr\n"}, r"_a.yaml \(the base of .*run.yaml\) must hold a mapping"),
    # PyYAML's own message spans four lines (an excerpt and a caret); the error keeps its first and where.
    (
      {"run.yaml": "lr: : 0.1\n"},
      r"run.yaml is not valid YAML: mapping values are not allowed here at line 1, column 5$",
    ),
    (
      {"run.yaml": "base: _a\n", "_a.yaml": "lr: [0.1\n"},
      r"_a.yaml \(the base of .*run.yaml\) is not valid YAML: .* line 2",
    ),
    (
      {"run.yaml": b"lr: 0.1\n\xff\xfe"},
      r"run.yaml is not UTF-8 text \(invalid start byte at byte 8\); give a YAML file$",
    ),
  ],
)
def test_a_bad_base_is_one_line_naming_the_file(files, message, tmp_path, monkeypatch):
  monkeypatch.setattr(config_lib, "PRESET_DIR", tmp_path)
  for name, text in files.items():
    (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
  with pytest.raises(ConfigError, match=message) as error:
    config_lib.load_yaml("run")
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("preset", config_lib.preset_names())
def test_every_shipped_preset_resolves(preset):
  values = config_lib.load_yaml(preset)
  assert "base" not in values
  config_lib.from_mapping(values)  # every key, its own or its bases', is a config field


def test_flags_override_the_config_file(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("lr: 0.2\nepochs: 7\n")
  parser = cli._train_parser()
  cfg = config_lib.from_args(parser.parse_args(["--config", str(path), "--lr", "0.3"]))
  assert (cfg.lr, cfg.epochs) == (0.3, 7)


def test_cpu_conv_takes_yaml_and_api_booleans(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("cpu_conv: true\n")
  assert config_lib.from_mapping(config_lib.load_yaml(str(path))).validate().cpu_conv == "true"
  assert TrainConfig(cpu_conv=False).cpu_conv == "false"
  assert TrainConfig().cpu_conv == "auto"


@pytest.mark.parametrize("preset", sorted(p.stem for p in config_lib.PRESET_DIR.glob("*.yaml")))
def test_every_preset_is_valid(preset):
  config_lib.from_mapping(config_lib.load_yaml(preset)).validate()  # raises ConfigError if not


def test_multistep_schedule_decays_at_whole_epochs():
  cfg = TrainConfig(epochs=10, lr=0.1)
  schedule = step_lib.lr_schedule(cfg, steps_per_epoch=3)
  # torch's MultiStepLR(milestones=[5, 7]) on epochs; 3 steps an epoch.
  expected = [0.1] * 15 + [0.01] * 6 + [0.001] * 9
  np.testing.assert_allclose([float(schedule(s)) for s in range(30)], expected, rtol=1e-6)


def test_multistep_milestones_at_epoch_zero_never_decay():
  """Like torch's MultiStepLR: a one-epoch run keeps its learning rate."""
  schedule = step_lib.lr_schedule(TrainConfig(epochs=1, lr=0.1), steps_per_epoch=4)
  assert [float(schedule(s)) for s in range(4)] == pytest.approx([0.1] * 4)


def test_optimizer_chain_matches_the_authors_order():
  """saner -> L2 -> heavy-ball SGD: one update by hand."""
  import jax.numpy as jnp

  cfg = TrainConfig(optimizer="saner", alpha=0.5, alpha_warmup_epochs=0, lr=0.1, weight_decay=0.01)
  opt = step_lib.build_optimizer(cfg, steps_per_epoch=1)
  params = {"w": jnp.array([1.0, 1.0, 1.0])}
  clean = {"w": jnp.array([2.0, 2.0, -1.0])}
  perturbed = {"w": jnp.array([1.0, 3.0, 1.0])}  # B, A, C
  updates, _ = opt.tx.update(perturbed, opt.tx.init(params), params, clean_grads=clean)
  expected = -0.1 * (np.array([0.5, 3.0, 1.0]) + 0.01 * 1.0)
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# Runs on TFDS mock data


@pytest.mark.parametrize("optimizer", ["sgd", "saner"])
def test_run_on_mock_cifar10_reports_every_metric(optimizer, tmp_path, mock_tfds):
  cfg = TrainConfig(dataset="cifar10", optimizer=optimizer, out_dir=str(tmp_path / "run"), **TINY)
  with mock_tfds(num_examples=128):
    summary = loop.train(cfg)
  records = _metrics(tmp_path / "run")
  assert [r["epoch"] for r in records] == [1, 2]
  for r in records:
    for key in ("train_loss", "train_acc", "clean_acc", "noisy_memorised", "noisy_true", "test_acc"):
      assert 0.0 <= r[key] <= (np.inf if key == "train_loss" else 1.0), (key, r[key])
    if optimizer == "saner":
      assert 0.0 < r["group_B"] < 1.0
    else:
      assert r["group_B"] is None and r["alpha"] is None
  if optimizer == "saner":  # the authors' get_alpha(epoch, k=2) for epochs 1 and 2
    assert [r["alpha"] for r in records] == [0.75, 0.5]
  assert abs(summary["realised_noise_rate"] - 0.4) < 0.02
  assert (tmp_path / "run" / "curves.png").stat().st_size > 0
  assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") == 3
  assert config_lib.from_mapping(config_lib.load_yaml(str(tmp_path / "run" / "config.yaml"))) == cfg


def test_existing_run_is_not_overwritten(tmp_path):
  (tmp_path / "config.yaml").write_text("lr: 0.1\n")
  (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')  # logged epochs make it a run
  with pytest.raises(ConfigError, match="--resume"):
    loop.train(TrainConfig(out_dir=str(tmp_path), **TINY))


def test_nonfinite_loss_stops_with_a_clear_error(tmp_path, idx_dir):
  cfg = TrainConfig(optimizer="sam", lr=1e30, out_dir=str(tmp_path), data_dir=str(idx_dir), **{**TINY, "epochs": 1})
  with pytest.raises(loop.RunStopped, match="epoch 1: non-finite .*; no checkpoint was written"):
    loop.train(cfg)
  assert not (tmp_path / "checkpoints" / "1").exists()


def test_cpu_conv_trains_like_xla_convolutions(tmp_path, idx_dir, onednn, capsys):
  """oneDNN's convolutions by default, XLA's with cpu_conv false: float32 rounding apart, the same run.

  SGD, whose update is continuous in the gradients; SANER's group mask is
  not, and a last-bit difference may flip a coordinate. Each run says which
  convolutions it uses, in one line.
  """
  finals, lines = {}, {}
  for mode in ("false", "auto"):
    cfg = TrainConfig(
      optimizer="sgd", cpu_conv=mode, out_dir=str(tmp_path / mode), data_dir=str(idx_dir), **{**TINY, "epochs": 2}
    )
    summary = loop.train(cfg)
    finals[mode] = summary["final"]
    lines[mode] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("convolutions:")]
    assert summary["convolutions"] == ("xla" if mode == "false" else "onednn")
    assert summary["cpu"] == reporting.cpu_model() and summary["cpu"] not in ("", "unknown")
    assert summary["cpu_isa"] == reporting.cpu_isa()
  assert lines == {
    "false": ["convolutions: XLA's (oneDNN's switched off)"],
    "auto": ["convolutions: oneDNN's (saner_jax.cpu_conv)"],
  }
  np.testing.assert_allclose(finals["auto"]["train_loss"], finals["false"]["train_loss"], rtol=1e-4)
  for key in ("train_acc", "test_acc", "noisy_memorised"):
    assert abs(finals["auto"][key] - finals["false"][key]) <= 0.05, key  # a prediction or two may flip


def test_evaluation_is_one_call_over_the_whole_test_set():
  """The lax.map over batches counts what the model predicts right, padding excluded."""
  import jax
  import jax.numpy as jnp

  from saner_jax.train import data, models

  cfg = TrainConfig(model="resnet8", eval_batch_size=4)
  model = models.create_model("resnet8", 10)
  params, batch_stats = models.init_model(model, jax.random.key(0), (28, 28, 1))
  images = jax.random.randint(jax.random.key(1), (12, 28, 28, 1), 0, 256).astype(jnp.uint8)
  x = (images.astype(jnp.float32) / 255.0 - 0.5) / 0.25
  forward = jax.jit(lambda variables, x: model.apply(variables, x, train=False))  # eagerly: a compile per operation
  predictions = jnp.argmax(forward({"params": params, "batch_stats": batch_stats}, x), -1)
  labels = predictions.at[:3].set((predictions[:3] + 1) % 10)  # three wrong, nine right
  valid = jnp.arange(12) < 10  # the last two are padding: predicted right, not counted
  spec = dataclasses.replace(data.get_spec("fashion_mnist"), mean=(0.5,), std=(0.25,))
  evaluate = jax.jit(step_lib.make_eval_step(model, cfg, spec))
  assert int(evaluate(params, batch_stats, images, labels, valid)) == 7
  with pytest.raises(ValueError, match="do not split into batches of 4"):
    evaluate(params, batch_stats, images[:10], labels[:10], valid[:10])


def test_resume_without_a_checkpoint_refuses_to_drop_the_logs(tmp_path, idx_dir):
  cfg = TrainConfig(
    optimizer="sgd", out_dir=str(tmp_path), data_dir=str(idx_dir), checkpoint=False, **{**TINY, "epochs": 1}
  )
  loop.train(cfg)
  logged = (tmp_path / "metrics.jsonl").read_text()
  with pytest.raises(ConfigError, match="no checkpoint"):
    loop.train(cfg, resume=True)
  assert (tmp_path / "metrics.jsonl").read_text() == logged


# ---------------------------------------------------------------------------
# Determinism, kill and resume, compare


def _cli(idx_dir, out_dir, *extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  flags = [f"--{k}={v}" for k, v in {**TINY, "epochs": 4, "data_dir": idx_dir}.items()]
  return subprocess.Popen(
    [sys.executable, "-m", "saner_jax.train", *flags, f"--out_dir={out_dir}", *extra],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _finish(proc: subprocess.Popen) -> str:
  try:
    output, _ = proc.communicate(timeout=600)
  finally:
    proc.kill()
  assert proc.returncode == 0, output
  return output


def _outputs(run_dir: pathlib.Path):
  """Everything a run leaves to read, less the wall-clock fields."""
  summary = json.loads((run_dir / "summary.json").read_text())
  for key in ("config", "git_revision"):
    summary.pop(key)
  summary["final"] = _without_times([summary["final"]])
  csv_rows = [line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines()]
  time_columns = [i for i, name in enumerate(csv_rows[0]) if name in TIME_KEYS]
  csv_rows = [[v for i, v in enumerate(row) if i not in time_columns] for row in csv_rows]
  return _without_times(_metrics(run_dir)), csv_rows, summary


def test_same_seed_same_run_and_kill_resume_loses_nothing(tmp_path, idx_dir):
  straight, killed = tmp_path / "saner_seed0", tmp_path / "killed"
  _finish(_cli(idx_dir, straight))

  proc = _cli(idx_dir, killed)
  kill_after_first_epoch(proc, killed)
  logged = _without_times(_metrics(killed))
  assert 1 <= len(logged) < 4
  # Same revision, seed and flags, another process: the same metrics to the last bit.
  assert logged == _without_times(_metrics(straight))[: len(logged)]

  output = _finish(_cli(idx_dir, killed, "--resume"))
  assert "resumed" in output
  assert [r["epoch"] for r in _metrics(killed)] == [1, 2, 3, 4]
  assert _outputs(killed) == _outputs(straight)
  assert (killed / "metrics.csv").read_text().count("\n") == 5

  # The finished runs are collected, not rerun, by compare, given the settings they were made with.
  flags = [f"--{k}={v}" for k, v in {**TINY, "epochs": 4, "data_dir": idx_dir}.items()]
  summaries = cli.compare(
    cli._compare_parser().parse_args(["--runs", "saner", "--collect_only", "--out_dir", str(tmp_path), *flags])
  )
  assert summaries["saner"][0]["best_test_acc"] == max(r["test_acc"] for r in _metrics(straight))
  assert "| saner | 1 |" in (tmp_path / "compare.md").read_text()
  assert (tmp_path / "compare.png").stat().st_size > 0


def test_resume_refuses_a_changed_config(tmp_path, idx_dir):
  cfg = TrainConfig(optimizer="sgd", out_dir=str(tmp_path), data_dir=str(idx_dir), **{**TINY, "epochs": 1})
  loop.train(cfg)
  changed = TrainConfig(
    optimizer="sgd", out_dir=str(tmp_path), data_dir=str(idx_dir), **{**TINY, "epochs": 1, "lr": 0.5}
  )
  with pytest.raises(ConfigError, match="lr"):
    loop.train(changed, resume=True)


def test_step_builders_still_take_the_loose_spec_keywords_with_a_deprecation_warning():
  from saner_jax.train import models, step
  from saner_jax.train.config import TrainConfig

  config = TrainConfig(dataset="fashion_mnist")
  with pytest.warns(
    DeprecationWarning,
    match=r"make_batch_fn\(mean=, std=\) is deprecated \(saner_jax 0.3.0\) and goes in 0.4.0; pass the dataset spec",
  ):
    spec = step.resolve_spec(config, None, {"mean": [0.5], "std": [0.25]}, "make_batch_fn")
  assert spec == dataclasses.replace(config.spec, mean=(0.5,), std=(0.25,))
  assert step.resolve_spec(config, config.spec, {}, "make_batch_fn") is config.spec
  with pytest.raises(TypeError, match="not both"):
    step.resolve_spec(config, config.spec, {"mean": [0.5]}, "make_eval_step")
  with pytest.raises(TypeError, match=r"unexpected keyword arguments \['meen'\]"):
    step.resolve_spec(config, None, {"meen": [0.5]}, "make_eval_step")
  with pytest.raises(TypeError, match="needs the dataset spec"):
    step.resolve_spec(config, None, {}, "make_train_step")
  with pytest.warns(DeprecationWarning, match=r"make_eval_step\(mean=, std=\)"):
    step.make_eval_step(models.create_model("resnet8", 10), config, mean=(0.5,), std=(0.25,))


def test_a_config_file_may_group_its_keys_by_section(tmp_path):
  flat = TrainConfig(noise_rate=0.6, rho=0.2, alpha=0.25, model="resnet20", epochs=3)
  (tmp_path / "flat.yaml").write_text(yaml.safe_dump(flat.to_dict()))
  sections = flat.to_sections()
  assert list(sections) == list(config_lib.SECTIONS)
  assert sections["noise"] == {"noise_mode": "symmetric", "noise_rate": 0.6, "noise_label_key": "worse_label"}
  assert sections["saner"]["alpha"] == 0.25 and sections["optimizer"]["rho"] == 0.2
  (tmp_path / "sectioned.yaml").write_text(yaml.safe_dump(sections, sort_keys=False))
  # Mixed: a base in sections, flat keys over it; "model: resnet8" is the field, not the section.
  (tmp_path / "mixed.yaml").write_text("base: sectioned.yaml\nmodel: resnet8\nnoise:\n  noise_rate: 0.4\n")
  for name in ("flat", "sectioned"):
    assert config_lib.from_mapping(config_lib.load_yaml(str(tmp_path / f"{name}.yaml"))) == flat
  mixed = config_lib.from_mapping(config_lib.load_yaml(str(tmp_path / "mixed.yaml")))
  assert dataclasses.replace(flat, model="resnet8", noise_rate=0.4) == mixed
  # A section whose keys are all commented out is empty, not an unknown key.
  (tmp_path / "empty.yaml").write_text("base: flat.yaml\nnoise:\n#  noise_rate: 0.1\n")
  assert config_lib.from_mapping(config_lib.load_yaml(str(tmp_path / "empty.yaml"))) == flat


@pytest.mark.parametrize(
  "text, message",
  [
    ("data:\n  rho: 0.2\n", "rho belongs under optimizer:, not data:; move it there"),
    ("rho: 0.3\noptimizer:\n  rho: 0.2\n", "gives rho twice, flat and under its section; keep one"),
    ("noise:\n  rate: 0.2\n", "unknown key 'rate' under noise:; its keys are ['noise_mode', 'noise_rate', "),
    ("noise: 0.2\n", "noise: is a section; give it a mapping of its keys, e.g. noise: {...}"),
    ("run:\n  base: fashion_mnist_quick\n", "base: goes at the top level of the file, not under run:"),
    # PyYAML would keep the last "optimizer" and drop the section above it without a word.
    ("optimizer:\n  rho: 0.2\n  lr: 0.05\noptimizer: sam\n", "key 'optimizer' is given twice in one mapping"),
  ],
)
def test_a_misplaced_sectioned_key_is_one_line(tmp_path, text, message):
  (tmp_path / "bad.yaml").write_text(text)
  with pytest.raises(ConfigError, match=re.escape(message)):
    config_lib.load_yaml(str(tmp_path / "bad.yaml"))


def test_the_sectioned_example_of_the_training_docs_loads(tmp_path):
  text = (REPO / "docs" / "training.md").read_text()
  block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
  (tmp_path / "example.yaml").write_text("\n".join(line.strip() for line in block.splitlines()) + "\n")
  config = config_lib.from_mapping(config_lib.load_yaml(str(tmp_path / "example.yaml")))
  assert (config.noise_rate, config.optimizer, config.rho, config.alpha) == (0.6, "saner", 0.1, 0.25)
  assert config.train_examples == 2000  # from the preset it builds on
