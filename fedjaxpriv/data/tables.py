"""Any local dataset in Parquet or Arrow files (what Hugging Face ``datasets`` writes and the Hub serves), read
with pyarrow: ``data.dataset`` "parquet" or "arrow", ``data.train_files`` / ``data.test_files`` (paths or glob
patterns), ``data.image_key`` the feature column, ``data.label_key`` the label column and, for a natural
partition, ``data.client_column`` (one client per distinct value).

Feature columns: numbers or (nested) lists of numbers of one shape -> float32 [N, ...]; Hugging Face image
structs ``{"bytes", "path"}`` -> float32 [N, H, W, C] in [0, 1]; text (with ``data.text_level`` "char" or "word")
-> next-token sequences of ``data.sequence_length`` tokens, each row a text of its own, with a vocabulary from the
training rows (``data.text``). Labels: integers >= 0, or strings (numbered in sorted order).
"""

from __future__ import annotations

import glob
import io
import os
from typing import Any, Sequence

import numpy as np

from fedjaxpriv.config import HF_PREFIX, TABLE_DATASETS
from fedjaxpriv.data import text
from fedjaxpriv.data.federated import Dataset, FederatedData, choose_clients, from_client_lists

__all__ = ["TABLE_DATASETS", "load_table_dataset", "tables_to_data", "read_table", "features", "labels",
           "client_ids"]


def read_table(kind: str, patterns: Sequence[str], field: str) -> Any:
    """The rows of every file matching ``patterns`` (sorted within each pattern) as one ``pyarrow.Table``.

    Raises:
      ValueError: naming ``field`` and the pattern, when a pattern matches no file or a file is not ``kind``.
    """
    import pyarrow as pa
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    if not patterns:
        raise ValueError(f"{field} is empty: list the {kind} files (paths or glob patterns).")
    tables = []
    for pattern in patterns:
        paths = sorted(glob.glob(os.path.expanduser(pattern)))
        if not paths:
            raise ValueError(f"{field}: {pattern!r} matches no file.")
        for path in paths:
            try:
                tables.append(pq.read_table(path) if kind == "parquet" else _read_arrow(path, pa, feather))
            except (OSError, pa.ArrowException) as error:
                raise ValueError(f"{path}: not readable as {kind} ({error}).") from None
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as error:
        raise ValueError(f"{field}: the files' columns do not agree ({error}).") from None


def _read_arrow(path: str, pa: Any, feather: Any) -> Any:
    try:
        return feather.read_table(path)  # the Arrow IPC file format
    except pa.ArrowInvalid:
        with pa.memory_map(path) as source:  # the streaming format, as Hugging Face writes its cache
            return pa.ipc.open_stream(source).read_all()


def _column(table: Any, name: str | None, path: str) -> Any:
    if name is None or name not in table.column_names:
        raise ValueError(f"{path}={name!r} is not a column of the data; columns: {table.column_names}.")
    return table.column(name)


def features(column: Any, name: str) -> np.ndarray:
    """A feature column as float32 ``[N, ...]`` (numbers, lists of one shape, or image structs)."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return np.stack([_decode_image(row, name) for row in column.to_pylist()])
    values = column.to_pylist()
    try:
        array = np.asarray(values, np.float32)
    except (ValueError, TypeError):
        raise ValueError(f"column {name!r} ({kind}) is neither numbers, lists of numbers of one shape, nor images; "
                         "for text set data.text_level.") from None
    return array[:, None] if array.ndim == 1 else array


def _decode_image(row: dict[str, Any], name: str) -> np.ndarray:
    """A Hugging Face image struct (its ``bytes``, else the file at its ``path``) as float32 [H, W, C] in [0, 1]."""
    from PIL import Image

    if row.get("bytes") is None and not row.get("path"):
        raise ValueError(f"column {name!r} has an image with neither bytes nor a path.")
    try:
        opened = Image.open(io.BytesIO(row["bytes"]) if row.get("bytes") is not None else row["path"])
    except OSError as error:
        raise ValueError(f"column {name!r}: an image is not readable ({error}).") from None
    image = np.asarray(opened, np.float32) / 255.0
    return image[..., None] if image.ndim == 2 else image


def labels(train: Any, test: Any, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer labels of both splits and their number of classes: integers >= 0 as they are (classes = the
    largest + 1), strings numbered in sorted order."""
    train_values, test_values = train.to_pylist(), test.to_pylist()
    if all(isinstance(v, str) for v in train_values + test_values):
        names = sorted(set(train_values) | set(test_values))
        index = {v: i for i, v in enumerate(names)}
        return (np.array([index[v] for v in train_values], np.int32), np.array([index[v] for v in test_values],
                                                                                np.int32), len(names))
    both = np.asarray(train_values + test_values)
    if not np.issubdtype(both.dtype, np.integer) or both.min() < 0:
        raise ValueError(f"label column {name!r} must hold integers >= 0 or strings; found {both.dtype} "
                         f"(smallest {both.min()}).")
    return both[: len(train_values)].astype(np.int32), both[len(train_values):].astype(np.int32), int(both.max()) + 1


def client_ids(table: Any, name: str, num_clients: int, seed: int) -> tuple[np.ndarray, list[Any]]:
    """Row -> client index [N] (-1: a row of a client left out) for ``num_clients`` of the column's distinct
    values (all, or a seeded random subset in sorted order)."""
    values = table.column(name).to_pylist()
    distinct = choose_clients(sorted(set(values), key=lambda v: (str(type(v)), v)), num_clients, seed,
                              f"data.client_column={name!r}'s number of distinct values")
    index = {v: i for i, v in enumerate(distinct)}
    return np.array([index.get(v, -1) for v in values], np.int64), distinct


def load_table_dataset(data: Any, seed: int) -> tuple[Dataset | FederatedData, Dataset, int]:
    """The configured table dataset (Parquet / Arrow files, or a Hugging Face dataset: ``data.huggingface``):
    ``tables_to_data`` of its training and test tables."""
    if data.dataset.startswith(HF_PREFIX):
        from fedjaxpriv.data.huggingface import load_hf_tables

        train, test = load_hf_tables(data.dataset[len(HF_PREFIX):], data.data_dir, data.download)
    else:
        train = read_table(data.dataset, data.train_files, "data.train_files")
        test = read_table(data.dataset, data.test_files, "data.test_files")
    return tables_to_data(train, test, data, seed)


def tables_to_data(train: Any, test: Any, data: Any, seed: int) -> tuple[Dataset | FederatedData, Dataset, int]:
    """Training and test ``pyarrow.Table``s as data: (population when ``data.client_column`` is set, else the
    centralized training set to partition; the test set; classes, or the vocabulary's size for text)."""
    feature_train = _column(train, data.image_key, "data.image_key")
    feature_test = _column(test, data.image_key, "data.image_key")
    owner = None
    if data.client_column:
        _column(train, data.client_column, "data.client_column")
        owner, _ = client_ids(train, data.client_column, data.num_clients, seed)
    if data.text_level is not None:
        rows = [str(v) for v in feature_train.to_pylist()]
        vocabulary = text.build_vocabulary(rows, data.text_level, data.vocabulary_size)
        test_set = text.windows_of([str(v) for v in feature_test.to_pylist()], vocabulary, data.sequence_length)
        if owner is None:
            return text.windows_of(rows, vocabulary, data.sequence_length), test_set, len(vocabulary)
        windows = [text.sequences(vocabulary.encode(row), data.sequence_length) for row in rows]
        return (_by_client([x for x, _ in windows], [y for _, y in windows], owner, data.num_clients), test_set,
                len(vocabulary))
    x_train, x_test = features(feature_train, data.image_key), features(feature_test, data.image_key)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"training examples have shape {x_train.shape[1:]} but test examples {x_test.shape[1:]}.")
    y_train, y_test, classes = labels(_column(train, data.label_key, "data.label_key"),
                                      _column(test, data.label_key, "data.label_key"), data.label_key)
    if owner is None:
        return Dataset(x_train, y_train), Dataset(x_test, y_test), classes
    return _by_client(list(x_train[:, None]), list(y_train[:, None]), owner, data.num_clients), Dataset(
        x_test, y_test), classes


def _by_client(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], owner: np.ndarray, num_clients: int
               ) -> FederatedData:
    """Rows' example blocks (``xs[i]`` [n_i, ...]) gathered per client (``owner[i]``, -1 left out), in row order."""
    shape_x, shape_y = xs[0].shape[1:], ys[0].shape[1:]
    per_x: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    per_y: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for x, y, client in zip(xs, ys, owner):
        if client >= 0:
            per_x[client].append(x)
            per_y[client].append(y)
    return from_client_lists(
        [np.concatenate(p) if p else np.zeros((0, *shape_x), xs[0].dtype) for p in per_x],
        [np.concatenate(p) if p else np.zeros((0, *shape_y), np.int32) for p in per_y])
