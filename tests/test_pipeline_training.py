"""The noise-robust pipelines in the trainer: flags, runs, metrics, kill and resume.

Runs use the smoke-test ResNet-4 on a few hundred IDX images (tests/conftest.py), with each
pipeline's schedules shortened to a 4-epoch run, and each pipeline with a
different optimizer of the family, so every one runs past its warm-up or
first stage.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_same_run_metrics, kill_after_first_epoch, parameter_count
from conftest import read_metrics as _metrics
from test_train import REPO, TINY, _finish, _outputs, _without_times

from saner_jax.train import cli, loop
from saner_jax.train import config as config_lib

# Per pipeline: an optimizer of the family, and its schedules fitted to 4 epochs.
RUNS = {
  "bootstrap": ["--optimizer=asam", "--saner=true"],
  "co_teaching": ["--optimizer=saner", "--num_gradual=2", "--m_sharpness=2"],  # the lax.map pairing
  "dividemix": ["--optimizer=saner", "--pipeline_warmup_epochs=1"],
  "plc": ["--optimizer=sgd", "--pipeline_warmup_epochs=1"],
  "joint_optimization": ["--optimizer=sam", "--jo_stage1_epochs=2", "--jo_update_start=2", "--jo_window=2"],
}


@pytest.mark.parametrize(
  "flags, names",
  [
    (["--pipeline", "mentor_net"], "--pipeline"),
    (["--pipeline", "co_teaching", "--forget_rate", "1.0"], "--forget_rate"),
    (["--pipeline", "co_teaching", "--forget_rate", "-0.1"], "--forget_rate"),
    (["--forget_rate", "0.3"], "--forget_rate"),  # a pipeline flag without its pipeline
    (["--pipeline", "dividemix", "--tau_start", "0.8"], "--tau_start"),  # another pipeline's flag
    (["--pipeline", "plc", "--tau_start", "0.4"], "--tau_end"),
    (["--pipeline", "dividemix", "--p_threshold", "1.5"], "--p_threshold"),
    (["--pipeline", "dividemix", "--sharpen_temperature", "0"], "--sharpen_temperature"),
    (["--pipeline", "joint_optimization", "--epochs", "10", "--jo_stage1_epochs", "10"], "--jo_stage1_epochs"),
  ],
)
def test_bad_pipeline_flags_name_the_flag(flags, names, capsys, tmp_path):
  assert cli.main(flags + ["--out_dir", str(tmp_path / "never")]) == 2
  err = capsys.readouterr().err
  assert names in err and "Traceback" not in err, err


def test_pipeline_fields_default_to_the_authors_values():
  cfg = config_lib.TrainConfig()
  assert cfg.pipeline == "none"
  assert (cfg.bootstrap_beta, cfg.forget_rate, cfg.num_gradual, cfg.forget_exponent) == (0.8, 0.2, 10, 1.0)
  assert (cfg.pipeline_warmup_epochs, cfg.p_threshold, cfg.lambda_u, cfg.sharpen_temperature, cfg.mixup_alpha) == (
    10,
    0.5,
    25.0,
    0.5,
    4.0,
  )
  assert (cfg.tau_start, cfg.tau_end, cfg.tau_step) == (0.9, 0.5, 0.05)
  assert (cfg.jo_alpha, cfg.jo_beta) == (1.2, 0.8)
  assert config_lib.TrainConfig(pipeline="joint_optimization", epochs=400).validate().jo_stage1_epochs_resolved == 200


def _tiny(tmp_path, idx_dir, **values):
  return config_lib.from_mapping(
    {**TINY, "epochs": 1, "data_dir": str(idx_dir), "out_dir": str(tmp_path / values.get("pipeline", "none")), **values}
  )


def _records(summary_dir):
  return _without_times(_metrics(summary_dir))


@pytest.mark.parametrize(
  "pipeline, values",
  [
    ("co_teaching", {"forget_rate": 0.0}),  # both networks keep every sample: network 0 is the plain run
    ("bootstrap", {"bootstrap_beta": 1.0}),  # the target is the given label: cross-entropy
  ],
)
def test_pipeline_reduces_to_the_plain_trainer(pipeline, values, tmp_path, idx_dir):
  # SAM, whose update is continuous in the gradients: under SANER a
  # coordinate that rounding moves into or out of group B changes the update
  # by a factor alpha, and the two runs part by more than rounding (with
  # oneDNN capped at AVX2, ONEDNN_MAX_CPU_ISA=AVX2, bootstrap's cosine then
  # differed by 5e-4 relative). The group fractions are still logged.
  plain = loop.train(_tiny(tmp_path, idx_dir, optimizer="sam"))
  run = loop.train(_tiny(tmp_path, idx_dir, optimizer="sam", pipeline=pipeline, **values))
  # The pipeline's loss is another formulation of cross-entropy: equal to
  # rounding, so the counted metrics agree to some coordinates or examples.
  # Coordinates where SAM barely changes the gradient sit on the A/B
  # boundary, and rounding decides them: under SANER with oneDNN capped at
  # AVX2, bootstrap's group A moved by 35 of ResNet-8's 75k coordinates per
  # step (0.05%). The slack is 0.1% of the model's coordinates: 5 of the
  # smoke-test model's 5,018 at 28x28x1, where these runs differ by under one
  # per step with oneDNN capped at AVX2. The losses and cosines, at rtol
  # 1e-4, are what catches a real difference.
  noisy = round(plain["realised_noise_rate"] * plain["train_examples"])
  parameters = parameter_count(TINY["model"], 10, (28, 28, 1))
  assert_same_run_metrics(
    {k: v for k, v in run["final"].items() if k in plain["final"]},
    plain["final"],
    parameters=parameters,
    coordinates_slack=parameters // 1000,
    examples=min(noisy, TINY["test_examples"]),
  )


def _cli(idx_dir, out_dir, pipeline, *extra, env=()):
  flags = [f"--{k}={v}" for k, v in {**TINY, "epochs": 4, "data_dir": idx_dir}.items()]
  return subprocess.Popen(
    [sys.executable, "-m", "saner_jax.train", *flags, f"--pipeline={pipeline}", *RUNS[pipeline]]
    + [f"--out_dir={out_dir}", *extra],
    cwd=REPO,
    env={**os.environ, "JAX_PLATFORMS": "cpu", **dict(env)},
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _check_pipeline_metrics(pipeline: str, history: list[dict], summary: dict) -> None:
  """What each pipeline logs, where the run's sizes make it exact."""
  column = lambda key: [r.get(key) for r in history]
  assert all(np.isfinite(r["train_loss"]) and 0 <= r["test_acc"] <= 1 for r in history)
  if pipeline == "co_teaching":
    # Forget rates 0.1, 0.2, ...: int(0.9 x 32) = 28 and int(0.8 x 32) = 25 samples of each batch kept.
    assert column("forget_rate") == pytest.approx([0.1, 0.2, 0.2, 0.2])
    assert column("clean_fraction") == [28 / 32, 25 / 32, 25 / 32, 25 / 32]
    assert all(0 <= v <= 1 for v in column("clean_precision") + column("clean_recall"))
  elif pipeline == "dividemix":
    assert column("clean_precision")[0] is None  # warm-up: no split yet
    assert all(
      v is not None and 0 <= v <= 1
      for key in ("clean_precision", "clean_recall", "clean_fraction")
      for v in column(key)[1:]
    )
  elif pipeline == "plc":
    assert column("tau") == [0.9, 0.85, 0.8, 0.75]
    assert all(isinstance(v, int) and v >= 0 for v in column("label_flips"))
  elif pipeline == "joint_optimization":
    assert column("stage") == [1, 1, 2, 2]
    # Before the first update the soft labels are the given ones.
    assert column("label_accuracy")[0] == pytest.approx(1 - summary["realised_noise_rate"])
  else:
    assert "clean_precision" not in history[0] and "label_accuracy" not in history[0]


# The jitted train steps of a pipeline, where they are not one "step".
STEPS = {"dividemix": ["warmup_step", "step"], "joint_optimization": ["step", "step"]}


# The pipelines whose state is more than the plain trainer's: a second network,
# the mixture's inputs, corrected or soft labels. Hard bootstrapping is the
# plain recipe (engine.supervised) with another loss, a pure function of the
# batch: its state is the plain trainer's, whose kill and resume test_train.py
# tests.
OWN_STATE = ("co_teaching", "dividemix", "joint_optimization", "plc")


@pytest.mark.parametrize("pipeline", sorted(RUNS))
def test_pipeline_runs_and_kill_resume_loses_nothing(pipeline, tmp_path, idx_dir):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  output = _finish(_cli(idx_dir, straight, pipeline, env={"JAX_LOG_COMPILES": "1"}))
  # Each train step compiles once per run (Joint Optimization's two stages
  # have one each): a state field replaced by an array placed unlike the
  # step's output retraced and recompiled it in the next epoch.
  compiled = re.findall(r"Compiling jit\((\w*step)\)", output)
  assert sorted(compiled) == sorted(STEPS.get(pipeline, ["step"])), compiled
  summary = json.loads((straight / "summary.json").read_text())
  _check_pipeline_metrics(pipeline, _metrics(straight), summary)
  assert (straight / "curves.png").stat().st_size > 0
  if pipeline not in OWN_STATE:
    return

  proc = _cli(idx_dir, killed, pipeline)
  kill_after_first_epoch(proc, killed)
  assert 1 <= len(_metrics(killed)) < 4
  output = _finish(_cli(idx_dir, killed, pipeline, "--resume"))
  assert "resumed" in output
  assert _outputs(killed) == _outputs(straight)
