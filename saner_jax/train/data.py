"""Image classification datasets as host numpy arrays.

Two sources feed the same :class:`ArrayDataset`:

* TFDS, read through ``tfds.data_source`` (array_record files, random
  access, no TensorFlow) with ``download=False``: a dataset that is not
  prepared fails at once with instructions instead of retrying downloads.
* MNIST-format IDX files (optionally gzipped), read directly. Fashion-MNIST
  defaults to Debian's ``dataset-fashion-mnist`` package, whose ``.gz`` files
  differ byte-wise from upstream, so TFDS's checksums reject them.

``load_dataset(name, split, source="auto")`` tries TFDS first and falls back
to IDX files for the datasets that have them. See docs/data_and_noise.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import os
import tempfile
import types
import zlib
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from saner_jax.train import registry

_log = logging.getLogger(__name__)

Split = Literal["train", "test"]
Source = Literal["auto", "tfds", "idx"]
SPLITS: tuple[str, ...] = ("train", "test")
SOURCES: tuple[str, ...] = ("auto", "tfds", "idx")

# Where Debian's dataset-fashion-mnist package puts the IDX files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# Decoded examples are read from TFDS in chunks of this many, so a 50k-image
# split never holds all its Python dicts (one per example) at once.
_TFDS_CHUNK = 8192


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not available offline; the message says how to get it."""


class IdxFormatError(ValueError):
  """An IDX file is corrupt, truncated or inconsistent with its partner."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """The facts the toolkit needs about one named dataset.

  Attributes:
    name: the name ``load_dataset`` takes.
    tfds_name: the TFDS builder name.
    num_classes: number of classes of ``label``.
    image_shape: ``(height, width, channels)``.
    flip: whether a horizontal flip preserves the class (not for digits).
    crop_padding: zero padding of the standard random-crop augmentation.
    mean: per-channel mean of the training images scaled to [0, 1].
    std: per-channel standard deviation, same scale.
    class_names: the class of each label index.
    sizes: examples in the published train and test splits, so that a
      config can be checked before anything loads.
    noisy_label_keys: TFDS features holding human noisy labels (CIFAR-N).
    manual_download: how to fetch the files TFDS cannot download itself.
    idx_env_var: environment variable naming a directory of IDX files.
    default_idx_dir: IDX directory used when neither ``data_dir`` nor
      ``idx_env_var`` names one.
    layout: for datasets read from image files in their published folder
      layout (:mod:`saner_jax.train.folders`), the layout's name; None for
      TFDS and IDX datasets. ``image_shape`` is then the size the images are
      resized to (``--image_size`` changes it).
    real_noise: the given training labels are themselves noisy and no clean
      labels say which (Animal-10N, Mini-WebVision, Clothing1M): there is no
      noise mask.
    random_resized_crop: ImageNet-style augmentation (a random-resized crop
      and a flip, made on the host by the streaming pipeline) instead of the
      padded random crop.
    eval_split: for folder datasets, which labelled split is the test set
      (``folders.EVAL_SPLITS``); empty: the layout's default.
  """

  name: str
  tfds_name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  flip: bool
  crop_padding: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  class_names: tuple[str, ...]
  sizes: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"train": 50_000, "test": 10_000})
  noisy_label_keys: tuple[str, ...] = ()
  manual_download: str | None = None
  idx_env_var: str | None = None
  default_idx_dir: str | None = None
  layout: str | None = None
  real_noise: bool = False
  random_resized_crop: bool = False
  eval_split: str = ""

  @property
  def has_idx(self) -> bool:
    """Whether the dataset can be read from MNIST-format IDX files."""
    return self.idx_env_var is not None


_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# CIFAR-100 fine labels in label-index order (alphabetical, as in the
# dataset's fine_label_names); noise.py groups them into super-classes.
_CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
    "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel",
    "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse",
    "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea",
    "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip",
    "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

_FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_DIGITS = tuple(str(d) for d in range(10))

# Channel statistics of each training split, pixels scaled to [0, 1].
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))

# ImageNet's channel statistics: the usual normalisation of photographs
# (Mini-WebVision, Clothing1M, Tiny-ImageNet, Animal-10N and one's own folders).
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_CIFAR_N_MANUAL = """\
CIFAR-N needs a manual download. On a machine with network access:
  1. From https://github.com/UCSC-REAL/cifar-10-100n download
     {side_info}, {human_npy} and {order_npy}.
  2. Convert {human_npy} to {human_csv} (a dict of arrays saved with
     np.save; pandas.DataFrame(np.load(path, allow_pickle=True)[()])
     .to_csv(csv_path, index=False)); the exact snippet is in
     tfds.builder("{tfds_name}").MANUAL_DOWNLOAD_INSTRUCTIONS.
  3. Put {side_info}, {human_csv} and {order_npy} in
     DATA_DIR/downloads/manual/ and run (TFDS preparation needs TensorFlow):
       pip install tensorflow-datasets tensorflow-cpu
       tfds build {tfds_name} --file_format=array_record --data_dir=DATA_DIR
  4. Copy DATA_DIR/{tfds_name} to this machine's TFDS data directory, or pass
     data_dir=DATA_DIR."""


def _cifar_n_manual(tfds_name: str, size: int, short: str) -> str:
  return _CIFAR_N_MANUAL.format(
    tfds_name=tfds_name,
    side_info=f"side_info_cifar{size}N.csv",
    human_npy=f"CIFAR-{size}_human_ordered.npy",
    human_csv=f"CIFAR-{size}_human_annotations.csv",
    order_npy=f"image_order_{short}.npy",
  )


# The built-in datasets; one's own is one registry.register_dataset(DatasetSpec(...)) call.
_BUILT_IN = (
        DatasetSpec(
            name="cifar10", tfds_name="cifar10", num_classes=10,
            image_shape=(32, 32, 3), flip=True, crop_padding=4,
            mean=_CIFAR10_STATS[0], std=_CIFAR10_STATS[1],
            class_names=_CIFAR10_CLASSES,
        ),
        DatasetSpec(
            name="cifar100", tfds_name="cifar100", num_classes=100,
            image_shape=(32, 32, 3), flip=True, crop_padding=4,
            mean=_CIFAR100_STATS[0], std=_CIFAR100_STATS[1],
            class_names=_CIFAR100_CLASSES,
        ),
        DatasetSpec(
            name="fashion_mnist", tfds_name="fashion_mnist", num_classes=10,
            image_shape=(28, 28, 1), flip=True, crop_padding=2,
            mean=(0.2860,), std=(0.3530,),
            class_names=_FASHION_MNIST_CLASSES, sizes={"train": 60_000, "test": 10_000},
            idx_env_var="SANER_JAX_FASHION_MNIST_DIR",
            default_idx_dir=DEBIAN_FASHION_MNIST_DIR,
        ),
        DatasetSpec(
            name="mnist", tfds_name="mnist", num_classes=10,
            image_shape=(28, 28, 1), flip=False, crop_padding=2,
            mean=(0.1307,), std=(0.3081,),
            class_names=_DIGITS, sizes={"train": 60_000, "test": 10_000},
            idx_env_var="SANER_JAX_MNIST_DIR",
        ),
        DatasetSpec(
            name="svhn_cropped", tfds_name="svhn_cropped", num_classes=10,
            image_shape=(32, 32, 3), flip=False, crop_padding=4,
            mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
            class_names=_DIGITS, sizes={"train": 73_257, "test": 26_032},
        ),
        DatasetSpec(
            name="cifar10_n", tfds_name="cifar10_n", num_classes=10,
            image_shape=(32, 32, 3), flip=True, crop_padding=4,
            mean=_CIFAR10_STATS[0], std=_CIFAR10_STATS[1],
            class_names=_CIFAR10_CLASSES,
            noisy_label_keys=(
                "worse_label", "aggre_label",
                "random_label1", "random_label2", "random_label3",
            ),
            manual_download=_cifar_n_manual("cifar10_n", 10, "c10"),
        ),
        DatasetSpec(
            name="cifar100_n", tfds_name="cifar100_n", num_classes=100,
            image_shape=(32, 32, 3), flip=True, crop_padding=4,
            mean=_CIFAR100_STATS[0], std=_CIFAR100_STATS[1],
            class_names=_CIFAR100_CLASSES,
            noisy_label_keys=("noise_label",),
            manual_download=_cifar_n_manual("cifar100_n", 100, "c100"),
        ),
        # Image files in their published layouts (saner_jax.train.folders):
        # sizes are the published splits', the classes of image_folder are
        # its train/ subfolders (read when the config is validated).
        DatasetSpec(
            name="image_folder", tfds_name="", num_classes=0,
            image_shape=(224, 224, 3), flip=True, crop_padding=28,
            mean=_IMAGENET_STATS[0], std=_IMAGENET_STATS[1], class_names=(),
            layout="image_folder", random_resized_crop=True,
        ),
        DatasetSpec(
            name="animal10n", tfds_name="", num_classes=10,
            image_shape=(64, 64, 3), flip=True, crop_padding=8,
            mean=_IMAGENET_STATS[0], std=_IMAGENET_STATS[1],
            class_names=(
                "cat", "lynx", "wolf", "coyote", "cheetah",
                "jaguar", "chimpanzee", "orangutan", "hamster", "guinea_pig",
            ),
            sizes={"train": 50_000, "test": 5_000}, layout="animal10n", real_noise=True,
        ),
        DatasetSpec(
            name="mini_webvision", tfds_name="", num_classes=50,
            image_shape=(224, 224, 3), flip=True, crop_padding=28,
            mean=_IMAGENET_STATS[0], std=_IMAGENET_STATS[1],
            class_names=tuple(f"class{c:02d}" for c in range(50)),
            sizes={"train": 65_944, "test": 2_500}, layout="mini_webvision",
            real_noise=True, random_resized_crop=True,
        ),
        DatasetSpec(
            name="clothing1m", tfds_name="", num_classes=14,
            image_shape=(224, 224, 3), flip=True, crop_padding=28,
            mean=_IMAGENET_STATS[0], std=_IMAGENET_STATS[1],
            class_names=(
                "T-shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker",
                "Jacket", "Down Coat", "Suit", "Shawl", "Dress", "Vest", "Underwear",
            ),
            sizes={"train": 1_000_000, "test": 10_526}, layout="clothing1m",
            real_noise=True, random_resized_crop=True,
        ),
        DatasetSpec(
            name="tiny_imagenet", tfds_name="", num_classes=200,
            image_shape=(64, 64, 3), flip=True, crop_padding=8,
            mean=_IMAGENET_STATS[0], std=_IMAGENET_STATS[1],
            class_names=tuple(f"class{c:03d}" for c in range(200)),
            sizes={"train": 100_000, "test": 10_000}, layout="tiny_imagenet",
        ),
)  # fmt: skip
for _spec in _BUILT_IN:
  registry.register_dataset(_spec)

DATASETS: Mapping[str, DatasetSpec] = registry.View("dataset")
"""Dataset name -> :class:`DatasetSpec`: a live view of :func:`saner_jax.train.registry.datasets`."""


def get_spec(name: str) -> DatasetSpec:
  """Returns ``DATASETS[name]``; ValueError listing the known names otherwise."""
  try:
    return DATASETS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}") from None


def _describe(value: object) -> str:
  return str(value.dtype) if isinstance(value, np.ndarray) else type(value).__name__


def _check_labels(what: str, labels: object, n: int, num_classes: int) -> None:
  if not isinstance(labels, np.ndarray) or labels.dtype != np.int32:
    raise TypeError(f"{what} must be an int32 numpy array (use .astype(np.int32)), got {_describe(labels)}")
  if labels.shape != (n,):
    raise ValueError(f"{what} must have shape ({n},) to match images, got {labels.shape}")
  if n and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{what} must lie in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]")


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """One split of an image classification dataset, in host memory.

  Attributes:
    images: uint8 ``[N, H, W, C]``; C is 1 for grayscale, 3 for colour.
    labels: int32 ``[N]``, the dataset's own (clean, for synthetic noise)
      labels, in ``[0, num_classes)``.
    num_classes: number of classes.
    name: the dataset's name, a key of ``DATASETS`` when it has one.
    noisy_label_sets: read-only mapping from a human-label key (CIFAR-N's
      ``worse_label``, ``aggre_label``, ``random_label1..3``,
      ``noise_label``) to int32 ``[N]`` labels; empty for other datasets and
      for CIFAR-N's test split, which has no human labels.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str
  noisy_label_sets: Mapping[str, np.ndarray] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))

  def __post_init__(self):
    if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8:
      raise TypeError(f"images must be a uint8 numpy array, got {_describe(self.images)}")
    if self.images.ndim != 4 or self.images.shape[-1] not in (1, 3):
      raise ValueError(f"images must have shape [N, H, W, C] with C = 1 or 3, got {self.images.shape}")
    if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)):
      raise TypeError(f"num_classes must be an int, got {self.num_classes!r}")
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
    n = self.images.shape[0]
    _check_labels("labels", self.labels, n, self.num_classes)
    for key, noisy in self.noisy_label_sets.items():
      _check_labels(f"noisy_label_sets[{key!r}]", noisy, n, self.num_classes)
    # Frozen, so the mapping must not be mutable behind the dataclass's back.
    object.__setattr__(self, "noisy_label_sets", types.MappingProxyType(dict(self.noisy_label_sets)))

  def __len__(self) -> int:
    return self.images.shape[0]

  def subset(self, indices: np.ndarray | Sequence[int]) -> ArrayDataset:
    """The examples at ``indices`` (integer indices), noisy label sets included."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
      raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    return ArrayDataset(
      images=self.images[idx],
      labels=self.labels[idx],
      num_classes=self.num_classes,
      name=self.name,
      noisy_label_sets={k: v[idx] for k, v in self.noisy_label_sets.items()},
    )


# ---------------------------------------------------------------------------
# IDX files


_IDX_UBYTE = 0x08
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _idx_paths(directory: str | os.PathLike, split: str) -> tuple[str, str]:
  """The images and labels files of ``split``, raw preferred over ``.gz``."""
  found = []
  for kind, ndim in (("images", 3), ("labels", 1)):
    stem = os.path.join(os.fspath(directory), f"{_IDX_PREFIX[split]}-{kind}-idx{ndim}-ubyte")
    candidates = (stem, stem + ".gz")
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
      raise DatasetNotFoundError(f"IDX file missing: neither {candidates[0]} nor {candidates[1]} exists")
    found.append(path)
  return found[0], found[1]


def _read_bytes(path: str) -> bytes:
  if not path.endswith(".gz"):
    with open(path, "rb") as f:
      return f.read()
  try:
    with gzip.open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:
    # BadGzipFile (an OSError) covers bad magic and CRC or length mismatches;
    # EOFError a truncated stream; zlib.error a corrupt deflate block.
    raise IdxFormatError(f"{path}: corrupt or truncated gzip file ({e})") from e


def _parse_idx(path: str, expected_ndim: int) -> np.ndarray:
  """Parses one IDX file of unsigned bytes into an array of its dimensions."""
  raw = _read_bytes(path)
  if len(raw) < 4:
    raise IdxFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header")
  zero, dtype_code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
  if zero != 0 or ndim != expected_ndim:
    raise IdxFormatError(
      f"{path}: bad magic number 0x{raw[:4].hex()}; expected 0x0000{_IDX_UBYTE:02x}"
      f"{expected_ndim:02x} (unsigned bytes, {expected_ndim} dimensions)"
    )
  if dtype_code != _IDX_UBYTE:
    raise IdxFormatError(f"{path}: dtype code 0x{dtype_code:02x}, expected 0x{_IDX_UBYTE:02x} (unsigned byte)")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise IdxFormatError(f"{path}: truncated header ({len(raw)} of {header} bytes)")
  dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  payload = len(raw) - header
  if payload != int(np.prod(dims)):
    raise IdxFormatError(
      f"{path}: header declares dimensions {dims} ({int(np.prod(dims))} bytes) but "
      f"the payload has {payload} bytes (truncated or trailing data)"
    )
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def load_idx(
  directory: str | os.PathLike,
  split: Split,
  *,
  name: str = "idx",
  num_classes: int = 10,
  max_examples: int | None = None,
) -> ArrayDataset:
  """Reads an MNIST-format IDX split (MNIST, Fashion-MNIST, ...) from a directory.

  The directory holds ``train-images-idx3-ubyte`` and
  ``train-labels-idx1-ubyte`` (``t10k-...`` for the test split), each
  optionally gzipped (``.gz``); an uncompressed file wins when both exist.

  Args:
    directory: the folder with the IDX files.
    split: ``"train"`` or ``"test"``.
    name: the ``ArrayDataset.name`` to give the result.
    num_classes: labels must lie in ``[0, num_classes)``.
    max_examples: keep only the first this many examples.

  Returns:
    An ``ArrayDataset`` with images ``[N, H, W, 1]``.

  Raises:
    DatasetNotFoundError: a file is missing.
    IdxFormatError: a file is corrupt or truncated (gzip errors, bad magic
      number, dtype other than unsigned byte, header and payload sizes that
      disagree), or images and labels counts differ.
  """
  _check_split(split)
  _check_max_examples(max_examples)
  images_path, labels_path = _idx_paths(directory, split)
  images = _parse_idx(images_path, 3)
  labels = _parse_idx(labels_path, 1)
  if images.shape[0] != labels.shape[0]:
    raise IdxFormatError(f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels")
  if labels.size and labels.max() >= num_classes:
    raise IdxFormatError(f"{labels_path}: label {labels.max()} is not in [0, {num_classes})")
  if max_examples is not None:
    images, labels = images[:max_examples], labels[:max_examples]
  # np.frombuffer views are read-only; copy into ordinary owned arrays.
  return ArrayDataset(
    images=images[..., None].copy(),
    labels=labels.astype(np.int32),
    num_classes=num_classes,
    name=name,
  )


# ---------------------------------------------------------------------------
# TFDS


def _tfds_how_to(spec: DatasetSpec) -> str:
  if spec.manual_download:
    return spec.manual_download
  return (
    "To get it, on a machine with network access (TFDS preparation needs TensorFlow):\n"
    "  pip install tensorflow-datasets tensorflow-cpu\n"
    f"  tfds build {spec.tfds_name} --file_format=array_record --data_dir=DATA_DIR\n"
    f"then copy DATA_DIR/{spec.tfds_name} here, into the TFDS data directory "
    "(~/tensorflow_datasets or $TFDS_DATA_DIR) or a folder passed as data_dir.\n"
    "array_record is required: tfds.data_source cannot read the default tfrecord "
    "format without TensorFlow."
  )


class _WithoutVariantFolderWarnings(logging.Filter):
  """Drops TFDS's "Variant folder X has no dataset_info.json" warnings.

  TFDS logs one for each version folder it probes, existing or not, up to a
  dozen for one missing dataset; the error raised then says what is missing.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Variant folder")


@contextlib.contextmanager
def _tfds_probe():
  """Quiets TFDS's probing and removes the temp dirs it leaves.

  For a dataset not prepared in ``data_dir``, TFDS 4.9's builder makes a temp
  dir for metadata it would fetch (``DatasetInfo.initialize_from_bucket``) and
  never removes it: four empty ``/tmp/tmp*tfds`` dirs per run that reads IDX
  files. ``tempfile.tempdir`` points at one scratch dir while TFDS probes;
  it is process-wide, so a temp file another thread makes meanwhile lands
  there too (the loaders read their splits one after the other).
  """
  absl_logger = logging.getLogger("absl")
  quiet = _WithoutVariantFolderWarnings()
  absl_logger.addFilter(quiet)
  previous = tempfile.tempdir
  try:
    with tempfile.TemporaryDirectory(prefix="saner_jax_tfds_", ignore_cleanup_errors=True) as scratch:
      tempfile.tempdir = scratch
      try:
        yield
      finally:
        tempfile.tempdir = previous
  finally:
    absl_logger.removeFilter(quiet)


def _tfds_unavailable(spec: DatasetSpec, data_dir: str | None) -> DatasetNotFoundError | None:
  """Explains why TFDS could not open the dataset, or None if it is not missing.

  TFDS reports an unprepared dataset in several ways (an empty split dict,
  "tfrecord format is not supported", which also claims a prepared copy that
  is not there, ...), so the builder is asked directly and TFDS's own message
  is left to the exception chain.
  """
  import tensorflow_datasets as tfds

  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  file_format = builder.info.file_format
  if builder.is_prepared():
    if file_format in tfds.core.FileFormat.with_random_access():
      return None
    problem = (
      f"TFDS dataset {spec.tfds_name} is prepared at {builder.data_dir} in the "
      f"{getattr(file_format, 'value', file_format)} format, which tfds.data_source "
      "cannot read; prepare it again with --file_format=array_record."
    )
  else:
    problem = f"TFDS dataset {spec.tfds_name} is not prepared at {builder.data_dir}; nothing is downloaded."
  hint = f"\nOr read IDX files with source='idx' (data_dir or ${spec.idx_env_var})." if spec.has_idx else ""
  return DatasetNotFoundError(f"{problem}\n{_tfds_how_to(spec)}{hint}")


def _stack_int32(values: list) -> np.ndarray:
  return np.asarray(values, dtype=np.int64).astype(np.int32)


def _load_tfds(spec: DatasetSpec, split: str, data_dir: str | None, max_examples: int | None) -> ArrayDataset:
  import tensorflow_datasets as tfds

  with _tfds_probe():
    try:
      source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
      missing = _tfds_unavailable(spec, data_dir)
      if missing is None:
        raise
      raise missing from e
  n = len(source) if max_examples is None else min(len(source), max_examples)
  # CIFAR-N's test split stores -1 for the human labels: it has none.
  label_keys = spec.noisy_label_keys if split == "train" else ()
  images = np.empty((n, *spec.image_shape), np.uint8)
  labels = np.empty(n, np.int32)
  noisy = {key: np.empty(n, np.int32) for key in label_keys}
  for start in range(0, n, _TFDS_CHUNK):
    stop = min(start + _TFDS_CHUNK, n)
    # __getitems__ reads a whole chunk of records in one call (TFDS's batched
    # path); decoding each PNG is then the cost, about 50 us an image.
    rows = source.__getitems__(list(range(start, stop)))
    chunk = np.stack([row["image"] for row in rows])
    if chunk.shape[1:] != spec.image_shape or chunk.dtype != np.uint8:
      raise ValueError(
        f"{spec.tfds_name}: expected uint8 images of shape {spec.image_shape}, got {chunk.dtype} {chunk.shape[1:]}"
      )
    images[start:stop] = chunk
    labels[start:stop] = _stack_int32([row["label"] for row in rows])
    for key in label_keys:
      noisy[key][start:stop] = _stack_int32([row[key] for row in rows])
  return ArrayDataset(
    images=images,
    labels=labels,
    num_classes=spec.num_classes,
    name=spec.name,
    noisy_label_sets=noisy,
  )


# ---------------------------------------------------------------------------
# Entry point


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_max_examples(max_examples: int | None) -> None:
  if max_examples is not None and (
    isinstance(max_examples, bool) or not isinstance(max_examples, (int, np.integer)) or max_examples < 1
  ):
    raise ValueError(f"max_examples must be None or an int >= 1, got {max_examples!r}")


def _idx_dir(spec: DatasetSpec, data_dir: str | None) -> str | None:
  """The IDX directory: data_dir, else the env variable, else the default."""
  if data_dir is not None:
    return data_dir
  from_env = os.environ.get(spec.idx_env_var) if spec.idx_env_var is not None else None
  return from_env or spec.default_idx_dir


def load_dataset(
  name: str | DatasetSpec,
  split: Split,
  *,
  data_dir: str | os.PathLike | None = None,
  source: Source = "auto",
  max_examples: int | None = None,
) -> ArrayDataset:
  """Loads one split of a named dataset into host numpy arrays.

  Sources:

  * ``"tfds"``: ``tfds.data_source`` with ``download=False``; ``data_dir`` is
    the TFDS data directory (None: ``$TFDS_DATA_DIR`` or
    ``~/tensorflow_datasets``). The dataset must be prepared in the
    array_record format.
  * ``"idx"``: MNIST-format IDX files, for ``mnist`` and ``fashion_mnist``
    only, from ``data_dir``, else ``$SANER_JAX_MNIST_DIR`` /
    ``$SANER_JAX_FASHION_MNIST_DIR``, else (Fashion-MNIST only) Debian's
    ``/usr/share/datasets/fashion-mnist``.
  * ``"auto"``: TFDS when it has a prepared copy; otherwise, for the datasets
    with IDX files, the IDX source with the same ``data_dir``.

  The two sources hold the same examples in different orders (TFDS shuffles
  when it prepares), so a seeded noise draw is source-specific.

  Args:
    name: a key of ``DATASETS``, or its :class:`DatasetSpec`.
    split: ``"train"`` or ``"test"``.
    data_dir: see the sources above.
    source: ``"auto"``, ``"tfds"`` or ``"idx"``.
    max_examples: read only the first this many examples (quick runs, tests).

  Returns:
    The split as an ``ArrayDataset``; for CIFAR-N's train split with the human
    labels in ``noisy_label_sets``.

  Raises:
    ValueError: an unknown name, split or source, or ``"idx"`` for a dataset
      without IDX files.
    DatasetNotFoundError: the data is not on this machine; the message says
      how to get it. Raised within seconds: nothing is downloaded.
    IdxFormatError: an IDX file is corrupt.
  """
  spec = name if isinstance(name, DatasetSpec) else get_spec(name)
  name = spec.name
  _check_split(split)
  if source not in SOURCES:
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
  _check_max_examples(max_examples)
  if spec.layout is not None:
    from saner_jax.train import folders

    return folders.load_arrays(spec, split, data_dir=data_dir, max_examples=max_examples)
  if source == "idx" and not spec.has_idx:
    raise ValueError(f"{name} has no IDX source; only {[s.name for s in DATASETS.values() if s.has_idx]} do")
  data_dir = None if data_dir is None else os.fspath(data_dir)

  def from_idx() -> ArrayDataset:
    directory = _idx_dir(spec, data_dir)
    if directory is None:
      raise DatasetNotFoundError(f"no IDX directory for {name}: pass data_dir or set ${spec.idx_env_var}")
    _log.info("reading %s/%s from IDX files in %s", name, split, directory)
    return load_idx(directory, split, name=name, num_classes=spec.num_classes, max_examples=max_examples)

  if source == "idx":
    return from_idx()
  try:
    dataset = _load_tfds(spec, split, data_dir, max_examples)
  except DatasetNotFoundError as tfds_error:
    if source == "tfds" or not spec.has_idx:
      raise
    try:
      return from_idx()
    except DatasetNotFoundError as idx_error:
      raise DatasetNotFoundError(
        f"{name}/{split} is available from neither source.\nTFDS: {tfds_error}\nIDX: {idx_error}"
      ) from idx_error
  _log.info("read %s/%s from TFDS (%d examples)", name, split, len(dataset))
  return dataset


# ---------------------------------------------------------------------------
# Held-out split


def holdout_indices(
  labels: np.ndarray, fraction: float, seed: int, *, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic (train, validation) index split of ``len(labels)`` examples.

  The validation part has exactly ``round(fraction * N)`` examples. With
  ``stratify``, each class contributes in proportion to its size: class
  ``c`` gets ``floor(fraction * n_c)`` plus one for the classes with the
  largest remainders (ties to the lower class index) until the total is
  reached. Both index arrays are sorted.

  Args:
    labels: integer labels ``[N]``; with noisy training labels, pass the
      noisy ones to stratify on what the model sees.
    fraction: share of the examples held out, in (0, 1).
    seed: seed of ``np.random.default_rng``.
    stratify: keep class proportions in both parts.

  Returns:
    ``(train_indices, val_indices)``, disjoint, covering ``range(N)``.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"fraction must be in (0, 1), got {fraction}")
  n = labels.shape[0]
  n_val = round(fraction * n)
  if not 0 < n_val < n:
    raise ValueError(f"fraction {fraction} of {n} examples leaves an empty train or validation part")
  rng = np.random.default_rng(seed)
  if not stratify:
    val = rng.permutation(n)[:n_val]
  else:
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = fraction * counts
    take = np.floor(quota).astype(np.int64)
    # Largest remainder first; a stable sort keeps ties in class order.
    by_remainder = np.argsort(-(quota - take), kind="stable")
    take[by_remainder[: n_val - take.sum()]] += 1
    # A random order, then a stable sort by class, shuffles within each class.
    order = rng.permutation(n)
    order = order[np.argsort(inverse[order], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    val = np.concatenate([order[s : s + k] for s, k in zip(starts, take)])
  is_val = np.zeros(n, bool)
  is_val[val] = True
  return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def holdout_split(
  dataset: ArrayDataset, fraction: float, seed: int, *, stratify: bool = True
) -> tuple[ArrayDataset, ArrayDataset]:
  """Splits off a deterministic validation set, e.g. to tune rho on held-out data.

  Stratifies on ``dataset.labels``. To hold out part of a noisy training set
  and keep its noise, split the indices once and apply them to both::

    train_idx, val_idx = holdout_indices(noisy.labels, 0.1, seed=0)
    train, val = dataset.subset(train_idx), dataset.subset(val_idx)
    train_noise, val_noise = noisy.subset(train_idx), noisy.subset(val_idx)

  Args:
    dataset: the examples to split.
    fraction: share held out for validation, in (0, 1).
    seed: seed of ``np.random.default_rng``.
    stratify: keep class proportions in both parts.

  Returns:
    ``(train, val)`` datasets; see :func:`holdout_indices` for the sizes.
  """
  train_idx, val_idx = holdout_indices(dataset.labels, fraction, seed, stratify=stratify)
  return dataset.subset(train_idx), dataset.subset(val_idx)
