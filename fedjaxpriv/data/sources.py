"""Centralized datasets by name: one entry point, ``load_dataset``.

``digits`` is scikit-learn's bundled 8x8 digits and needs neither files nor network. The other names are read
from TensorFlow Datasets (see ``tfds_source``); ``'tfds:<name>'`` loads any other tfds image classification
dataset, e.g. one prepared locally under ``data_dir``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedjaxpriv.config import USER_SUPPLIED
from fedjaxpriv.data import tfds_source
from fedjaxpriv.data.federated import Dataset

TFDS_PREFIX = "tfds:"

# Registered names -> tfds names (a config after '/' may be appended to a name that has configs).
_TFDS_NAMES = {
    "mnist": "mnist",
    "fashion_mnist": "fashion_mnist",
    "emnist": "emnist/balanced",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
}
_TFDS_WITH_CONFIGS = ("emnist",)
DATASET_NAMES: tuple[str, ...] = ("digits",) + tuple(_TFDS_NAMES)
# tfds text datasets by name (read by ``tfds_source.load_tfds_texts``; next-token prediction, ``config.is_text``).
TFDS_TEXT_NAMES: tuple[str, ...] = ("tiny_shakespeare",)
DATASET_NAMES_TEXT = (f"one of {list(DATASET_NAMES + TFDS_TEXT_NAMES)}, 'emnist/<config>' or "
                      f"'{TFDS_PREFIX}<tfds name>'")

DIGITS_NUM_TEST = 360
DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Attributes:
      name: the name the dataset was loaded with.
      input_shape: shape of one example, (H, W, C) for images.
      num_classes: number of label values; labels are in [0, num_classes).
      num_train: number of training examples.
      num_test: number of test examples.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    num_train: int
    num_test: int


def _stratified_split(y: np.ndarray, num_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: each class sends a share of ~num_test/N of its examples to test."""
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=num_test, stratify=y, random_state=seed)
    return np.sort(train_idx), np.sort(test_idx)


def load_digits() -> tuple[Dataset, Dataset]:
    """scikit-learn's 1797 8x8 digits: x [N, 8, 8, 1] float32 in [0, 1] (pixel / 16), fixed 1437/360 split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (np.asarray(bunch.images, np.float32) / np.float32(16.0))[..., None]
    y = np.asarray(bunch.target, np.int32)
    train_idx, test_idx = _stratified_split(y, DIGITS_NUM_TEST, DIGITS_SPLIT_SEED)
    return Dataset(x[train_idx], y[train_idx]), Dataset(x[test_idx], y[test_idx])


def is_known_dataset(name: str) -> bool:
    """Whether ``load_dataset`` accepts ``name`` (without loading anything)."""
    return name == "digits" or name in TFDS_TEXT_NAMES or _resolve_tfds_name(name) is not None


def tfds_text_name(name: str) -> str | None:
    """The tfds name of a text dataset name (``TFDS_TEXT_NAMES``, or ``tfds:<name>`` read as text), else None."""
    if name in TFDS_TEXT_NAMES:
        return name
    return name[len(TFDS_PREFIX):] if name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX) else None


def _resolve_tfds_name(name: str) -> str | None:
    """The tfds name for a registered or ``tfds:``-prefixed name, or None when the name is unknown."""
    if name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX):
        return name[len(TFDS_PREFIX):]
    base, sep, config = name.partition("/")
    if base not in _TFDS_NAMES:
        return None
    if sep:
        return f"{base}/{config}" if base in _TFDS_WITH_CONFIGS and config else None
    return _TFDS_NAMES[base]


def load_dataset(name: str, data_dir: str | None = None, download: bool = False, *, image_key: str = "image",
                 label_key: str = "label") -> tuple[Dataset, Dataset, DatasetInfo]:
    """Loads a centralized image classification dataset.

    Args:
      name: one of ``DATASET_NAMES``; ``'emnist/<config>'`` picks an EMNIST config (``'emnist'`` means
        ``'emnist/balanced'``); ``'tfds:<tfds name>'`` loads any tfds dataset with an image and a label feature.
      data_dir: tfds data directory (None: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``); unused by digits.
      download: let tfds download and prepare a dataset that is not under ``data_dir``.
      image_key: tfds feature key of the image.
      label_key: tfds feature key of the label.

    Returns:
      (train, test, info): x float32 [N, H, W, C] in [0, 1], y int32 [N].

    Raises:
      ValueError: unknown name.
      FileNotFoundError: a tfds dataset is absent and ``download`` is False.
    """
    if name.startswith(USER_SUPPLIED):
        raise ValueError(f"data.dataset={name!r} records a run on arrays passed to Experiment(population=..., "
                         "test=..., num_classes=...): pass the same arrays again (their fingerprint is in the name).")
    if name == "digits":
        train, test = load_digits()
        num_classes = 10
    else:
        tfds_name = _resolve_tfds_name(name)
        if tfds_name is None:
            raise ValueError(f"unknown dataset name {name!r}; allowed: {DATASET_NAMES_TEXT}.")
        train, test, num_classes = tfds_source.load_tfds(tfds_name, data_dir, download, image_key=image_key,
                                                         label_key=label_key)
    info = DatasetInfo(name=name, input_shape=tuple(int(d) for d in train.x.shape[1:]), num_classes=num_classes,
                       num_train=len(train), num_test=len(test))
    return train, test, info
