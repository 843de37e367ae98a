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


# -- text: a local copy of tfds's tiny_shakespeare ------------------------------------------------------------

_PLAY = {"train": "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
         "validation": "First Citizen:\nYou are all resolved rather to die than to famish?\n",
         "test": "MENENIUS:\nWhat work's, my countrymen, in hand? Zounds!\n"}


class TinyShakespeare(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """tfds's tiny_shakespeare as prepared on disk (version, feature, splits, one record per split), holding a
    short text: the registered builder reads it from ``data_dir`` as it reads a copy of the real one."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in _PLAY}

    def _generate_examples(self, split):
        yield 0, {"text": _PLAY[split]}


@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds_text"))
    TinyShakespeare(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tiny_shakespeare_from_a_local_copy_is_character_windows_with_a_training_vocabulary(shakespeare_dir):
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.data import text
    from fedjaxpriv.experiment import load_population

    config = from_dict({"data": {"dataset": "tiny_shakespeare", "data_dir": shakespeare_dir, "partition": "iid",
                                 "num_clients": 3, "sequence_length": 8}, "model": {"name": "lstm"},
                        "server": {"clients_per_round": 3}})
    population, test, vocabulary_size = load_population(config)
    characters = sorted(set(_PLAY["train"]))
    assert vocabulary_size == 2 + len(characters)
    # Every training window once, shifted by one character; no window of the validation split.
    length, targets = 8, len(_PLAY["train"]) - 1
    assert population.num_clients == 3 and len(population.x) == -(-targets // length)
    tokens = ("<pad>", "<oov>") + tuple(sorted(characters, key=lambda c: (-_PLAY["train"].count(c), c)))
    decode = lambda row: "".join(tokens[i] if i > 1 else "" for i in row)  # noqa: E731
    windows = {decode(row) for row in np.asarray(population.x)}
    assert windows == {_PLAY["train"][i: i + length] for i in range(0, targets, length)}
    # The test text's characters unseen in training ('M', 'Z', ...) are out of vocabulary: masked as targets.
    unseen = [c for c in _PLAY["test"][1:] if c not in characters]
    assert unseen and int((np.asarray(test.y) == text.MASKED).sum()) == len(unseen) + (-(len(_PLAY["test"]) - 1)) % 8
    assert decode(np.asarray(test.x)[0]) == "".join(c for c in _PLAY["test"][:8] if c in characters)
    with pytest.raises(ValueError, match="'iid', 'quantity_skew' or 'flwr' for tiny_shakespeare"):
        from_dict({"data": {"dataset": "tiny_shakespeare", "partition": "dirichlet"}, "model": {"name": "lstm"}})
    with pytest.raises(ValueError, match="model.name='mlp' does not fit data.dataset='tiny_shakespeare'"):
        from_dict({"data": {"dataset": "tiny_shakespeare", "partition": "iid"}, "model": {"name": "mlp"}})


def test_any_tfds_text_dataset_reads_as_words_when_text_level_says_so(shakespeare_dir, tmp_path):
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import load_population

    config = from_dict({"data": {"dataset": "tfds:tiny_shakespeare", "data_dir": shakespeare_dir, "text_level": "word",
                                 "partition": "iid", "num_clients": 2, "sequence_length": 4},
                        "model": {"name": "transformer"}, "server": {"clients_per_round": 2}})
    _, _, vocabulary_size = load_population(config)
    words = {"first", "citizen", ":", "before", "we", "proceed", "any", "further", ",", "hear", "me", "speak", ".",
             "all"}
    assert vocabulary_size == 2 + len(words)
    with pytest.raises(FileNotFoundError, match="tiny_shakespeare.*download=True"):
        load_population(from_dict({"data": {"dataset": "tiny_shakespeare", "data_dir": str(tmp_path),
                                            "partition": "iid"}, "model": {"name": "lstm"}}))
