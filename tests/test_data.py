"""Tests of saner_jax.train.data: TFDS (mocked and a real array_record copy), IDX files."""

import gzip
import io
import logging
import os
import tempfile
import time
from unittest import mock

import numpy as np
import pytest

from saner_jax.train import data

tfds = pytest.importorskip("tensorflow_datasets")

DEBIAN = data.DEBIAN_FASHION_MNIST_DIR
# The bound on "fails fast": a TFDS lookup that downloads or retries takes
# minutes, and a loaded 2-core CI running -n 2 can stretch a fraction of a
# second into several, so a bound of a few seconds would flake there.
FAIL_FAST_S = 30


# ---------------------------------------------------------------------------
# TFDS, mocked


@pytest.mark.parametrize("name", sorted(n for n, s in data.DATASETS.items() if s.layout is None))  # TFDS's, not folders
def test_mock_tfds_each_dataset_has_its_shape_and_dtypes(name, mock_tfds, tmp_path):
  spec = data.DATASETS[name]
  with mock_tfds(num_examples=13):
    train = data.load_dataset(name, "train", data_dir=tmp_path, source="tfds")
    test = data.load_dataset(name, "test", data_dir=tmp_path, max_examples=5)
  assert train.images.shape == (13, *spec.image_shape) and train.images.dtype == np.uint8
  assert train.labels.shape == (13,) and train.labels.dtype == np.int32
  assert train.labels.min() >= 0 and train.labels.max() < spec.num_classes
  assert train.num_classes == spec.num_classes and train.name == name
  assert set(train.noisy_label_sets) == set(spec.noisy_label_keys)
  for labels in train.noisy_label_sets.values():
    assert labels.shape == (13,) and labels.dtype == np.int32
  assert len(test) == 5 and dict(test.noisy_label_sets) == {}  # no human labels on test


def test_cifar_n_label_sets_are_the_documented_keys():
  assert data.DATASETS["cifar10_n"].noisy_label_keys == (
      "worse_label", "aggre_label", "random_label1", "random_label2", "random_label3",
  )  # fmt: skip
  assert data.DATASETS["cifar100_n"].noisy_label_keys == ("noise_label",)


# ---------------------------------------------------------------------------
# TFDS, a real array_record copy prepared here


try:
  from PIL import Image as PIL_Image
except ImportError:  # pragma: no cover - Pillow is a train extra
  PIL_Image = None


def _encode_png(self, image):
  del self
  buffer = io.BytesIO()
  PIL_Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG")
  return buffer.getvalue()


def _prepare_fake_mnist(data_dir, images, labels):
  """Writes an array_record ``mnist`` at data_dir, as `tfds build` would.

  TFDS encodes images with TensorFlow, absent here, so PNG encoding goes
  through Pillow; everything else (files, dataset_info.json) is TFDS's own.
  """
  from tensorflow_datasets.core.features import image_feature

  class Mnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "mnist"
    VERSION = tfds.core.Version("3.0.1")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(), "test": self._generate_examples()}

    def _generate_examples(self):
      for i, (image, label) in enumerate(zip(images, labels)):
        yield i, {"image": image, "label": int(label)}

  with mock.patch.object(image_feature._ImageEncoder, "_encode_image", _encode_png):
    Mnist(data_dir=os.fspath(data_dir), file_format="array_record").download_and_prepare()


@pytest.mark.skipif(PIL_Image is None, reason="needs Pillow")
def test_real_array_record_copy_round_trips(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(40, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, size=40)
  _prepare_fake_mnist(tmp_path, images, labels)
  with mock.patch.object(data, "_TFDS_CHUNK", 16):  # several chunks
    got = data.load_dataset("mnist", "train", data_dir=tmp_path)
  # TFDS shuffles examples when it writes them: compare as sets of pairs.
  assert len(got) == 40
  want = sorted((label, image.tobytes()) for image, label in zip(images, labels))
  have = sorted((int(label), image.tobytes()) for image, label in zip(got.images, got.labels))
  assert have == want
  assert len(data.load_dataset("mnist", "test", data_dir=tmp_path, max_examples=7)) == 7


# ---------------------------------------------------------------------------
# TFDS, missing


@pytest.mark.parametrize("name", ["cifar10", "svhn_cropped", "cifar100_n"])
def test_missing_tfds_dataset_fails_fast_with_how_to(name, tmp_path):
  start = time.monotonic()
  with pytest.raises(data.DatasetNotFoundError) as info:
    data.load_dataset(name, "train", data_dir=tmp_path)
  assert time.monotonic() - start < FAIL_FAST_S
  message = str(info.value)
  assert f"{name} is not prepared at {tmp_path}" in message
  assert f"tfds build {name} --file_format=array_record" in message
  if name.endswith("_n"):
    assert "github.com/UCSC-REAL/cifar-10-100n" in message
    assert "downloads/manual" in message
  assert isinstance(info.value, FileNotFoundError)


def test_missing_everywhere_reports_both_sources(tmp_path, caplog):
  with caplog.at_level(logging.INFO), pytest.raises(data.DatasetNotFoundError) as info:
    data.load_dataset("mnist", "train", data_dir=tmp_path)
  message = str(info.value)
  assert "neither source" in message
  assert "tfds build mnist" in message
  assert "train-images-idx3-ubyte" in message
  # TFDS's own text claims a tfrecord copy is "already prepared" where none is,
  # and it warns about each version folder it probes, none of which exists.
  assert "already prepared" not in message
  assert not [r for r in caplog.records if "Variant folder" in r.getMessage()]


def test_source_tfds_does_not_fall_back_to_idx(tmp_path):
  write_idx_split(tmp_path, "train", *tiny_split())
  with pytest.raises(data.DatasetNotFoundError, match="not prepared"):
    data.load_dataset("fashion_mnist", "train", data_dir=tmp_path, source="tfds")


# ---------------------------------------------------------------------------
# argument checks


def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError, match="unknown dataset 'cifar11'.*cifar10, cifar100, cifar100_n"):
    data.load_dataset("cifar11", "train")


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"split": "validation"}, "split"),
    ({"source": "web"}, "source"),
    ({"max_examples": 0}, "max_examples"),
    ({"name": "cifar10", "source": "idx"}, "no IDX source"),
  ],
)
def test_bad_arguments_raise(kwargs, match):
  args = {"name": "mnist", "split": "train", **kwargs}
  with pytest.raises(ValueError, match=match):
    data.load_dataset(args.pop("name"), args.pop("split"), **args)


def test_registry_facts():
  for name, spec in data.DATASETS.items():
    assert spec.name == name
    assert len(spec.class_names) == spec.num_classes
    assert len(spec.mean) == len(spec.std) == spec.image_shape[-1]
  flips = {name: spec.flip for name, spec in data.DATASETS.items()}
  assert flips == {
      "cifar10": True, "cifar100": True, "cifar10_n": True, "cifar100_n": True,
      "fashion_mnist": True, "mnist": False, "svhn_cropped": False,
      # Photographs read from folders (saner_jax.train.folders).
      "animal10n": True, "clothing1m": True, "image_folder": True, "mini_webvision": True, "tiny_imagenet": True,
  }  # fmt: skip
  assert [n for n, s in data.DATASETS.items() if s.manual_download] == ["cifar10_n", "cifar100_n"]
  assert sorted(n for n, s in data.DATASETS.items() if s.has_idx) == ["fashion_mnist", "mnist"]


# ---------------------------------------------------------------------------
# IDX files


def idx_bytes(array, dtype_code=0x08):
  header = bytes([0, 0, dtype_code, array.ndim])
  header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def tiny_split(n=12, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, size=(n, 5, 4), dtype=np.uint8), rng.integers(0, 10, size=n)


def write_idx_split(directory, split, images, labels, gz=True):
  prefix = {"train": "train", "test": "t10k"}[split]
  paths = []
  for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
    path = os.path.join(directory, f"{prefix}-{kind}-ubyte" + (".gz" if gz else ""))
    payload = idx_bytes(array)
    with gzip.open(path, "wb") if gz else open(path, "wb") as f:
      f.write(payload)
    paths.append(path)
  return paths


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_round_trip(tmp_path, split, gz):
  images, labels = tiny_split()
  write_idx_split(tmp_path, split, images, labels, gz=gz)
  ds = data.load_idx(tmp_path, split, name="tiny")
  np.testing.assert_array_equal(ds.images, images[..., None])
  np.testing.assert_array_equal(ds.labels, labels)
  assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32 and ds.name == "tiny"
  assert ds.images.flags.writeable and ds.images.flags.owndata
  assert len(data.load_idx(tmp_path, split, max_examples=5)) == 5


def test_idx_prefers_the_uncompressed_file(tmp_path):
  images, labels = tiny_split(seed=0)
  write_idx_split(tmp_path, "train", images, labels, gz=False)
  write_idx_split(tmp_path, "train", *tiny_split(seed=1), gz=True)
  np.testing.assert_array_equal(data.load_idx(tmp_path, "train").labels, labels)


def test_idx_source_for_named_datasets(tmp_path, monkeypatch):
  images, labels = tiny_split()
  write_idx_split(tmp_path, "test", images, labels)
  # data_dir names the IDX folder.
  ds = data.load_dataset("mnist", "test", data_dir=tmp_path, source="idx")
  assert ds.name == "mnist" and ds.num_classes == 10 and ds.images.shape == (12, 5, 4, 1)
  # Without data_dir, the dataset's environment variable does.
  monkeypatch.setenv("SANER_JAX_FASHION_MNIST_DIR", str(tmp_path))
  ds = data.load_dataset("fashion_mnist", "test", source="idx")
  np.testing.assert_array_equal(ds.labels, labels)
  monkeypatch.delenv("SANER_JAX_MNIST_DIR", raising=False)
  with pytest.raises(data.DatasetNotFoundError, match="SANER_JAX_MNIST_DIR"):
    data.load_dataset("mnist", "test", source="idx")


def test_auto_falls_back_to_idx_when_tfds_has_no_copy(tmp_path):
  images, labels = tiny_split()
  write_idx_split(tmp_path, "train", images, labels)
  start = time.monotonic()
  ds = data.load_dataset("fashion_mnist", "train", data_dir=tmp_path)
  assert time.monotonic() - start < FAIL_FAST_S
  np.testing.assert_array_equal(ds.labels, labels)


def test_probing_tfds_leaves_no_temp_dirs(tmp_path, monkeypatch):
  # TFDS makes a temp dir per probe of an unprepared dataset and never removes
  # it: before the fix, four empty /tmp/tmp*tfds dirs per training run.
  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  images, labels = tiny_split()
  write_idx_split(tmp_path, "train", images, labels)
  data.load_dataset("fashion_mnist", "train", data_dir=tmp_path)
  with pytest.raises(data.DatasetNotFoundError):
    data.load_dataset("fashion_mnist", "test", data_dir=tmp_path)
  assert list(temp.iterdir()) == []
  assert tempfile.tempdir == str(temp)


def corrupt(tmp_path, images_bytes=None, labels_bytes=None, gz=False):
  images, labels = tiny_split()
  images_path, labels_path = write_idx_split(tmp_path, "train", images, labels, gz=gz)
  for path, payload in ((images_path, images_bytes), (labels_path, labels_bytes)):
    if payload is not None:
      with open(path, "wb") as f:
        f.write(payload)


GOOD_IMAGES = idx_bytes(tiny_split()[0])
GOOD_LABELS = idx_bytes(tiny_split()[1])


@pytest.mark.parametrize(
    "images_bytes,labels_bytes,match",
    [
        (b"\x00\x01" + GOOD_IMAGES[2:], None, "bad magic number"),
        (GOOD_IMAGES[:2] + b"\x08\x02" + GOOD_IMAGES[4:], None, "bad magic number"),
        (GOOD_IMAGES[:2] + b"\x0d" + GOOD_IMAGES[3:], None, "dtype code 0x0d"),
        (GOOD_IMAGES[:-7], None, "truncated or trailing"),
        (GOOD_IMAGES + b"\x00", None, "truncated or trailing"),
        (GOOD_IMAGES[:10], None, "truncated header"),
        (b"\x00\x00", None, "too short"),
        (None, idx_bytes(tiny_split()[1][:-1]), "12 images but .* 11 labels"),
        (None, idx_bytes(np.full(12, 10)), r"label 10 is not in \[0, 10\)"),
    ],
    ids=[
        "magic", "ndim", "dtype", "truncated", "trailing", "short-header", "tiny",
        "count-mismatch", "label-range",
    ],
)  # fmt: skip
def test_corrupt_idx_raises_clearly(tmp_path, images_bytes, labels_bytes, match):
  corrupt(tmp_path, images_bytes, labels_bytes)
  with pytest.raises(data.IdxFormatError, match=match):
    data.load_idx(tmp_path, "train")


def _gzip(payload):
  return gzip.compress(payload, mtime=0)


@pytest.mark.parametrize(
  "mangle",
  [
    # The last 8 bytes are CRC32 and length: break the CRC.
    lambda z: z[:-8] + bytes([z[-8] ^ 0xFF]) + z[-7:],
    lambda z: z[: len(z) // 2],  # truncated stream
    lambda z: b"PK" + z[2:],  # not gzip at all
    lambda z: z[:12] + bytes(b ^ 0x5A for b in z[12:30]) + z[30:],  # corrupt deflate data
  ],
  ids=["crc", "truncated", "magic", "deflate"],
)
def test_corrupt_gzip_raises_clearly(tmp_path, mangle):
  corrupt(tmp_path, images_bytes=mangle(_gzip(GOOD_IMAGES)), gz=True)
  expected = r"train-images-idx3-ubyte\.gz: corrupt or truncated gzip"
  with pytest.raises(data.IdxFormatError, match=expected):
    data.load_idx(tmp_path, "train")


def test_missing_idx_file_names_it(tmp_path):
  images, labels = tiny_split()
  _, labels_path = write_idx_split(tmp_path, "train", images, labels)
  os.remove(labels_path)
  with pytest.raises(data.DatasetNotFoundError, match="train-labels-idx1-ubyte"):
    data.load_idx(tmp_path, "train")


@pytest.mark.skipif(
  not os.path.isfile(os.path.join(DEBIAN, "train-images-idx3-ubyte.gz")),
  reason="Debian's dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist(monkeypatch):
  train = data.load_dataset("fashion_mnist", "train", data_dir=DEBIAN, source="idx")
  test = data.load_dataset("fashion_mnist", "test", data_dir=DEBIAN, source="idx")
  assert train.images.shape == (60_000, 28, 28, 1) and test.images.shape == (10_000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
  # Without data_dir or the variable, the IDX source falls back to this folder.
  monkeypatch.delenv(data.DATASETS["fashion_mnist"].idx_env_var, raising=False)
  default = data.load_dataset("fashion_mnist", "test", source="idx", max_examples=10)
  np.testing.assert_array_equal(default.images, test.images[:10])
  # The registry's normalisation constants are this training set's
  # (computed from the pixel histogram to spare a float copy of 47M pixels).
  frequency = np.bincount(train.images.ravel(), minlength=256) / train.images.size
  levels = np.arange(256) / 255.0
  mean = frequency @ levels
  std = np.sqrt(frequency @ (levels - mean) ** 2)
  spec = data.DATASETS["fashion_mnist"]
  assert mean == pytest.approx(spec.mean[0], abs=1e-4)
  assert std == pytest.approx(spec.std[0], abs=1e-4)


# ---------------------------------------------------------------------------
# ArrayDataset and the held-out split


def make_dataset(n=100, num_classes=4, **noisy):
  return data.ArrayDataset(
    images=np.zeros((n, 2, 2, 1), np.uint8),
    labels=(np.arange(n) % num_classes).astype(np.int32),
    num_classes=num_classes,
    name="toy",
    noisy_label_sets=noisy,
  )


@pytest.mark.parametrize(
  "change,error,match",
  [
    ({"images": np.zeros((4, 2, 2, 1), np.float32)}, TypeError, "uint8"),
    ({"images": np.zeros((4, 2, 2), np.uint8)}, ValueError, r"\[N, H, W, C\]"),
    ({"images": np.zeros((4, 2, 2, 2), np.uint8)}, ValueError, "C = 1 or 3"),
    ({"labels": np.zeros(4, np.int64)}, TypeError, "int32"),
    ({"labels": np.zeros(3, np.int32)}, ValueError, r"shape \(4,\)"),
    ({"labels": np.full(4, 4, np.int32)}, ValueError, r"\[0, 4\)"),
    ({"num_classes": 0}, ValueError, "num_classes"),
    ({"noisy_label_sets": {"worse_label": np.zeros(5, np.int32)}}, ValueError, "worse_label"),
  ],
)
def test_array_dataset_validates(change, error, match):
  fields = dict(
    images=np.zeros((4, 2, 2, 1), np.uint8),
    labels=np.zeros(4, np.int32),
    num_classes=4,
    name="toy",
  )
  fields.update(change)
  with pytest.raises(error, match=match):
    data.ArrayDataset(**fields)


def test_array_dataset_label_sets_are_read_only():
  ds = make_dataset(worse_label=np.zeros(100, np.int32))
  with pytest.raises(TypeError):
    ds.noisy_label_sets["other"] = np.zeros(100, np.int32)


def test_holdout_split_is_deterministic_stratified_and_exact():
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [400, 300, 200, 101]))
  train_idx, val_idx = data.holdout_indices(labels, 0.1, seed=3)
  assert val_idx.size == round(0.1 * 1001)
  assert np.intersect1d(train_idx, val_idx).size == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(1001))
  # Quotas 40, 30, 20, 10.1 sum to 100.1 -> 100: floors, no remainder added.
  np.testing.assert_array_equal(np.bincount(labels[val_idx]), [40, 30, 20, 10])
  again = data.holdout_indices(labels, 0.1, seed=3)
  other = data.holdout_indices(labels, 0.1, seed=4)
  np.testing.assert_array_equal(again[1], val_idx)
  assert not np.array_equal(other[1], val_idx)


def test_holdout_remainders_go_to_the_largest_fractions():
  labels = np.repeat(np.arange(3), [5, 5, 7])  # quotas at 0.5: 2.5, 2.5, 3.5
  _, val_idx = data.holdout_indices(labels, 0.5, seed=0)  # round(8.5) = 8
  np.testing.assert_array_equal(np.bincount(labels[val_idx]), [3, 2, 3])


def test_holdout_split_subsets_every_array():
  ds = make_dataset(worse_label=(np.arange(100) % 3).astype(np.int32))
  train, val = data.holdout_split(ds, 0.2, seed=0, stratify=False)
  assert len(train) == 80 and len(val) == 20
  _, val_idx = data.holdout_indices(ds.labels, 0.2, seed=0, stratify=False)
  np.testing.assert_array_equal(val.labels, ds.labels[val_idx])
  np.testing.assert_array_equal(val.noisy_label_sets["worse_label"], val_idx % 3)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.001, -0.5])
def test_holdout_rejects_degenerate_fractions(fraction):
  with pytest.raises(ValueError, match="fraction"):
    data.holdout_indices(np.zeros(100, int), fraction, seed=0)
