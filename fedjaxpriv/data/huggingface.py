"""Hugging Face ``datasets`` (optional extra ``hf``): ``data.dataset: "hf:<path or name>"``, read into the
``pyarrow`` tables that ``data.tables`` turns into data, so columns, labels, client columns and text work as for
Parquet / Arrow files.

``<path or name>`` is, in this order:
- a directory written by ``Dataset(Dict).save_to_disk`` (it holds ``dataset_dict.json``): ``load_from_disk``;
- any other local directory or file: ``load_dataset`` on it (folders of Parquet, CSV or JSON files, or an
  image folder, ``train/<class>/*.png``, whose labels are the class folders);
- a Hub name (``"ylecun/mnist"``): ``load_dataset`` from the local cache in ``data.data_dir`` (None: Hugging
  Face's default), offline unless ``data.download`` is true.

The splits read are "train" and "test".
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

SPLITS = ("train", "test")


@contextlib.contextmanager
def quiet(offline: bool = True) -> Iterator[None]:
    """Inside, the Hugging Face libraries show no progress bars and, when ``offline``, make no network request
    (both restored on exit)."""
    import datasets
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    if offline:
        datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved
        if bars:
            datasets.utils.enable_progress_bars()


def load_hf_dataset(source: str, cache_dir: str | None = None, download: bool = False) -> Any:
    """The ``datasets.DatasetDict`` that ``source`` names (see the module docstring).

    Raises:
      ValueError: ``datasets`` is not installed, or ``source`` cannot be read (the error says why).
      FileNotFoundError: a Hub name not in the local cache while ``download`` is false.
    """
    try:
        import datasets
    except ModuleNotFoundError:
        raise ValueError(f"data.dataset='hf:{source}' needs Hugging Face's datasets library: "
                         "pip install 'fedjaxpriv[hf]'.") from None
    path = os.path.expanduser(source)
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        with quiet():
            return datasets.load_from_disk(path)
    local = os.path.exists(path)
    try:
        with quiet(offline=not download or local):
            return datasets.load_dataset(path if local else source, cache_dir=cache_dir)
    except ConnectionError as error:
        raise FileNotFoundError(
            f"Hugging Face dataset {source!r} is not in the local cache "
            f"{str(cache_dir or datasets.config.HF_DATASETS_CACHE)!r} ({' '.join(str(error).split())}): set "
            "data.download=true where there is network, or data.data_dir to the cache that holds it.") from None
    except (OSError, ValueError, TypeError, datasets.exceptions.DatasetNotFoundError) as error:
        raise ValueError(f"data.dataset='hf:{source}' is not readable by datasets.load_dataset: "
                         f"{' '.join(str(error).split())}") from None


def load_hf_tables(source: str, cache_dir: str | None = None, download: bool = False) -> tuple[Any, Any]:
    """The "train" and "test" splits of ``load_hf_dataset(source, ...)`` as ``pyarrow.Table``s.

    Raises:
      ValueError: a split is missing (the error lists the dataset's splits).
    """
    dataset = load_hf_dataset(source, cache_dir, download)
    missing = [s for s in SPLITS if s not in dataset]
    if missing:
        raise ValueError(f"Hugging Face dataset {source!r} has no split(s) {missing}; it has {sorted(dataset)} "
                         f"(fedjaxpriv reads {list(SPLITS)}).")
    return tuple(dataset[split].with_format("arrow")[:] for split in SPLITS)
