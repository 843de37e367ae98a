"""Image classification and text datasets read from TensorFlow Datasets (tfds) without TensorFlow.

Datasets are read with ``tfds.data_source`` (random access over ``array_record`` files), decoded by tfds with
NumPy/PIL, and converted to NumPy in batches of records. Any tfds dataset whose examples hold an image and an
integer label works, including one prepared locally under ``data_dir``; ``load_tfds_texts`` reads the text
feature of a text dataset (``tiny_shakespeare``: one record per split, the whole play text).

Preparing a dataset (``download=True``) runs the tfds builder. Builders that hand tfds raw NumPy images (e.g.
``mnist``, ``cifar10``) need TensorFlow to encode them as PNG; without TensorFlow, prepare the dataset on a
machine that has it (``file_format='array_record'``) and copy the prepared ``data_dir`` over.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fedjaxpriv.data.federated import Dataset

_READ_BATCH = 4096


def default_data_dir() -> str:
    """The directory tfds searches when ``data_dir`` is None (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
    return os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def _missing_error(name: str, data_dir: str | None, reason: str = "") -> FileNotFoundError:
    searched = data_dir if data_dir is not None else default_data_dir()
    detail = f" ({reason})" if reason else ""
    return FileNotFoundError(
        f"tfds dataset '{name}' is not prepared in data_dir='{searched}'{detail}. Pass download=True to download "
        f"and prepare it (needs network; image datasets also need TensorFlow to encode images), or copy a tfds "
        f"directory prepared with file_format='array_record' to '{searched}/{name.split(':')[0]}/...'.")


def _builder(name: str, data_dir: str | None, download: bool) -> Any:
    """Returns the tfds builder for ``name``, raising FileNotFoundError when it is absent and not downloadable."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise _missing_error(name, data_dir, "no registered builder and no prepared files") from err
    if not download and not builder.is_prepared():
        raise _missing_error(name, data_dir)
    return builder


def _split_sources(name: str, data_dir: str | None, download: bool,
                   splits: tuple[str, ...]) -> tuple[dict[str, Any], Any]:
    """Opens the random-access sources of ``splits`` and returns them with the dataset's tfds info."""
    builder = _builder(name, data_dir, download)
    if download and not builder.is_prepared():
        try:
            builder.download_and_prepare(file_format="array_record")
        except ModuleNotFoundError as err:
            raise RuntimeError(
                f"preparing tfds dataset '{name}' needs the missing module '{err.name}'. Prepare it where "
                f"TensorFlow is installed (file_format='array_record') and copy the data_dir here.") from err
    missing = [s for s in splits if s not in builder.info.splits]
    if missing:
        raise ValueError(f"tfds dataset '{name}' has no split(s) {missing}; it has {sorted(builder.info.splits)}.")
    try:
        sources = {s: builder.as_data_source(split=s) for s in splits}
    except NotImplementedError as err:
        raise ValueError(
            f"tfds dataset '{name}' in '{builder.data_dir}' is stored as {builder.info.file_format}, which has no "
            f"random access; prepare it again with file_format='array_record'.") from err
    return sources, builder.info


def _to_float_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1]; float images are kept as float32."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    return images.astype(np.float32)


def source_to_numpy(source: Any, image_key: str = "image", label_key: str = "label",
                    batch_size: int = _READ_BATCH) -> Dataset:
    """Reads a whole random-access tfds split into NumPy, ``batch_size`` records per read.

    Args:
      source: a tfds data source (``Sequence`` of example dicts with ``__getitems__``).
      image_key: feature key of the [H, W, C] image.
      label_key: feature key of the integer label.
      batch_size: records fetched per batched read.

    Returns:
      ``Dataset`` with x [N, H, W, C] float32 (uint8 pixels scaled to [0, 1]) and y [N] int32.
    """
    n = len(source)
    if n == 0:
        raise ValueError("the tfds split is empty.")
    images: np.ndarray | None = None
    labels = np.empty((n,), np.int32)
    for start in range(0, n, batch_size):
        keys = list(range(start, min(n, start + batch_size)))
        records = source.__getitems__(keys)
        if start == 0:
            first = records[0]
            for key in (image_key, label_key):
                if key not in first:
                    raise ValueError(f"feature key '{key}' not in the dataset's features {sorted(first)}; set "
                                     f"image_key/label_key to the image and label features.")
            first_image = np.asarray(first[image_key])
            images = np.empty((n,) + first_image.shape, first_image.dtype)
        images[keys[0]: keys[-1] + 1] = np.stack([np.asarray(r[image_key]) for r in records])
        labels[keys[0]: keys[-1] + 1] = [int(r[label_key]) for r in records]
    assert images is not None
    if images.ndim == 3:
        images = images[..., None]
    return Dataset(_to_float_pixels(images), labels)


def load_tfds(name: str, data_dir: str | None = None, download: bool = False, *, image_key: str = "image",
              label_key: str = "label", train_split: str = "train",
              test_split: str = "test") -> tuple[Dataset, Dataset, int]:
    """Loads the train and test splits of a tfds image classification dataset.

    Args:
      name: tfds name, optionally with config and version (``'emnist/letters'``, ``'mnist:3.0.1'``).
      data_dir: tfds data directory; None means tfds's default (``default_data_dir()``).
      download: download and prepare the dataset when it is not prepared yet.
      image_key: feature key of the image.
      label_key: feature key of the label.
      train_split: name of the split returned as train.
      test_split: name of the split returned as test.

    Returns:
      (train, test, num_classes); images are float32 [N, H, W, C] in [0, 1], labels int32.

    Raises:
      FileNotFoundError: the dataset is not prepared under ``data_dir`` and ``download`` is False.
      ValueError: the splits or feature keys do not exist, or the files are not random access.
    """
    sources, info = _split_sources(name, data_dir, download, (train_split, test_split))
    train = source_to_numpy(sources[train_split], image_key, label_key)
    test = source_to_numpy(sources[test_split], image_key, label_key)
    label_feature = info.features[label_key] if label_key in info.features else None
    num_classes = getattr(label_feature, "num_classes", None)
    if num_classes is None:
        num_classes = int(max(train.y.max(), test.y.max())) + 1
    return train, test, int(num_classes)


def load_tfds_texts(name: str, data_dir: str | None = None, download: bool = False, *, text_key: str = "text",
                    train_split: str = "train", test_split: str = "test") -> tuple[list[str], list[str]]:
    """The texts of a tfds text dataset's train and test splits, one string per record (UTF-8 decoded).

    Raises:
      FileNotFoundError: the dataset is not prepared under ``data_dir`` and ``download`` is False.
      ValueError: the splits or ``text_key`` do not exist, a record's feature is not text, or the files are not
        random access.
    """
    sources, info = _split_sources(name, data_dir, download, (train_split, test_split))
    if text_key not in info.features:
        raise ValueError(f"feature key '{text_key}' not in tfds dataset '{name}''s features {sorted(info.features)}; "
                         "set data.image_key to its text feature.")
    texts: dict[str, list[str]] = {}
    for split, source in sources.items():
        values = [record[text_key] for record in source.__getitems__(list(range(len(source))))]
        if not all(isinstance(v, (bytes, str)) for v in values):
            raise ValueError(f"feature '{text_key}' of tfds dataset '{name}' is not text (found "
                             f"{type(values[0]).__name__ if values else 'no records'}).")
        texts[split] = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]
    return texts[train_split], texts[test_split]
