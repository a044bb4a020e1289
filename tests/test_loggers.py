"""TensorBoard and Weights & Biases logging, offline, read back with each tool's own reader.

W&B runs in offline mode (WANDB_MODE=offline), its settings and caches in
the test's folder; its transaction log is read with ``wandb leet inspect
--json``, TensorBoard's event files with TensorBoard's EventAccumulator.
"""

import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import SMOKE_MODEL
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from saner_jax.train import cli, loop, reporting
from saner_jax.train.config import ConfigError, TrainConfig


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  for name in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):
    monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / f"wandb_{name.lower()}"))


def _tensorboard(folder: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  events = EventAccumulator(str(folder))
  events.Reload()
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _wandb_records(run_dir: pathlib.Path) -> list[dict]:
  out = subprocess.run(
    [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
    capture_output=True,
    text=True,
    check=True,
    timeout=120,
  ).stdout
  return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _wandb_history(records: list[dict]) -> list[dict]:
  return [r["history"]["item"] for r in records if r["type"] == "history"]


def test_tiny_run_logs_its_epochs_to_tensorboard_and_wandb(tmp_path, idx_dir, wandb_offline, capsys):
  # ResNet-4 at half width (8 channels): the cheapest model, and
  # --model_width reaching the trainer.
  out = tmp_path / "run"
  config = TrainConfig(
    model=SMOKE_MODEL,
    model_width=0.5,
    epochs=2,
    batch_size=32,
    train_examples=96,
    test_examples=64,
    eval_batch_size=32,
    alpha_warmup_epochs=2,
    progress="none",
    data_dir=str(idx_dir),
    out_dir=str(out),
    tensorboard="true",
    wandb=True,
    wandb_project="saner_jax_tests",
  )
  loop.train(config)
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == [1, 2]
  logged = ("train_loss", "train_acc", "clean_acc", "noisy_memorised", "test_acc", "group_B", "alpha")

  scalars = _tensorboard(out / "tensorboard")
  for key in logged:
    steps, values = zip(*scalars[key])
    assert steps == (1, 2), key
    np.testing.assert_allclose(values, [r[key] for r in records], rtol=1e-6, err_msg=key)  # float32 events
  assert "epoch" not in scalars

  (run_dir,) = (out / "wandb").glob("offline-run-*")
  wandb_records = _wandb_records(run_dir)
  (run,) = [r["run"] for r in wandb_records if r["type"] == "run"]
  assert run["project"] == "saner_jax_tests" and run["display_name"] == "saner"
  assert run["run_id"] == (out / "wandb_run_id").read_text().strip()
  assert run["config"]["update"]["model_width"] == 0.5
  assert run["config"]["update"]["model"] == SMOKE_MODEL
  history = _wandb_history(wandb_records)
  assert [h["epoch"] for h in history] == [h["_step"] for h in history] == [1, 2]
  for key in logged:
    assert [h[key] for h in history] == pytest.approx([r[key] for r in records], rel=1e-12), key
  assert f"wandb: offline run {run['run_id']}: written to {run_dir}" in capsys.readouterr().out


def test_a_resumed_log_continues_the_same_wandb_run_and_event_folder(tmp_path, wandb_offline):
  history = [{"epoch": e, "test_acc": e / 10, "group_B": None, "run": "saner"} for e in (1, 2, 3)]
  wandb = {"project": "saner_jax_tests", "name": "saner", "config": {"lr": 0.1}}
  first = reporting.MetricsLog(tmp_path, tensorboard="true", wandb=wandb)
  first.write(history[:1])
  first.write(history[:2])
  first.close()
  # W&B names an offline run's folder by the second it starts in; a resumed
  # run starts seconds later.
  time.sleep(1.0)
  # The resumed run rewrites the restored epochs' files without logging them again.
  second = reporting.MetricsLog(tmp_path, tensorboard="true", wandb=wandb)
  second.write(history[:2], tensorboard=False)
  second.write(history)
  second.close()

  # float32 events
  assert _tensorboard(tmp_path / "tensorboard") == {
    "test_acc": [(1, np.float32(0.1)), (2, np.float32(0.2)), (3, np.float32(0.3))]
  }
  runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
  assert len(runs) == 2
  ids = {r["run"]["run_id"] for d in runs for r in _wandb_records(d) if r["type"] == "run"}
  assert ids == {(tmp_path / "wandb_run_id").read_text().strip()}
  # None values and strings are left out; the epoch is both the step and a value.
  assert [[(h["_step"], h["epoch"], h["test_acc"]) for h in _wandb_history(_wandb_records(d))] for d in runs] == [
    [(1, 1, 0.1), (2, 2, 0.2)],
    [(3, 3, 0.3)],
  ]
  assert all("group_B" not in h and "run" not in h for d in runs for h in _wandb_history(_wandb_records(d)))


@pytest.mark.parametrize("logger, flag", [("wandb", ["--wandb", "true"]), ("tensorboard", ["--tensorboard", "true"])])
def test_a_missing_logger_is_one_line_naming_the_pip_command(logger, flag, monkeypatch, tmp_path, capsys):
  # As if the package were not installed: the logger's module is one that does not exist.
  monkeypatch.setitem(reporting.LOGGERS, logger, ("saner_jax_absent_module", logger))
  assert cli.main([*flag, "--out_dir", str(tmp_path / "never")]) == 2
  err = capsys.readouterr().err
  assert err == (
    f"error: --{logger}: needs the saner_jax_absent_module package, which is not installed: "
    f"pip install 'saner_jax[{logger}]'\n"
  )
  assert not (tmp_path / "never").exists()


def test_tensorboard_auto_writes_only_where_installed(monkeypatch, tmp_path):
  reporting.MetricsLog(tmp_path / "installed", tensorboard="auto").close()
  assert (tmp_path / "installed" / "tensorboard").is_dir()
  reporting.MetricsLog(tmp_path / "off", tensorboard="false").close()
  monkeypatch.setitem(reporting.LOGGERS, "tensorboard", ("saner_jax_absent_module", "tensorboard"))
  reporting.MetricsLog(tmp_path / "missing", tensorboard="auto").close()
  TrainConfig(tensorboard="auto").validate()
  with pytest.raises(ConfigError, match=r"--tensorboard: needs"):
    TrainConfig(tensorboard=True).validate()
  assert not (tmp_path / "off" / "tensorboard").exists() and not (tmp_path / "missing" / "tensorboard").exists()


def test_the_cpu_isa_keeps_the_vendor_and_the_kernel_choosing_flags_only():
  from saner_jax.train import reporting

  intel = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f avx512_fp16 amx_tile sse4_2\n"
  # The first CPU's block: a second one's flags do not leak in.
  first = reporting.isa_from_cpuinfo(intel + "\n" + intel.replace("avx512f ", ""))
  assert first == "GenuineIntel: avx2 avx512f avx512_fp16 amx_tile"
  assert reporting.isa_from_cpuinfo("vendor_id : AuthenticAMD\nflags : sse2\n") == "AuthenticAMD: none"
  assert reporting.isa_from_cpuinfo("Processor : ARMv7\n") is None
