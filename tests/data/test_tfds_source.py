"""Loading tfds datasets through ``load_dataset`` from a small dataset prepared locally, offline."""

import io

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
PIL_Image = pytest.importorskip("PIL.Image")

from fedjaxpriv.data import load_dataset  # noqa: E402
from fedjaxpriv.data.tfds_source import source_to_numpy  # noqa: E402

_SHAPE = (6, 5, 3)
_NUM_CLASSES = 4
_SIZES = {"train": 37, "test": 11}


def _split_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The exact pixels [N, H, W, C] uint8 and labels [N] that the local builder writes for ``split``."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    images = rng.integers(0, 256, (_SIZES[split],) + _SHAPE, dtype=np.uint8)
    labels = rng.integers(0, _NUM_CLASSES, _SIZES[split]).astype(np.int64)
    return images, labels


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL_Image.fromarray(image).save(buffer, format="png")
    return buffer.getvalue()


class TinyColorImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A random RGB image dataset; images are handed to tfds as PNG bytes, so preparing needs no TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")
    # No source path: tfds then skips looking for download checksums next to this module, a lookup that
    # needs the optional `importlib_resources` package for builders defined outside a package.
    code_path = None

    def _info(self):
        features = tfds.features.FeaturesDict({
            "picture": tfds.features.Image(shape=_SHAPE),
            "digit": tfds.features.ClassLabel(num_classes=_NUM_CLASSES),
        })
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in _SIZES}

    def _generate_examples(self, split):
        images, labels = _split_arrays(split)
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"picture": _png(image), "digit": int(label)}


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    TinyColorImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_local_dataset_round_trips_exactly(prepared_dir):
    train, test, info = load_dataset("tfds:tiny_color_images", data_dir=prepared_dir, image_key="picture",
                                     label_key="digit")
    for split, data in (("train", train), ("test", test)):
        images, labels = _split_arrays(split)
        assert data.x.dtype == np.float32 and data.y.dtype == np.int32
        np.testing.assert_array_equal(np.rint(data.x * 255).astype(np.uint8), images)
        np.testing.assert_array_equal(data.x, images.astype(np.float32) / np.float32(255))
        np.testing.assert_array_equal(data.y, labels)
    assert info.input_shape == _SHAPE
    assert info.num_classes == _NUM_CLASSES
    assert (info.num_train, info.num_test) == (_SIZES["train"], _SIZES["test"])


def test_batched_reads_match_single_reads(prepared_dir):
    source = tfds.data_source("tiny_color_images", data_dir=prepared_dir, split="train")
    batched = source_to_numpy(source, "picture", "digit", batch_size=5)  # 37 = 7 batches of 5 + 2
    for i in (0, 4, 5, 36):
        np.testing.assert_array_equal(batched.x[i], source[i]["picture"].astype(np.float32) / 255)
        assert batched.y[i] == source[i]["digit"]


def test_wrong_feature_key_is_named(prepared_dir):
    with pytest.raises(ValueError, match="'image'"):
        load_dataset("tfds:tiny_color_images", data_dir=prepared_dir, label_key="digit")


@pytest.mark.parametrize("name, tfds_name", [
    ("mnist", "mnist"), ("emnist", "emnist/balanced"), ("emnist/letters", "emnist/letters"),
    ("tfds:not_prepared_anywhere", "not_prepared_anywhere"),
])
def test_missing_dataset_without_download_says_how_to_get_it(tmp_path, name, tfds_name):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, data_dir=str(tmp_path), download=False)
    message = str(err.value)
    assert tfds_name in message and str(tmp_path) in message and "download=True" in message


def test_unknown_name_lists_allowed_names():
    with pytest.raises(ValueError, match="fashion_mnist"):
        load_dataset("imagenet_tiny")
    with pytest.raises(ValueError, match="allowed"):
        load_dataset("mnist/letters")
