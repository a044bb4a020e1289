"""The benchmark scripts run at tiny sizes on the CPU, so that they are ready when their hardware is there."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
from conftest import SMOKE_MODEL

REPO = pathlib.Path(__file__).resolve().parents[1]


def _script(name: str):
  spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_gpu_throughput_runs_on_the_cpu_at_a_tiny_size(tmp_path):
  gpu_throughput = _script("gpu_throughput")
  flags = f"--model {SMOKE_MODEL} --batch-size 8 --image-size 8 --dataset-size 16 --warmup 1 --windows 2 --window 2"
  record = gpu_throughput.main([*flags.split(), "--peak-tflops", "0.5", "--out", str(tmp_path / "gpu")])
  results = record["results"]
  assert list(results) == ["sgd", "sam", "saner"]
  for r in results.values():
    assert len(r["step_s"]) == 2 and r["median_step_s"] > 0
    assert r["images_per_s"] == pytest.approx(8 / r["median_step_s"])
    assert r["mfu"] == pytest.approx(r["flops"] / r["median_step_s"] / 0.5e12)
  # SAM's step is two forward-backward passes to SGD's one.
  assert 1.5 < results["sam"]["flops"] / results["sgd"]["flops"] < 2.5
  assert results["saner"]["flops"] > results["sam"]["flops"]  # the group mask and reweighting
  assert "SANER/SAM step time" in (tmp_path / "gpu.txt").read_text()
  assert (tmp_path / "gpu.json").exists()


def test_gpu_throughput_knows_the_peak_of_the_lent_gpus():
  gpu_throughput = _script("gpu_throughput")
  assert gpu_throughput.peak_tflops("NVIDIA H200") == 989.0
  assert gpu_throughput.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert gpu_throughput.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert gpu_throughput.peak_tflops("cpu") is None


def test_gpu_check_fits_its_budget_and_reports_images_per_second(tmp_path, capsys):
  gpu_check = _script("gpu_check")
  # 420 s left for two runs, at 20 s per epoch plus 15%: 9 epochs each; never fewer than 1.
  assert gpu_check.epochs_within(480, 60, 20) == 9
  assert gpu_check.epochs_within(480, 479, 20) == 1
  summary = {"test_acc_at_best_val": 0.9012, "last_test_acc": 0.9, "noisy_memorised_at_best_val": 0.05}
  runs = {"sam": {"metrics": [{"epoch_time_s": t} for t in (30.0, 4.0, 5.0)], "summary": summary}}
  table = gpu_check.report(runs, 59500, "NVIDIA H100 80GB HBM3 (gpu, 1 device(s) visible)")
  assert "| sam | 3 | 30.0 | 4.50 | 13,222 | 90.12 | 90.00 | 5.00 |" in table  # 59,500 / 4.5 s
  # The device machine has no TFDS: a folder without the IDX files is one line, before anything runs.
  assert gpu_check.main(["--data_dir", str(tmp_path), "--out", str(tmp_path / "check")]) == 2
  assert capsys.readouterr().err.startswith(f"error: --data_dir: {tmp_path} holds no train-images-idx3-ubyte.gz")


def test_scaling_runs_at_a_tiny_size(tmp_path):
  scaling = _script("scaling")
  record = scaling.main(["--models", SMOKE_MODEL, "--batch-sizes", "8", "--rounds", "2", "--out", str(tmp_path / "s")])
  [row] = record["rows"]
  assert (row["model"], row["batch_size"]) == (SMOKE_MODEL, 8)
  assert all(len(row["times_s"][m]) == 2 for m in ("sgd", "sam", "saner"))
  assert row["saner/sam"] == pytest.approx(row["median_s"]["saner"] / row["median_s"]["sam"])
  assert "largest SANER/SAM" in (tmp_path / "s.txt").read_text()


def test_saner_overhead_counts_the_reweighting_at_a_tiny_size(tmp_path):
  overhead = _script("saner_overhead")
  record = overhead.main(["--models", SMOKE_MODEL, "--batch-sizes", "8", "--out", str(tmp_path / "o")])
  [row] = record["rows"]
  sam, saner = row["cost"]["sam"], row["cost"]["saner"]
  # SANER's step holds SAM's two passes plus elementwise work on the parameters: more, but little more.
  assert sam["flops"] < saner["flops"] < 1.1 * sam["flops"]
  assert row["saner/sam flops"] == pytest.approx(saner["flops"] / sam["flops"])
  assert record["largest"] == max(row["saner/sam flops"], row["saner/sam bytes"])
  assert "largest SANER/SAM ratio" in (tmp_path / "o.txt").read_text()


def test_pipeline_cost_times_variants_of_a_key_and_plans_a_run(tmp_path, idx_dir):
  cost = _script("pipeline_cost")
  flags = [
    "--set",
    f"model={SMOKE_MODEL}",
    "train_examples=64",
    "test_examples=32",
    "eval_batch_size=32",
    "batch_size=32",
  ]
  flags += [f"data_dir={idx_dir}", "epochs=10", "--rounds", "1", "--out", str(tmp_path / "c.json")]
  record = cost.main(["--vary", "optimizer", "sgd", "sam", *flags])
  assert set(record["median_epoch_s"]) == {"sgd", "sam"}
  assert record["ratio_to_plain"]["sgd"] == 1.0
  # A 10-epoch run: the first epoch (with its compiles), then 9 at the median.
  sam = record["first_epoch_s"]["sam"] + 9 * record["median_epoch_s"]["sam"]
  assert record["run_minutes"]["sam"] == pytest.approx(sam / 60)
  assert "10-epoch run" in (tmp_path / "c.txt").read_text()


def test_results_are_written_as_json_and_text_into_a_new_folder_and_replaced_whole(tmp_path):
  from saner_jax.train import reporting

  prefix = tmp_path / "new" / "bench"
  reporting.write_results(prefix, {"ratio": 0.5, "rows": [1, 2]}, "ratio 0.5")
  reporting.write_results(prefix, {"ratio": 1.5}, "ratio 1.5\n")
  assert json.loads((tmp_path / "new" / "bench.json").read_text()) == {"ratio": 1.5}
  assert (tmp_path / "new" / "bench.txt").read_text() == "ratio 1.5\n"
  assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["bench.json", "bench.txt"]  # no temporary left


def _fake_run(run_dir: pathlib.Path, shares, vals, tests, memorised) -> None:
  """A finished run's directory: the per-epoch records plot_cheap_sam reads, and a summary."""
  run_dir.mkdir(parents=True)
  records = [
    {"sam_share": s, "val_acc": v, "test_acc": t, "noisy_memorised": memorised, "epoch_time_s": 1.0}
    for s, v, t in zip(shares, vals, tests)
  ]
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (run_dir / "summary.json").write_text("{}")


def test_the_cost_plot_reads_several_directories_and_counts_passes_by_hand(tmp_path):
  plot = _script("plot_cheap_sam")
  tuned, cheap = tmp_path / "tuned", tmp_path / "cheap"
  for seed, bump in ((10, 0.0), (11, 0.02)):
    _fake_run(tuned / f"sgd_seed{seed}", [None, None], [0.4, 0.5], [0.70 + bump, 0.60], 0.2)
    _fake_run(tuned / f"saner_seed{seed}", [1.0, 1.0], [0.5, 0.4], [0.75 + bump, 0.50], 0.1)
    # Half the steps sharpness-aware in epoch 1, none in epoch 2: 1.25 passes per epoch on average.
    _fake_run(cheap / f"saner@every2_seed{seed}", [0.5, 0.0], [0.3, 0.6], [0.50, 0.72 + bump], 0.3)
    _fake_run(cheap / f"saner_rerun_seed{seed}", [1.0, 1.0], [0.5, 0.4], [0.75, 0.50], 0.1)
    _fake_run(cheap / "sgd_2x" / f"sgd_seed{seed}", [None, None], [0.5, 0.4], [0.71 + bump, 0.60], 0.4)
  out = tmp_path / "out"
  out.mkdir()
  argv = [str(tuned), str(cheap), "--exclude", "saner_rerun", "--sgd_2x", str(cheap / "sgd_2x"), "--out", str(out)]
  assert plot.main(argv) == 0
  points = plot.collect([tuned, cheap], cheap / "sgd_2x", ("saner_rerun",))
  assert sorted(points) == ["saner", "saner@every2", "sgd", "sgd_2x"]
  assert points["saner@every2"][10]["passes"] == 1.25
  assert points["saner"][10]["passes"] == 2.0 and points["sgd"][10]["passes"] == 1.0
  assert points["sgd_2x"][10]["passes"] == 2.0  # twice the epochs, one pass each
  # The test accuracy is the epoch of best validation accuracy's, never the best test.
  assert points["saner@every2"][11]["test"] == pytest.approx(74.0)
  assert points["sgd"][10]["test"] == pytest.approx(60.0)
  table = (out / "cost.md").read_text()
  assert "| saner@every2 | 2 | 1.25 |" in table and (out / "cost.png").stat().st_size > 0
  # Both seeds of saner@every2 select 72 (+2 for seed 11) against SANER's 75 (+2): -3.00 exactly, paired.
  assert "| -3.00 [-3.00, -3.00] |" in table
  clash = tmp_path / "clash"
  _fake_run(clash / "sgd_seed12", [None], [0.5], [0.7], 0.2)
  with pytest.raises(SystemExit, match="sgd are in two of the directories"):
    plot.collect([tuned, clash], None)


def test_same_run_ignores_wall_times_and_names_the_first_difference(tmp_path, capsys):
  same_run = _script("same_run")
  committed = REPO / "benchmarks" / "results" / "fashion_mnist" / "tuned" / "sym40" / "final" / "saner_seed10"
  lines = [json.loads(line) for line in (committed / "metrics.jsonl").read_text().splitlines()]
  rerun, changed = tmp_path / "rerun", tmp_path / "changed"
  edits = {"epoch_time_s": 1.0, "wall_time_s": 2.0}, {"cosine": 0.5, "train_loss": 9.0}
  for run_dir, edit in zip((rerun, changed), edits):
    run_dir.mkdir()
    edited = [{**r, **edit} if r["epoch"] >= 7 else r for r in lines]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited))
    (run_dir / "summary.json").write_text("{}")
  assert same_run.main([str(committed), str(rerun)]) == 0
  assert capsys.readouterr().out == f"same run: {len(lines)} epochs\n"
  # The earliest epoch that differs, its train loss named before the keys sorted ahead of it.
  assert same_run.main([str(committed), str(changed)]) == 1
  assert capsys.readouterr().out.startswith(f"not the same run: epoch 7: train_loss is {lines[6]['train_loss']!r}")
  (changed / "metrics.jsonl").write_text("{")
  with pytest.raises(SystemExit, match=r"line 1 is not JSON; the run's log is damaged"):
    same_run.main([str(committed), str(changed)])
  (changed / "metrics.jsonl").write_text("")
  with pytest.raises(SystemExit, match=r"no epoch logged"):
    same_run.main([str(committed), str(changed)])
  (changed / "summary.json").unlink()
  with pytest.raises(SystemExit, match=r"no summary.json, so the run has not finished"):
    same_run.main([str(committed), str(changed)])
