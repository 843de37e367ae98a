"""An experiment on a tfds dataset read offline from a local data_dir, through the same loading code."""

import numpy as np
import pytest

from fedjaxpriv.config import from_dict
from fedjaxpriv.experiment import Experiment

tfds_test = pytest.importorskip("tests.data.test_tfds_source")


@pytest.mark.slow
def test_experiment_trains_on_a_local_tfds_dataset(tmp_path):
    data_dir = str(tmp_path / "tfds")
    builder = tfds_test.TinyColorImages(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    config = from_dict({"data": {"dataset": f"tfds:{builder.name}", "data_dir": data_dir, "image_key": "picture",
                                 "label_key": "digit", "num_clients": 4, "partition": "iid"},
                        "server": {"clients_per_round": 4}, "run": {"rounds": 2}})
    exp = Experiment(config)
    train, _ = tfds_test._split_arrays("train")
    assert exp.population.num_examples == train.shape[0]
    assert exp.population.input_shape == train.shape[1:]
    # Partitioning permutes examples: compare the multiset of pixel values exactly.
    np.testing.assert_allclose(np.sort(exp.population.x.ravel()), np.sort((train / 255.0).ravel()), atol=1e-7)
    results = exp.run(progress=False)
    # The recorded test accuracy is the final model's on the local copy's test split, computed here directly.
    images, labels = tfds_test._split_arrays("test")
    predicted = np.argmax(np.asarray(exp.model.apply(results.params, images.astype(np.float32) / 255.0)), -1)
    assert len(results.history) == 2
    assert results.final("test_accuracy") == pytest.approx(np.mean(predicted == labels), abs=1e-6)


def test_missing_local_tfds_dataset_fails_before_training(tmp_path):
    config = from_dict({"data": {"dataset": "mnist", "data_dir": str(tmp_path)}})
    with pytest.raises(FileNotFoundError, match="mnist"):
        Experiment(config)
