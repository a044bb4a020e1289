"""The tune subcommand: a grid chosen on validation accuracy, resumable, and its configs reproduce their runs."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import read_metrics
from test_train import TINY

from saner_jax.train import cli, loop, tune
from saner_jax.train import config as config_lib
from saner_jax.train.config import ConfigError, TrainConfig


def _base(tmp_path, idx_dir, **values):
  return TrainConfig(
    **{**TINY, "epochs": 1, "data_dir": str(idx_dir), "out_dir": str(tmp_path / "tune"), "val_examples": 32, **values}
  )


def _counting(calls):
  def train(config, resume):
    calls.append(config.out_dir)
    return loop.train(config, resume=resume)

  return train


def test_tune_picks_the_best_validation_point_resumes_and_writes_a_config_that_reproduces_it(tmp_path, idx_dir):
  base = _base(tmp_path, idx_dir)
  grid = ["lr=0.01,0.3"]
  calls: list[str] = []

  def interrupted(config, resume):  # Ctrl-C during the second run
    if calls:
      raise KeyboardInterrupt
    return _counting(calls)(config, resume)

  with pytest.raises(KeyboardInterrupt):
    tune.tune(base, ["sgd"], grid, [0], train=interrupted, say=lambda line: None)
  assert len(calls) == 1
  chosen = tune.tune(base, ["sgd"], grid, [0], train=_counting(calls), say=lambda line: None)
  assert len(calls) == 2  # the finished point was not trained again

  out = tmp_path / "tune"
  scores = {
    lr: json.loads((out / "sgd" / f"lr{lr}_seed0" / "summary.json").read_text())["best_val_acc"] for lr in (0.01, 0.3)
  }
  best = max(scores, key=lambda lr: (scores[lr], lr == 0.01))  # ties: the first point
  assert chosen["sgd"]["point"] == {"lr": best}
  assert chosen["sgd"]["score"] == scores[best]
  table = (out / "tune.md").read_text()
  assert f"| lr{best} | {100 * scores[best]:.2f} |" in table and table.count("**yes**") == 1

  # Everything finished: a third call trains nothing.
  tune.tune(base, ["sgd"], grid, [0], train=_counting(calls), say=lambda line: None)
  assert len(calls) == 2

  # The chosen config retrains the tuned run exactly.
  chosen = yaml.safe_load((out / "sgd.yaml").read_text())
  assert chosen["optimizer"]["lr"] == best and "lr" not in chosen  # written in sections
  again = config_lib.from_mapping(config_lib.load_yaml(str(out / "sgd.yaml")))
  assert again.lr == best and again.out_dir == str(out / "sgd_chosen")
  loop.train(again)
  untimed = lambda run_dir: [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in read_metrics(run_dir)]
  assert untimed(out / "sgd_chosen") == untimed(out / "sgd" / f"lr{best}_seed0")


def test_a_store_from_another_grid_is_refused(tmp_path, idx_dir):
  base = _base(tmp_path, idx_dir)
  tune.tune(base, ["sgd"], ["lr=0.1"], [0], say=lambda line: None)
  with pytest.raises(ConfigError, match=r"holds a tuning of sgd with another setup \(grid \{'lr': \[0.1\]\} -> "):
    tune.tune(base, ["sgd"], ["lr=0.1,0.2"], [0], say=lambda line: None)
  with pytest.raises(ConfigError, match=r"another setup \(seeds \[0\] -> \[0, 1\]\)"):
    tune.tune(base, ["sgd"], ["lr=0.1"], [0, 1], say=lambda line: None)


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--grid", "rhoo=0.1,0.2"], "--grid: unknown flag 'rhoo' in 'rhoo=0.1,0.2'"),
    (["--grid", "rho=0.1", "--val_examples", "0"], "tune: pass --val_examples N (N > 0)"),
    (["--grid", "rho"], "--grid: 'rho' is not [RUN:]FLAG=V1,V2,..."),
    (["--grid", "sam:rho=0.1"], "--grid: 'sam:rho=0.1' names run 'sam', which is not one of --runs ['saner']"),
    (["--grid", "rho=0.1,x"], "--rho: expected float, got 'x'"),
    (["--grid", "seed=1,2"], "--grid: seed names the run, not its training"),
    (["--grid", "alpha=2"], "--grid: run saner at alpha2.0: --alpha: must be in [0, 1]"),
    (["--seeds", "0", "0"], "--seeds: [0, 0] lists a seed twice"),
  ],
)
def test_bad_tune_input_is_one_line(flags, message, tmp_path, capsys):
  argv = ["tune", "--runs", "saner", "--val_examples", "100", *flags, "--out_dir", str(tmp_path / "t")]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
  assert not (tmp_path / "t" / "tune.db").exists()
