"""Image datasets read from files in the folder layouts their authors publish.

Each layout is a dataset of :data:`saner_jax.train.data.DATASETS` with a
``layout``; ``--data_dir`` (or the ``data_dir`` config key) is the folder
that holds it. The test split the trainer evaluates on is ``--eval_split``
(the layout's default when empty):

========================  =========================================================  ==================================
dataset                   files read under ``data_dir``                              evaluated on
========================  =========================================================  ==================================
``image_folder``          ``train/<class>/*.jpg`` (also .jpeg, .png; classes sorted)  ``test/<class>/``, else ``val/``
``animal10n``             ``training/<label>_<id>.jpg``, ``testing/...``              ``testing/``
``mini_webvision``        ``info/train_filelist_google.txt`` ("path label" lines,     WebVision's own validation set:
                          paths under data_dir), labels 0-49 kept                     ``info/val_filelist.txt`` with
                                                                                      ``val_images_256/``; or
                                                                                      ``--eval_split imagenet``:
                                                                                      ``imagenet/val/<wnid>/*`` for the
                                                                                      first 50 of ``info/synsets.txt``
``clothing1m``            ``noisy_label_kv.txt``, ``clean_label_kv.txt`` ("path       ``clean_test_key_list.txt`` with
                          label" lines), ``noisy_train_key_list.txt`` (in           its clean labels
                          data_dir or data_dir/annotations/)
``tiny_imagenet``         ``wnids.txt``, ``train/<wnid>/images/*.JPEG``               ``val/`` with
                                                                                      ``val/val_annotations.txt``
========================  =========================================================  ==================================

Tiny-ImageNet's ``test/`` folder has no labels and is never read. A missing
or malformed file raises :class:`LayoutError`, one line naming the file and
the layout expected.

Animal-10N, Mini-WebVision and Clothing1M have real label noise and no noise
mask: their given labels are trained on as they are (``--noise_mode none``),
and the trainer reports test accuracy and the agreement with the given
labels (``train_acc``), not a clean accuracy it cannot know. Clothing1M's
human-verified labels (``clean_label_kv.txt``) cover part of its noisy
training set: on those examples the trainer measures memorisation
(:func:`verified_subset`).

Departures from the authors' released loaders (github.com/lhchau/saner):
their Mini-WebVision and Animal-10N datasets return ``(image, label)`` while
their loop unpacks three values, so both crash as released; here every split
gives images, labels and (for the noise bookkeeping) the same labels as the
"true" ones. Their Tiny-ImageNet evaluates on the unlabeled ``test/`` folder
(every image in one class); here it is ``val/`` with its annotations. Their
Mini-WebVision "val" is WebVision's own validation set, the default here
too, although their README names ImageNet's; both are offered.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import pathlib

import numpy as np

from saner_jax.train import data

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Mini-WebVision: the first 50 of WebVision's 1000 classes.
WEBVISION_CLASSES = 50

LAYOUT_HELP = {
  "image_folder": "train/<class>/*.jpg, and test/<class>/*.jpg or val/<class>/*.jpg",
  "animal10n": "training/<label>_<id>.jpg and testing/<label>_<id>.jpg, label 0-9",
  "mini_webvision": "info/train_filelist_google.txt and info/val_filelist.txt ('path label' lines), "
  "val_images_256/ (and for --eval_split imagenet: info/synsets.txt, imagenet/val/<wnid>/)",
  "clothing1m": "noisy_label_kv.txt, clean_label_kv.txt, noisy_train_key_list.txt, clean_test_key_list.txt "
  "('path label' and 'path' lines, in data_dir or data_dir/annotations), images under data_dir",
  "tiny_imagenet": "wnids.txt, train/<wnid>/images/*.JPEG, val/val_annotations.txt and val/images/",
}
EVAL_SPLITS = {
  "image_folder": ("test", "val"),
  "animal10n": ("testing",),
  "mini_webvision": ("webvision", "imagenet"),
  "clothing1m": ("clean_test",),
  "tiny_imagenet": ("val",),
}


class LayoutError(ValueError):
  """A file of a folder dataset is missing or malformed; the message names it and the layout expected."""


def _error(layout: str, path: pathlib.Path | str, problem: str) -> LayoutError:
  return LayoutError(f"{path}: {problem}; the {layout} layout expects {LAYOUT_HELP[layout]}")


@dataclasses.dataclass(frozen=True)
class FolderIndex:
  """One split of a folder dataset: its files and labels, nothing decoded.

  Attributes:
    paths: each example's image file.
    labels: int32 ``[N]``, the given labels (noisy for real-noise datasets).
    clean_labels: int32 ``[N]``, human-verified labels where the dataset
      has them (Clothing1M), -1 elsewhere; None when it has none.
    class_names: the class of each label index.
    source: which files the split was read from, in words.
  """

  paths: tuple[str, ...]
  labels: np.ndarray
  clean_labels: np.ndarray | None
  class_names: tuple[str, ...]
  source: str

  def __len__(self) -> int:
    return len(self.paths)


def _need_dir(layout: str, path: pathlib.Path) -> pathlib.Path:
  if not path.is_dir():
    raise _error(layout, path, "no such folder")
  return path


def _need_file(layout: str, *candidates: pathlib.Path) -> pathlib.Path:
  found = next((p for p in candidates if p.is_file()), None)
  if found is None:
    raise _error(layout, candidates[0], "no such file")
  return found


def _images_in(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _pairs(layout: str, path: pathlib.Path) -> list[tuple[str, int]]:
  """The ``path label`` lines of a list file."""
  out = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
      raise _error(layout, path, f"line {number} is {line.strip()!r}, not 'path label'")
    out.append((parts[0], int(parts[1])))
  return out


def _index(paths, labels, class_names, source, clean_labels=None) -> FolderIndex:
  return FolderIndex(
    tuple(str(p) for p in paths),
    np.asarray(labels, np.int64).astype(np.int32),
    None if clean_labels is None else np.asarray(clean_labels, np.int64).astype(np.int32),
    tuple(class_names),
    source,
  )


def _image_folder(root: pathlib.Path, split: str, eval_split: str) -> FolderIndex:
  layout = "image_folder"
  classes = sorted(p.name for p in _need_dir(layout, root / "train").iterdir() if p.is_dir())
  if not classes:
    raise _error(layout, root / "train", "holds no class folders")
  folder = root / ("train" if split == "train" else eval_split)
  _need_dir(layout, folder)
  paths, labels = [], []
  for label, name in enumerate(classes):
    if not (folder / name).is_dir():
      continue  # a class without evaluation images
    files = _images_in(folder / name)
    paths += files
    labels += [label] * len(files)
  unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in classes)
  if unknown:
    raise _error(layout, folder / unknown[0], "is a class folder that train/ does not have")
  if not paths:
    raise _error(layout, folder, "holds no images")
  return _index(paths, labels, classes, f"{folder}/<class>/")


def _animal10n(root: pathlib.Path, split: str, eval_split: str) -> FolderIndex:
  layout = "animal10n"
  folder = _need_dir(layout, root / ("training" if split == "train" else "testing"))
  paths, labels = [], []
  for path in _images_in(folder):
    label, underscore, _ = path.stem.partition("_")
    if not (underscore and label.isdigit() and int(label) < 10):
      raise _error(layout, path, "is not named <label>_<id> with a label in 0-9")
    paths.append(path)
    labels.append(int(label))
  if not paths:
    raise _error(layout, folder, "holds no images")
  return _index(paths, labels, data.DATASETS[layout].class_names, f"{folder}/")


def _mini_webvision(root: pathlib.Path, split: str, eval_split: str) -> FolderIndex:
  layout = "mini_webvision"
  names = data.DATASETS[layout].class_names
  if split == "train" or eval_split == "webvision":
    listing = "train_filelist_google.txt" if split == "train" else "val_filelist.txt"
    path = _need_file(layout, root / "info" / listing)
    prefix = root if split == "train" else root / "val_images_256"
    kept = [(prefix / p, label) for p, label in _pairs(layout, path) if label < WEBVISION_CLASSES]
    if not kept:
      raise _error(layout, path, f"lists no image of the first {WEBVISION_CLASSES} classes")
    source = f"{path} (first {WEBVISION_CLASSES} classes)"
    if split != "train":
      source = f"WebVision's own validation set, {source}"
    return _index([p for p, _ in kept], [label for _, label in kept], names, source)
  synsets = _need_file(layout, root / "info" / "synsets.txt")
  wnids = [line.split()[0] for line in synsets.read_text().splitlines() if line.strip()][:WEBVISION_CLASSES]
  if len(wnids) < WEBVISION_CLASSES:
    raise _error(layout, synsets, f"lists {len(wnids)} synsets, fewer than {WEBVISION_CLASSES}")
  paths, labels = [], []
  for label, wnid in enumerate(wnids):
    files = _images_in(_need_dir(layout, root / "imagenet" / "val" / wnid))
    paths += files
    labels += [label] * len(files)
  return _index(paths, labels, names, f"ImageNet's validation set of the first {WEBVISION_CLASSES} WebVision classes")


def _clothing1m(root: pathlib.Path, split: str, eval_split: str) -> FolderIndex:
  layout = "clothing1m"

  def annotation(name: str) -> pathlib.Path:
    return _need_file(layout, root / name, root / "annotations" / name)

  noisy = dict(_pairs(layout, annotation("noisy_label_kv.txt")))
  clean = dict(_pairs(layout, annotation("clean_label_kv.txt")))
  for path, kv in ((annotation("noisy_label_kv.txt"), noisy), (annotation("clean_label_kv.txt"), clean)):
    bad = next((label for label in kv.values() if not 0 <= label < 14), None)
    if bad is not None:
      raise _error(layout, path, f"has label {bad}, outside 0-13")
  keys_path = annotation("noisy_train_key_list.txt" if split == "train" else "clean_test_key_list.txt")
  keys = [line.strip() for line in keys_path.read_text().splitlines() if line.strip()]
  given = noisy if split == "train" else clean
  missing = next((k for k in keys if k not in given), None)
  if missing is not None:
    kv_file = "noisy_label_kv.txt" if split == "train" else "clean_label_kv.txt"
    raise _error(layout, keys_path, f"lists {missing}, which {kv_file} does not label")
  if not keys:
    raise _error(layout, keys_path, "is empty")
  verified = [clean.get(k, -1) for k in keys]
  return _index([root / k for k in keys], [given[k] for k in keys], data.DATASETS[layout].class_names,
                str(keys_path), clean_labels=verified)  # fmt: skip


def _tiny_imagenet(root: pathlib.Path, split: str, eval_split: str) -> FolderIndex:
  layout = "tiny_imagenet"
  wnids_path = _need_file(layout, root / "wnids.txt")
  wnids = [line.strip() for line in wnids_path.read_text().splitlines() if line.strip()]
  if len(set(wnids)) != len(wnids) or not wnids:
    raise _error(layout, wnids_path, "must list distinct WordNet ids, one a line")
  label_of = {w: i for i, w in enumerate(wnids)}
  paths, labels = [], []
  if split == "train":
    for wnid in wnids:
      files = _images_in(_need_dir(layout, root / "train" / wnid / "images"))
      paths += files
      labels += [label_of[wnid]] * len(files)
    source = f"{root / 'train'}/<wnid>/images/"
  else:
    annotations = _need_file(layout, root / "val" / "val_annotations.txt")
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
      if not line.strip():
        continue
      parts = line.split("\t")
      if len(parts) < 2 or parts[1] not in label_of:
        raise _error(layout, annotations, f"line {number} does not start with '<file>\\t<wnid of wnids.txt>'")
      paths.append(root / "val" / "images" / parts[0])
      labels.append(label_of[parts[1]])
    source = f"{annotations} (the labelled val/; the unlabeled test/ is never used)"
  return _index(paths, labels, wnids, source)


READERS = {
  "image_folder": _image_folder,
  "animal10n": _animal10n,
  "mini_webvision": _mini_webvision,
  "clothing1m": _clothing1m,
  "tiny_imagenet": _tiny_imagenet,
}


def default_eval_split(layout: str, root: str | os.PathLike) -> str:
  """The split evaluated on when ``--eval_split`` is empty: the layout's first, or val/ for a folder without test/."""
  if layout == "image_folder" and not (pathlib.Path(root) / "test").is_dir():
    return "val"
  return EVAL_SPLITS[layout][0]


@functools.lru_cache(maxsize=16)
def _cached_index(layout: str, root: str, split: str, eval_split: str) -> FolderIndex:
  return READERS[layout](pathlib.Path(root), split, eval_split)


def _root(spec: data.DatasetSpec, data_dir: str | os.PathLike | None) -> pathlib.Path:
  layout = spec.layout or "image_folder"
  if data_dir is None:
    raise LayoutError(f"{spec.name} is read from files: pass --data_dir, the folder holding {LAYOUT_HELP[layout]}")
  root = pathlib.Path(data_dir).absolute()
  if not root.is_dir():
    raise _error(layout, root, "no such folder (--data_dir)")
  return root


def read_index(spec: data.DatasetSpec, split: str, data_dir: str | os.PathLike | None) -> FolderIndex:
  """The files and labels of one split (``"train"`` or ``"test"``) of a folder dataset.

  Cached: validating a config and loading its data list the folders once.

  Raises:
    LayoutError: ``data_dir`` is missing, or a file of the layout is
      missing or malformed.
  """
  layout = spec.layout
  if layout is None:
    raise ValueError(f"{spec.name} is not a folder dataset")
  root = _root(spec, data_dir)
  eval_split = spec.eval_split or default_eval_split(layout, root)
  if eval_split not in EVAL_SPLITS[layout]:
    raise LayoutError(
      f"--eval_split: {spec.name} is evaluated on one of {list(EVAL_SPLITS[layout])}, not {eval_split!r}"
    )
  return _cached_index(layout, str(root), "train" if split == "train" else "test", eval_split)


def resolve_spec(spec: data.DatasetSpec, data_dir: str | os.PathLike | None) -> data.DatasetSpec:
  """``spec`` with the facts its files hold: the classes of an ``image_folder``, and its split sizes.

  Raises LayoutError when ``data_dir`` is not given or not a folder, or an
  ``image_folder``'s layout is broken.
  """
  if spec.layout != "image_folder":
    _root(spec, data_dir)
    return spec
  train, test = read_index(spec, "train", data_dir), read_index(spec, "test", data_dir)
  return dataclasses.replace(
    spec, num_classes=len(train.class_names), class_names=train.class_names,
    sizes={"train": len(train), "test": len(test)},
  )  # fmt: skip


# ---------------------------------------------------------------------------
# Decoding


def open_rgb(path: str, layout: str = "image_folder"):
  """The image at ``path`` as an RGB PIL image; LayoutError when it is missing or not an image."""
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as image:
      return image.convert("RGB")
  except FileNotFoundError:
    raise _error(layout, path, "no such image file") from None
  except (UnidentifiedImageError, OSError) as e:
    raise _error(layout, path, f"cannot be decoded as an image ({type(e).__name__})") from None


def resize_center(image, size: int, random_resized_crop: bool) -> np.ndarray:
  """The evaluation transform: uint8 ``[size, size, 3]``.

  With ``random_resized_crop`` (ImageNet-size photographs) the shorter side
  is resized to ``size / 0.875`` and the centre ``size`` x ``size`` kept,
  the standard ImageNet evaluation; otherwise the image is resized to
  ``size`` x ``size`` (nothing happens when it already is).
  """
  from PIL import Image

  if random_resized_crop:
    short = round(size / 0.875)
    w, h = image.size
    scale = short / min(w, h)
    image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.Resampling.BILINEAR)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
  elif image.size != (size, size):
    image = image.resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(image, np.uint8)


def random_resized_crop(image, size: int, rng: np.random.Generator, flip: bool = True) -> np.ndarray:
  """torchvision's ``RandomResizedCrop(size)`` (scale 0.08-1, ratio 3/4-4/3) and a random flip, seeded by ``rng``.

  Ten tries at a crop of random area and aspect ratio that fits, then the
  centre crop of the clamped ratio, as torchvision does.
  """
  from PIL import Image

  w, h = image.size
  area = w * h
  box = None
  for _ in range(10):
    target = area * rng.uniform(0.08, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = round(np.sqrt(target * ratio)), round(np.sqrt(target / ratio))
    if 0 < cw <= w and 0 < ch <= h:
      left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
      box = (left, top, left + cw, top + ch)
      break
  if box is None:
    ratio = w / h
    cw, ch = (w, round(w / (4 / 3))) if ratio > 4 / 3 else ((round(h * 3 / 4), h) if ratio < 3 / 4 else (w, h))
    box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
  out = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
  if flip and rng.random() < 0.5:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out, np.uint8)


def decode_all(paths, size: int, random_resized_crop: bool, layout: str, workers: int | None = None) -> np.ndarray:
  """Every image of ``paths`` through :func:`resize_center`, as uint8 ``[N, size, size, 3]``, on a thread pool."""
  out = np.empty((len(paths), size, size, 3), np.uint8)

  def one(i: int) -> None:
    out[i] = resize_center(open_rgb(paths[i], layout), size, random_resized_crop)

  with concurrent.futures.ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
    list(pool.map(one, range(len(paths))))
  return out


def load_arrays(
  spec: data.DatasetSpec, split: str, *, data_dir: str | os.PathLike | None, max_examples: int | None = None
) -> data.ArrayDataset:
  """One split decoded into host memory (the on-device input path), resized to ``spec.image_shape``.

  Clothing1M's verified labels of the training split are in
  ``noisy_label_sets`` under ``"clean_label"`` only where every example has
  one; otherwise they are read with :func:`verified_subset`.
  """
  index = read_index(spec, split, data_dir)
  n = len(index) if max_examples is None else min(len(index), max_examples)
  images = decode_all(index.paths[:n], spec.image_shape[0], spec.random_resized_crop, spec.layout or "")
  return data.ArrayDataset(images=images, labels=index.labels[:n], num_classes=spec.num_classes, name=spec.name)


def verified_subset(index: FolderIndex, train_idx: np.ndarray) -> np.ndarray:
  """Positions in ``train_idx`` of the training examples with a human-verified label too (Clothing1M)."""
  if index.clean_labels is None:
    return np.zeros(0, np.int64)
  return np.flatnonzero(index.clean_labels[train_idx] >= 0)
