"""Hugging Face datasets (``hf:``) and Flower Datasets' partitioners (``data.partition: flwr``), both optional
extras: the same data as the built-in sources, the partitioners' own splits, and clear errors."""

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from fedjaxpriv.config import ExperimentConfig, with_overrides  # noqa: E402
from fedjaxpriv.data import Dataset  # noqa: E402
from fedjaxpriv.data.sources import load_digits  # noqa: E402
from fedjaxpriv.experiment import load_population  # noqa: E402


def config(*overrides):
    return with_overrides(ExperimentConfig(), ["server.clients_per_round=1", *overrides])


@pytest.fixture(scope="module")
def saved_digits(tmp_path_factory):
    """Digits as a Hugging Face DatasetDict written by ``save_to_disk``."""
    train, test = load_digits()
    path = str(tmp_path_factory.mktemp("hf") / "digits")
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": train.x.tolist(), "label": train.y}),
        "test": datasets.Dataset.from_dict({"image": test.x.tolist(), "label": test.y}),
    }).save_to_disk(path)
    return path


def test_a_saved_dataset_gives_exactly_the_builtin_digits_population(saved_digits):
    population, test, classes = load_population(config(f"data.dataset=hf:{saved_digits}"))
    reference, reference_test, reference_classes = load_population(ExperimentConfig())
    assert classes == reference_classes == 10
    for got, want in zip(population, reference):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(test.x, reference_test.x)
    np.testing.assert_array_equal(test.y, reference_test.y)


def test_a_folder_of_parquet_files_read_by_datasets_gives_exactly_the_builtin_digits_population(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    train, test = load_digits()
    (tmp_path / "digits").mkdir()
    for split, data in (("train", train), ("test", test)):  # datasets names the splits by the files' names
        pq.write_table(pa.table({"image": data.x.tolist(), "label": data.y}), tmp_path / "digits" / f"{split}.parquet")
    population, test_set, classes = load_population(config(f"data.dataset=hf:{tmp_path / 'digits'}",
                                                           f"data.data_dir={tmp_path / 'cache'}"))
    reference, reference_test, _ = load_population(ExperimentConfig())
    assert classes == 10
    for got, want in zip(population, reference):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(test_set.x, reference_test.x)


def test_an_image_folder_reads_its_pixels_exactly_and_its_class_folders_as_labels(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    written = {}
    for split, per_class in (("train", 3), ("test", 1)):
        for label, name in enumerate(("cat", "dog")):
            (tmp_path / "folder" / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "folder" / split / name / f"{i}.png")
                written.setdefault(split, []).append((pixels.tobytes(), label))
    population, test, classes = load_population(config(
        f"data.dataset=hf:{tmp_path / 'folder'}", f"data.data_dir={tmp_path / 'cache'}", "data.partition=iid",
        "data.num_clients=2"))
    assert classes == 2 and population.x.shape == (6, 5, 4, 3) and population.counts.tolist() == [3, 3]
    as_read = sorted((np.rint(x * 255).astype(np.uint8).tobytes(), int(y)) for x, y in zip(population.x, population.y))
    assert as_read == sorted(written["train"])
    assert sorted(zip((np.rint(x * 255).astype(np.uint8).tobytes() for x in test.x), test.y.tolist())) == sorted(
        written["test"])


def test_unreadable_sources_are_named_with_what_to_do(tmp_path, saved_digits):
    with pytest.raises(FileNotFoundError, match="'someone/absent' is not in the local cache.*data.download=true"):
        load_population(config("data.dataset=hf:someone/absent", f"data.data_dir={tmp_path}"))
    train_only = tmp_path / "train_only"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": [[0.0]], "label": [0]})}).save_to_disk(
        str(train_only))
    with pytest.raises(ValueError, match=r"has no split\(s\) \['test'\]; it has \['train'\]"):
        load_population(config(f"data.dataset=hf:{train_only}"))
    with pytest.raises(ValueError, match=r"data.image_key='pixels' is not a column .*columns: \['image', 'label'\]"):
        load_population(config(f"data.dataset=hf:{saved_digits}", "data.image_key=pixels"))


# -- Flower Datasets' partitioners ---------------------------------------------------------------------------

def test_a_configured_flower_partitioner_gives_its_own_partitions_as_clients(saved_digits):
    partitioners = pytest.importorskip("flwr_datasets.partitioner")
    train, _ = load_digits()
    population, _, _ = load_population(config("data.partition=flwr", "data.flwr_partitioner=DirichletPartitioner",
                                              "data.num_clients=8", "data.dirichlet_alpha=0.3", "run.seed=4"))
    # The same partitioner, built by hand over the labels, is the reference.
    reference = partitioners.DirichletPartitioner(num_partitions=8, partition_by="label", alpha=0.3, seed=4)
    reference.dataset = datasets.Dataset.from_dict({"label": train.y})
    for client in range(8):
        labels = reference.load_partition(client)["label"]
        np.testing.assert_array_equal(population.client(client).y, labels)
    assert population.counts.sum() == len(train.y)
    # Without labels (next-token targets [N, L]) a partitioner that ignores them still splits every example once.
    from fedjaxpriv.data.flower import partition_with

    tokens = Dataset(np.arange(40, dtype=np.int32).reshape(10, 4), np.arange(40, dtype=np.int32).reshape(10, 4))
    split = partition_with(partitioners.IidPartitioner(num_partitions=3), tokens)
    assert split.x.dtype == np.int32 and split.counts.tolist() == [4, 3, 3]
    assert sorted(split.x[:, 0].tolist()) == list(range(0, 40, 4))


def test_flower_partitioners_the_config_cannot_build_or_that_overlap_are_refused():
    partitioners = pytest.importorskip("flwr_datasets.partitioner")
    from fedjaxpriv.data.flower import partition_with

    with pytest.raises(ValueError, match=r"'SizePartitioner' needs \['partition_sizes'\].*partition_with"):
        load_population(config("data.partition=flwr", "data.flwr_partitioner=SizePartitioner"))
    with pytest.raises(ValueError, match="'Dirichlet' is not a Flower Datasets partitioner; allowed: .*'IidPartitioner'"):
        load_population(config("data.partition=flwr", "data.flwr_partitioner=Dirichlet"))
    with pytest.raises(ValueError, match="data.flwr_partitioner=None is invalid"):
        config("data.partition=flwr")
    # The Python route takes any arguments: sizes as given.
    train, _ = load_digits()
    sizes = [5, 100, 20]
    with pytest.warns(UserWarning, match=f"left {len(train.y) - 125} of {len(train.y)} examples out"):
        assert partition_with(partitioners.SizePartitioner(sizes), train).counts.tolist() == sizes

    class Overlapping(partitioners.IidPartitioner):
        def load_partition(self, partition_id):
            return self.dataset.select(range(0, 3))  # every partition the same rows

    with pytest.raises(ValueError, match="Overlapping put example 0 in 2 partitions"):
        partition_with(Overlapping(num_partitions=2), train)
