"""Folder datasets in their published layouts, and the streaming input pipeline.

Each test builds a small fake tree (a few dozen tiny JPEGs made with Pillow)
in the layout its dataset's authors publish.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import SMOKE_MODEL

from saner_jax.train import folders, loop, streaming
from saner_jax.train.config import ConfigError, TrainConfig

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("grain")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _jpeg(path: pathlib.Path, label: int, rng, size=(40, 36)) -> None:
  """A tiny JPEG whose mean colour says its class (learnable in one epoch)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  base = np.array([(label * 53) % 256, (label * 97 + 80) % 256, (label * 31 + 160) % 256], np.uint8)
  pixels = np.clip(base + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
  PIL.fromarray(pixels).save(path, quality=90)


def make_image_folder(root: pathlib.Path, rng) -> dict:
  for split, per_class in (("train", 8), ("test", 3)):
    for c, name in enumerate(("cat", "dog", "emu")):
      for i in range(per_class):
        _jpeg(root / split / name / f"{i}.jpg", c, rng)
  return {"train": [8, 8, 8], "test": [3, 3, 3]}


def make_animal10n(root: pathlib.Path, rng) -> dict:
  for split, per_class in (("training", 3), ("testing", 1)):
    for c in range(10):
      for i in range(per_class):
        _jpeg(root / split / f"{c}_{c * 100 + i}.jpg", c, rng)
  return {"train": [3] * 10, "test": [1] * 10}


def make_mini_webvision(root: pathlib.Path, rng) -> dict:
  train, val = [], []
  for c in (0, 1, 2, 3, 49, 50, 51):  # 50 and 51 are past the first 50 classes: dropped
    for i in range(4 if c < 50 else 2):
      rel = f"google/q{c:04d}/{i:06d}.jpg"
      _jpeg(root / rel, c % 7, rng)
      train.append(f"{rel} {c}")
    name = f"val{c:06d}.jpg"
    _jpeg(root / "val_images_256" / name, c % 7, rng)
    val.append(f"{name} {c}")
  (root / "info").mkdir(exist_ok=True)
  (root / "info" / "train_filelist_google.txt").write_text("\n".join(train) + "\n")
  (root / "info" / "val_filelist.txt").write_text("\n".join(val) + "\n")
  # ImageNet's validation images of the first 50 synsets, for --eval_split imagenet.
  wnids = [f"n{c:08d}" for c in range(60)]
  (root / "info" / "synsets.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(wnids)))
  for c in range(50):
    _jpeg(root / "imagenet" / "val" / wnids[c] / "ILSVRC2012_val_0.JPEG", c % 7, rng)
  counts = np.zeros(50, int)
  counts[[0, 1, 2, 3, 49]] = 4
  return {"train": counts.tolist(), "test": np.bincount([0, 1, 2, 3, 49], minlength=50).tolist()}


def make_clothing1m(root: pathlib.Path, rng) -> dict:
  noisy_kv, clean_kv, train_keys, test_keys = [], [], [], []
  for i in range(28):
    key = f"images/{i % 10}/{i:02d}/{i}.jpg"
    given = i % 4  # classes 0-3
    _jpeg(root / key, given, rng)
    noisy_kv.append(f"{key} {given}")
    train_keys.append(key)
    if i < 12:  # verified: every third of them disagrees with the given label
      clean_kv.append(f"{key} {(given + 1) % 4 if i % 3 == 0 else given}")
  for i in range(8):
    key = f"images/test/{i}.jpg"
    _jpeg(root / key, i % 4, rng)
    clean_kv.append(f"{key} {i % 4}")
    test_keys.append(key)
  annotations = root / "annotations"
  annotations.mkdir()
  for name, lines in (
    ("noisy_label_kv.txt", noisy_kv),
    ("clean_label_kv.txt", clean_kv),
    ("noisy_train_key_list.txt", train_keys),
    ("clean_test_key_list.txt", test_keys),
  ):
    (annotations / name).write_text("\n".join(lines) + "\n")
  return {"train": [7, 7, 7, 7] + [0] * 10, "test": [2, 2, 2, 2] + [0] * 10}


def make_tiny_imagenet(root: pathlib.Path, rng) -> dict:
  wnids = ["n01443537", "n01629819", "n01641577", "n01644900"]
  (root).mkdir(parents=True, exist_ok=True)
  (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
  for c, w in enumerate(wnids):
    for i in range(6):
      _jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG", c, rng, size=(64, 64))
  lines = []
  for i in range(8):
    _jpeg(root / "val" / "images" / f"val_{i}.JPEG", i % 4, rng, size=(64, 64))
    lines.append(f"val_{i}.JPEG\t{wnids[i % 4]}\t0\t0\t63\t63")
  (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
  _jpeg(root / "test" / "images" / "test_0.JPEG", 0, rng, size=(64, 64))  # unlabeled: never read
  return {"train": [6] * 4 + [0] * 196, "test": [2] * 4 + [0] * 196}


LAYOUTS = {
  "image_folder": make_image_folder,
  "animal10n": make_animal10n,
  "mini_webvision": make_mini_webvision,
  "clothing1m": make_clothing1m,
  "tiny_imagenet": make_tiny_imagenet,
}


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict:
  rng = np.random.default_rng(0)
  out = {}
  for name, make in LAYOUTS.items():
    root = tmp_path_factory.mktemp(name)
    out[name] = (root, make(root, rng))
  return out


def _config(dataset, root, tmp_path, **overrides) -> TrainConfig:
  values = dict(
    dataset=dataset, data_dir=str(root), image_size=32, model=SMOKE_MODEL, optimizer="sgd", noise_mode="none",
    epochs=1, batch_size=8, eval_batch_size=8, progress="none", out_dir=str(tmp_path / "run"), stream_workers=0,
    compilation_cache=False,
  )  # fmt: skip
  values.update(overrides)
  return TrainConfig(**values)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_labels_and_class_counts(trees, layout, tmp_path):
  root, expected = trees[layout]
  spec = _config(layout, root, tmp_path).spec
  for split in ("train", "test"):
    index = folders.read_index(spec, split, root)
    assert np.bincount(index.labels, minlength=spec.num_classes).tolist() == expected[split], split
    assert all(pathlib.Path(p).is_file() for p in index.paths)
  if layout == "animal10n":  # the label is the file name's prefix
    index = folders.read_index(spec, "train", root)
    assert all(pathlib.Path(p).name.startswith(f"{label}_") for p, label in zip(index.paths, index.labels))
  if layout == "tiny_imagenet":
    assert all("/test/" not in p for p in folders.read_index(spec, "test", root).paths)


def test_image_folder_classes_come_from_train(trees, tmp_path):
  root, _ = trees["image_folder"]
  spec = _config("image_folder", root, tmp_path).spec
  assert spec.class_names == ("cat", "dog", "emu") and spec.num_classes == 3
  assert spec.sizes == {"train": 24, "test": 9}


def test_mini_webvision_eval_splits(trees, tmp_path):
  root, _ = trees["mini_webvision"]
  webvision = folders.read_index(_config("mini_webvision", root, tmp_path).spec, "test", root)
  assert "WebVision's own validation set" in webvision.source
  assert all("val_images_256" in p for p in webvision.paths)
  imagenet = folders.read_index(_config("mini_webvision", root, tmp_path, eval_split="imagenet").spec, "test", root)
  assert np.array_equal(imagenet.labels, np.arange(50))
  assert all("imagenet/val/" in p for p in imagenet.paths)


def test_clothing1m_verified_labels(trees, tmp_path):
  root, _ = trees["clothing1m"]
  index = folders.read_index(_config("clothing1m", root, tmp_path).spec, "train", root)
  # The first 12 keys are verified; keys 0, 3, 6, 9 disagree with their given label.
  assert np.array_equal(np.flatnonzero(index.clean_labels >= 0), np.arange(12))
  wrong = np.flatnonzero((index.clean_labels >= 0) & (index.clean_labels != index.labels))
  assert wrong.tolist() == [0, 3, 6, 9]
  # Hand-worked: predictions right on 0 and 6 (the given, wrong label), true on 3; 9 neither.
  given, verified = index.labels[:12], index.clean_labels[:12]
  predicted = given.copy()
  predicted[3] = verified[3]
  predicted[9] = (given[9] + 2) % 4
  predicted[1] = (given[1] + 1) % 4  # one clean example missed
  fields = streaming.verified_fields(predicted, given, verified)
  assert fields["verified_noise_rate"] == pytest.approx(4 / 12)
  assert fields["verified_noisy_memorised"] == pytest.approx(2 / 4)
  assert fields["verified_noisy_true"] == pytest.approx(1 / 4)
  assert fields["verified_clean_acc"] == pytest.approx(7 / 8)


def _read_both(config: TrainConfig, root: pathlib.Path) -> None:
  spec = config.spec
  folders.read_index(spec, "train", root)
  folders.read_index(spec, "test", root)


@pytest.mark.parametrize(
  ("layout", "damage", "message"),
  [
    ("animal10n", lambda r: (r / "training" / "cat_1.jpg").write_bytes(b"x"), "cat_1.jpg: is not named <label>_<id>"),
    ("mini_webvision", lambda r: (r / "info" / "train_filelist_google.txt").write_text("a b c\n"), "line 1"),
    (
      "clothing1m",
      lambda r: (r / "annotations" / "clean_test_key_list.txt").unlink(),
      "clean_test_key_list.txt: no such",
    ),
    (
      "tiny_imagenet",
      lambda r: (r / "val" / "val_annotations.txt").write_text("x.JPEG\tn0\n"),
      "line 1 does not start",
    ),
    ("image_folder", lambda r: (r / "train").rename(r / "training"), "train: no such folder"),
  ],
)
def test_a_broken_layout_is_one_line_naming_the_file(trees, tmp_path, layout, damage, message):
  import shutil

  root = tmp_path / "copy"
  shutil.copytree(trees[layout][0], root)
  damage(root)
  with pytest.raises((folders.LayoutError, ConfigError)) as error:
    _read_both(_config(layout, root, tmp_path), root)
  text = str(error.value)
  assert message in text and "\n" not in text and f"the {layout} layout expects" in text


def test_cli_reports_a_missing_data_dir_in_one_line(tmp_path, capsys):
  from saner_jax.train import cli

  code = cli.main(["--dataset", "animal10n", "--noise_mode", "none", "--out_dir", str(tmp_path / "r")])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: --data_dir: animal10n is read from files") and err.count("\n") == 1


def _records(out_dir: pathlib.Path) -> list[dict]:
  records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in records]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("path", ["device", "stream"])
def test_trains_end_to_end(trees, tmp_path, layout, path, capsys):
  root, _ = trees[layout]
  cfg = _config(layout, root, tmp_path, input_pipeline=path)
  summary = loop.train(cfg)
  out = capsys.readouterr().out
  assert f"input: {path} (--input_pipeline {path})" in out
  (record,) = _records(tmp_path / "run")
  assert 0.0 <= record["test_acc"] <= 1.0 and np.isfinite(record["train_loss"])
  assert summary["train_examples"] == folders.read_index(cfg.spec, "train", root).labels.size
  if cfg.spec.real_noise:
    assert "real label noise and no noise mask" in out
    assert record["clean_acc"] is None and record["noisy_memorised"] is None
  else:
    assert record["clean_acc"] == record["train_acc"]
  if layout == "clothing1m":
    assert record["verified_examples"] == 12 and record["verified_noise_rate"] == pytest.approx(4 / 12)


def test_auto_chooses_by_size(trees, tmp_path):
  root, _ = trees["animal10n"]
  assert streaming.choose(_config("animal10n", root, tmp_path))[0] == "device"
  assert streaming.choose(_config("clothing1m", root, tmp_path, image_size=224))[0] == "stream"
  assert streaming.choose(_config("animal10n", root, tmp_path, input_pipeline="stream")) == (
    "stream",
    "--input_pipeline stream",
  )


def test_stream_order_is_a_function_of_seed_epoch_step(trees, tmp_path):
  """The batches do not depend on the number of decoding threads or on where iteration starts."""
  root, _ = trees["mini_webvision"]
  cfg = _config("mini_webvision", root, tmp_path, epochs=2)
  data = streaming.prepare(cfg)
  spe = data.train.size // cfg.batch_size
  whole = list(streaming.train_iterator(cfg, data.train, spe, process_index=0, process_count=1))
  assert len(whole) == 2 * spe
  # Two processes each read their half of every batch; together they make the same batches.
  halves = [list(streaming.train_iterator(cfg, data.train, spe, process_index=p, process_count=2)) for p in (0, 1)]
  for k, batch in enumerate(whole):
    joined = np.concatenate([halves[0][k]["images"], halves[1][k]["images"]])
    assert np.array_equal(joined, batch["images"])
  # Each epoch sees every example once (the ragged rest dropped), in an order of its own.
  order1, order2 = (streaming.epoch_order(cfg.seed, e, data.train.size) for e in (1, 2))
  assert sorted(order1) == list(range(data.train.size)) and not np.array_equal(order1, order2)


_KILLED_RUN = """
import os, signal, sys
from saner_jax.train import checkpointing, loop
from saner_jax.train.config import from_mapping
import yaml
cfg = from_mapping(yaml.safe_load(open(sys.argv[1])))
original = checkpointing.save
def save_then_die(checkpoints, state, progress, *args, **kwargs):
  original(checkpoints, state, progress, *args, **kwargs)
  if progress.epoch == 1:
    os.kill(os.getpid(), signal.SIGKILL)
checkpointing.save = save_then_die
loop.train(cfg, resume=len(sys.argv) > 2)
"""


def _run_script(tmp_path, config: TrainConfig, *extra: str, env=None):
  import yaml

  path = tmp_path / f"{pathlib.Path(config.out_dir).name}.yaml"
  path.write_text(yaml.safe_dump(config.to_dict()))
  script = tmp_path / "killed_run.py"
  script.write_text(textwrap.dedent(_KILLED_RUN))
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run([sys.executable, str(script), str(path), *extra], env=env, capture_output=True, text=True)


def test_sigkill_resume_gives_the_same_metrics_streaming(trees, tmp_path):
  root, _ = trees["mini_webvision"]
  common = dict(input_pipeline="stream", epochs=3, batch_size=4)
  whole = _config("mini_webvision", root, tmp_path, out_dir=str(tmp_path / "whole"), **common)
  loop.train(whole)
  killed = _config("mini_webvision", root, tmp_path, out_dir=str(tmp_path / "killed"), **common)
  first = _run_script(tmp_path, killed)
  assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
  from saner_jax.train import checkpointing

  assert checkpointing.completed_epochs(tmp_path / "killed") == [1]  # killed before its logs were written
  second = subprocess.run(
    [sys.executable, "-m", "saner_jax.train", "--config", str(tmp_path / "killed" / "config.yaml"), "--resume"],
    env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
  )
  assert second.returncode == 0, second.stderr[-2000:]
  assert "resumed" in second.stdout
  assert _records(tmp_path / "killed") == _records(tmp_path / "whole")


def test_several_devices_match_one_streaming(trees, tmp_path):
  """Four simulated CPU devices (each batch split four ways) give the one-device run's metrics."""
  root, _ = trees["animal10n"]
  results = {}
  for devices in (1, 4):
    cfg = _config("animal10n", root, tmp_path, out_dir=str(tmp_path / f"d{devices}"), input_pipeline="stream",
                  epochs=2, cpu_conv="false")  # fmt: skip
    import yaml

    (tmp_path / f"d{devices}.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    env = {
      **os.environ,
      "PYTHONPATH": str(ROOT),
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    done = subprocess.run(
      [sys.executable, "-m", "saner_jax.train", "--config", str(tmp_path / f"d{devices}.yaml")],
      env=env,
      capture_output=True,
      text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"on {devices} device(s)" in done.stdout
    results[devices] = _records(tmp_path / f"d{devices}")
  one, four = results[1], results[4]
  for a, b in zip(one, four):
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    # Counted metrics may move by an example where float reductions differ in the last bit.
    assert a["train_acc"] == pytest.approx(b["train_acc"], abs=1 / 30 + 1e-9)
    assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1 / 10 + 1e-9)


REAL_PRESETS = [p for p in __import__("saner_jax.train.config", fromlist=["x"]).preset_names() if p.startswith("real/")]


def test_real_presets_exist():
  assert REAL_PRESETS == [
    "real/animal10n_resnet18",
    "real/clothing1m_resnet50",
    "real/mini_webvision_inception_resnet_v2",
    "real/mini_webvision_resnet18",
    "real/tiny_imagenet_resnet18",
  ]


@pytest.mark.parametrize("preset", REAL_PRESETS)
def test_real_preset_header_and_values(preset, trees, tmp_path):
  from saner_jax.train import config as config_lib
  from saner_jax.train import models

  path = config_lib.resolve_preset(preset)
  header = path.read_text().split("\n\n")[0]
  assert f"--config {preset} --data_dir" in header  # the command
  values = config_lib.load_yaml(preset)
  dataset = values["dataset"]
  assert folders.LAYOUT_HELP[dataset]  # a folder dataset
  layout_words = {"animal10n": "training/", "mini_webvision": "train_filelist_google.txt",
                  "clothing1m": "noisy_label_kv.txt", "tiny_imagenet": "val_annotations.txt"}  # fmt: skip
  assert layout_words[dataset] in path.read_text()  # the data layout
  if dataset == "mini_webvision":
    assert values["epochs"] == 120 and values["lr_milestones"] == [0.5, 0.75]  # epochs 60 and 90
    assert values["image_size"] == {"resnet18_imagenet": 224, "inception_resnet_v2": 299}[values["model"]]
  if values["model"] not in models.MODELS:
    pytest.skip(f"model {values['model']} is not in saner_jax.train.models yet (issue 22, item 3)")
  root = trees[dataset][0]
  cfg = config_lib.from_mapping({**values, "data_dir": str(root)})
  assert cfg.validate().spec.image_shape[0] == values.get("image_size", cfg.spec.image_shape[0])
