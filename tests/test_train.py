"""The training toolkit end to end: configs, flags, runs, resume, compare.

Runs use ResNet-8 on a few hundred images so that each compiles and trains
in seconds; the kill-and-resume test runs the real CLI in subprocesses on
IDX files written here.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from saner_jax.train import cli, config as config_lib, loop, step as step_lib
from saner_jax.train.config import ConfigError, TrainConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
TIME_KEYS = ("epoch_time_s", "wall_time_s")
TINY = dict(
    model="resnet8", epochs=2, batch_size=32, train_examples=96, test_examples=64,
    eval_batch_size=32, alpha_warmup_epochs=2, progress="none",
)


def _write_idx(directory: pathlib.Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
  with gzip.open(directory / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
    f.write(struct.pack(">HBB3I", 0, 0x08, 3, *images.shape) + images.tobytes())
  with gzip.open(directory / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
    f.write(struct.pack(">HBBI", 0, 0x08, 1, len(labels)) + labels.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> pathlib.Path:
  """A learnable Fashion-MNIST-shaped dataset: the class sets a bright band."""
  directory = tmp_path_factory.mktemp("idx")
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 256), ("t10k", 64)):
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
      images[i, 2 * c : 2 * c + 3] = 250
    _write_idx(directory, prefix, images, labels)
  return directory


def _metrics(run_dir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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
    ],
)
def test_bad_flags_name_the_flag(flags, names, capsys):
  assert cli.main(flags + ["--out_dir", "unused"]) == 2
  err = capsys.readouterr().err
  assert names in err, err


def test_unknown_flag_is_rejected_by_name(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--learning_rate", "0.1"])
  assert exit_info.value.code == 2
  assert "--learning_rate" in capsys.readouterr().err


def test_unknown_config_key_is_named(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("lr: 0.1\nmomentun: 0.9\n")
  with pytest.raises(ConfigError, match="momentun"):
    config_lib.from_mapping(config_lib.load_yaml(str(path)))


def test_flags_override_the_config_file(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("lr: 0.2\nepochs: 7\n")
  parser = cli._train_parser()
  cfg = config_lib.from_args(parser.parse_args(["--config", str(path), "--lr", "0.3"]))
  assert (cfg.lr, cfg.epochs) == (0.3, 7)


@pytest.mark.parametrize("preset", sorted(p.stem for p in config_lib.PRESET_DIR.glob("*.yaml")))
def test_every_preset_is_valid(preset):
  cfg = config_lib.from_mapping(config_lib.load_yaml(preset))
  assert cfg.validate() is cfg


def test_multistep_schedule_decays_at_whole_epochs():
  cfg = TrainConfig(epochs=10, lr=0.1)
  schedule = step_lib.lr_schedule(cfg, steps_per_epoch=3)
  # torch's MultiStepLR(milestones=[5, 7]) on epochs; 3 steps an epoch.
  expected = [0.1] * 15 + [0.01] * 6 + [0.001] * 9
  np.testing.assert_allclose([float(schedule(s)) for s in range(30)], expected, rtol=1e-6)


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
  with pytest.raises(ConfigError, match="--resume"):
    loop.train(TrainConfig(out_dir=str(tmp_path), **TINY))


def test_nonfinite_loss_stops_with_a_clear_error(tmp_path, idx_dir, monkeypatch):
  monkeypatch.setenv("SANER_JAX_FASHION_MNIST_DIR", str(idx_dir))
  cfg = TrainConfig(optimizer="sam", lr=1e30, out_dir=str(tmp_path), **{**TINY, "epochs": 1})
  with pytest.raises(FloatingPointError, match="epoch 1: non-finite"):
    loop.train(cfg)


# ---------------------------------------------------------------------------
# Determinism, kill and resume, compare


def _cli(idx_dir, out_dir, *extra):
  env = {**os.environ, "SANER_JAX_FASHION_MNIST_DIR": str(idx_dir), "JAX_PLATFORMS": "cpu"}
  flags = [f"--{k}={v}" for k, v in {**TINY, "epochs": 4}.items()]
  return subprocess.Popen(
      [sys.executable, "-m", "saner_jax.train", *flags, f"--out_dir={out_dir}", *extra],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
  )


def test_same_seed_same_run_and_kill_resume_loses_nothing(tmp_path, idx_dir):
  straight, again, killed = tmp_path / "saner_seed0", tmp_path / "again", tmp_path / "killed"
  for run_dir in (straight, again):
    proc = _cli(idx_dir, run_dir)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()
  assert _without_times(_metrics(straight)) == _without_times(_metrics(again))

  proc = _cli(idx_dir, killed)
  deadline = time.time() + 600
  while not ((killed / "metrics.jsonl").exists() and _metrics(killed)):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert 1 <= len(_metrics(killed)) < 4

  proc = _cli(idx_dir, killed, "--resume")
  output, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, output
  assert "resumed" in output
  assert [r["epoch"] for r in _metrics(killed)] == [1, 2, 3, 4]
  assert _without_times(_metrics(killed)) == _without_times(_metrics(straight))
  assert (killed / "metrics.csv").read_text().count("\n") == 5

  # The finished runs are collected, not rerun, by compare.
  summaries = cli.compare(
      cli._compare_parser().parse_args(
          ["--runs", "saner", "--collect_only", "--out_dir", str(tmp_path), "--model", "resnet8"]
      )
  )
  assert summaries["saner"][0]["best_test_acc"] == max(r["test_acc"] for r in _metrics(straight))
  assert "| saner | 1 |" in (tmp_path / "compare.md").read_text()
  assert (tmp_path / "compare.png").stat().st_size > 0


def test_resume_refuses_a_changed_config(tmp_path, idx_dir, monkeypatch):
  monkeypatch.setenv("SANER_JAX_FASHION_MNIST_DIR", str(idx_dir))
  cfg = TrainConfig(optimizer="sgd", out_dir=str(tmp_path), **{**TINY, "epochs": 1})
  loop.train(cfg)
  changed = TrainConfig(optimizer="sgd", out_dir=str(tmp_path), **{**TINY, "epochs": 1, "lr": 0.5})
  with pytest.raises(ConfigError, match="lr"):
    loop.train(changed, resume=True)
