"""The validation split (--val_examples, --val_clean) and what is selected on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import read_metrics
from test_train import TINY

from saner_jax.train import cli, data, engine, loop, noise, reporting
from saner_jax.train.config import TrainConfig


def test_split_is_disjoint_and_leaves_the_training_subset_unchanged():
  without = engine.split_indices(1000, 200, 0, seed=3)[0]
  train, val = engine.split_indices(1000, 200, 100, seed=3)
  np.testing.assert_array_equal(train, without)  # holding out a validation set moves no training example
  assert len(val) == 100 and not set(train) & set(val)
  assert list(val) == sorted(val)
  # Without a training subset, the validation set comes out of the whole split.
  train, val = engine.split_indices(1000, None, 100, seed=3)
  assert (len(train), len(val)) == (900, 100) and not set(train) & set(val)
  assert sorted([*train, *val]) == list(range(1000))
  np.testing.assert_array_equal(engine.split_indices(50, None, 0, seed=3)[0], np.arange(50))


def _config(tmp_path, idx_dir, **values):
  return TrainConfig(
    **{**TINY, "data_dir": str(idx_dir), "out_dir": str(tmp_path / "run"), "noise_rate": 0.5, **values}
  )


@pytest.mark.parametrize("clean", [False, True])
def test_validation_labels_get_the_documented_noise(tmp_path, idx_dir, clean):
  cfg = _config(tmp_path, idx_dir, val_examples=40, val_clean=clean, seed=7)
  prepared = engine.prepare_data(cfg)
  train_set = data.load_dataset(cfg.spec, "train", data_dir=str(idx_dir))
  _, val_idx = engine.split_indices(256, TINY["train_examples"], 40, seed=7)
  # Symmetric noise on the held-out examples: its own draw, exactly round(0.5 x 40) flipped.
  expected = noise.inject_noise(
    train_set.labels[val_idx], num_classes=10, mode="symmetric", rate=0.5, seed=[7, 1], dataset="fashion_mnist"
  )
  assert expected.noise_mask.sum() == 20
  labels = np.asarray(prepared.val.data.labels)[: prepared.val.examples]
  np.testing.assert_array_equal(labels, train_set.labels[val_idx] if clean else expected.labels)
  np.testing.assert_array_equal(np.asarray(prepared.val.data.images)[:40], train_set.images[val_idx])
  assert prepared.val_noise_rate == (0.0 if clean else 0.5)
  assert prepared.val.examples == 40 and prepared.train.size == TINY["train_examples"]
  assert int(np.asarray(prepared.val.valid).sum()) == 40  # the padding to eval batches is not counted


def test_selection_follows_validation_and_the_test_maximum_is_only_a_diagnostic():
  history = [
    {"epoch": e, "val_acc": v, "test_acc": t, "noisy_memorised": m}
    for e, v, t, m in [(1, 0.3, 0.5, 0.1), (2, 0.6, 0.4, 0.2), (3, 0.6, 0.9, 0.3), (4, 0.5, 0.2, 0.4)]
  ]
  got = reporting.selected_metrics(history)
  # Epoch 2 is the first of the two best validation epochs; test's own best (epoch 3) is not chosen.
  assert (got["best_val_epoch"], got["test_acc_at_best_val"], got["noisy_memorised_at_best_val"]) == (2, 0.4, 0.2)
  assert (got["last_test_acc"], got["best_test_acc"]) == (0.2, 0.9)
  assert got["mean_last5_test_acc"] == pytest.approx(0.5)  # fewer than 5 epochs: all of them
  no_val = reporting.selected_metrics([{k: v for k, v in r.items() if k != "val_acc"} for r in history])
  assert no_val["test_acc_at_best_val"] is None and no_val["best_test_acc"] == 0.9


def test_a_run_logs_validation_accuracy_and_reports_the_selected_epoch(tmp_path, idx_dir, monkeypatch):
  checks = []
  validate = TrainConfig.validate
  monkeypatch.setattr(TrainConfig, "validate", lambda self: checks.append(self) or validate(self))
  summary = loop.train(_config(tmp_path, idx_dir, val_examples=32, epochs=3))
  assert len(checks) == 1  # a run validates its config once
  history = read_metrics(tmp_path / "run")
  assert all(0 <= r["val_acc"] <= 1 for r in history)
  best = int(np.argmax([r["val_acc"] for r in history]))
  assert summary["best_val_epoch"] == best + 1
  assert summary["test_acc_at_best_val"] == history[best]["test_acc"]
  assert summary["mean_last5_test_acc"] == pytest.approx(np.mean([r["test_acc"] for r in history]))
  assert (summary["val_examples"], summary["val_noise_rate"]) == (32, 0.5)
  assert json.loads((tmp_path / "run" / "summary.json").read_text())["best_val_epoch"] == best + 1
  table = reporting.markdown_table({"saner": [summary]})
  assert table.splitlines()[0].startswith("| run | seeds | test % @ best val | last test % |")
  assert "max test % (diagnostic: chosen on test)" in table


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--val_examples", "60000"], "--val_examples: 60000 leaves none of fashion_mnist's 60000 training examples"),
    (
      ["--train_examples", "59000", "--val_examples", "2000"],
      "--val_examples: 2000 exceeds the 1000 examples of fashion_mnist's train split left beside --train_examples 59000",
    ),
    (["--val_examples", "-1"], "--val_examples: must be >= 0"),
    (["--val_clean", "true"], "--val_clean: validates the held-out examples, so it needs --val_examples N"),
  ],
)
def test_bad_validation_flags_are_one_line(flags, message, tmp_path, capsys):
  assert cli.main([*flags, "--out_dir", str(tmp_path / "never")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
