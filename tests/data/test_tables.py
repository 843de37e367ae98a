"""Any local dataset in Parquet or Arrow files: the same FederatedData as the built-in sources, natural partitions
by a client column, Hugging Face image structs, text rows, and clear errors."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from fedjaxpriv.config import ExperimentConfig, with_overrides
from fedjaxpriv.data import text
from fedjaxpriv.data.sources import load_digits
from fedjaxpriv.experiment import load_population


def write(path, columns, kind="parquet"):
    table = pa.table(columns)
    if kind == "parquet":
        pq.write_table(table, path)
    else:
        feather.write_feather(table, path)
    return str(path)


def config(*overrides):
    return with_overrides(ExperimentConfig(), ["server.clients_per_round=1", *overrides])


@pytest.mark.slow
def test_digits_from_parquet_or_arrow_files_give_exactly_the_builtin_population(tmp_path):
    train, test = load_digits()
    for kind, suffix in (("parquet", "parquet"), ("arrow", "arrow")):
        halves = [write(tmp_path / f"train-{i}.{suffix}", {"image": train.x[part].tolist(), "label": train.y[part]},
                        kind) for i, part in enumerate((slice(0, 700), slice(700, None)))]  # two files
        test_file = write(tmp_path / f"test.{suffix}", {"image": test.x.tolist(), "label": test.y}, kind)
        population, test_set, classes = load_population(config(
            f"data.dataset={kind}", f"data.train_files=[{tmp_path}/train-*.{suffix}]",
            f"data.test_files=[{test_file}]"))
        reference, reference_test, reference_classes = load_population(with_overrides(ExperimentConfig(), []))
        assert classes == reference_classes == 10 and halves
        for got, want in zip(population, reference):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(test_set.x, reference_test.x)
        np.testing.assert_array_equal(test_set.y, reference_test.y)


def test_a_client_column_gives_one_client_per_value_in_row_order_and_string_labels_are_numbered(tmp_path):
    rows = {"features": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 0.0]],
            "label": ["cat", "dog", "cat", "bird", "dog"], "user": ["u2", "u1", "u2", "u3", "u1"]}
    train = write(tmp_path / "train.parquet", rows)
    test = write(tmp_path / "test.parquet", {"features": [[0.5, 0.5]], "label": ["dog"], "user": ["u1"]})
    base = ["data.dataset=parquet", f"data.train_files=[{train}]", f"data.test_files=[{test}]",
            "data.image_key=features", "data.client_column=user", "data.partition=natural"]
    population, test_set, classes = load_population(config(*base, "data.num_clients=3"))
    assert classes == 3 and population.counts.tolist() == [2, 2, 1]  # u1, u2, u3
    np.testing.assert_array_equal(population.client(0).x, [[3.0, 4.0], [9.0, 0.0]])
    assert population.client(0).y.tolist() == [2, 2] and population.client(2).y.tolist() == [0]  # bird cat dog
    assert test_set.y.tolist() == [2]
    subset, _, _ = load_population(config(*base, "data.num_clients=2", "run.seed=3"))
    assert subset.num_clients == 2 and subset.num_examples in (3, 4)
    with pytest.raises(ValueError, match=r"data.num_clients=4 but data.client_column='user''s number of distinct "
                                         r"values has 3"):
        load_population(config(*base, "data.num_clients=4"))


def test_hugging_face_image_structs_are_decoded(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 6, 5), dtype=np.uint8)

    def png(image):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    train = write(tmp_path / "train.parquet", {"img": [png(p) for p in pixels], "label": [0, 1, 1]})
    population, test_set, classes = load_population(config(
        "data.dataset=parquet", f"data.train_files=[{train}]", f"data.test_files=[{train}]", "data.image_key=img",
        "data.num_clients=1"))
    assert classes == 2 and population.x.shape == (3, 6, 5, 1)
    np.testing.assert_allclose(np.sort(population.x.reshape(3, -1), axis=0),
                               np.sort(pixels.reshape(3, -1).astype(np.float32) / 255, axis=0))


def test_text_rows_become_next_token_sequences_with_a_training_vocabulary(tmp_path):
    rows = ["the cat sat", "the dog ran far away", "a cat ran"]
    train = write(tmp_path / "train.parquet", {"text": rows, "user": [1, 2, 1]})
    test = write(tmp_path / "test.parquet", {"text": ["the bird sat"], "user": [1]})
    population, test_set, classes = load_population(config(
        "data.dataset=parquet", f"data.train_files=[{train}]", f"data.test_files=[{test}]", "data.image_key=text",
        "data.client_column=user", "data.num_clients=2", "data.text_level=word", "data.sequence_length=3",
        "model.name=lstm"))
    vocabulary = text.build_vocabulary(rows, "word", 10_000)
    assert classes == len(vocabulary)
    expected = [text.sequences(vocabulary.encode(r), 3) for r in rows]
    np.testing.assert_array_equal(population.client(0).x, np.concatenate([expected[0][0], expected[2][0]]))
    np.testing.assert_array_equal(population.client(1).y, expected[1][1])
    assert test_set.y.tolist() == [[text.MASKED, vocabulary.tokens.index("sat"), text.MASKED]]  # "bird" unseen


def test_bad_table_inputs_are_errors_naming_the_field(tmp_path):
    train = write(tmp_path / "train.parquet", {"x": [[1.0], [2.0, 3.0]], "label": [0, 1]})
    base = ["data.dataset=parquet", f"data.train_files=[{train}]", f"data.test_files=[{train}]", "data.num_clients=1"]
    with pytest.raises(ValueError, match=r"data.train_files / test_files=\[\[\], \[\]\] is invalid"):
        config("data.dataset=parquet")
    with pytest.raises(ValueError, match=r"data.partition='dirichlet' is invalid; allowed: 'iid', 'quantity_skew' or 'flwr' "
                                         r"for parquet text without natural clients \(e.g. data.client_column"):
        config(*base, "data.text_level=word", "model.name=lstm")
    with pytest.raises(ValueError, match=r"data.test_files: '.*nothing-\*.parquet' matches no file"):
        load_population(config(*base[:2], f"data.test_files=[{tmp_path}/nothing-*.parquet]", "data.num_clients=1"))
    with pytest.raises(ValueError, match=r"data.image_key='image' is not a column of the data; columns: \['x', "
                                         r"'label'\]"):
        load_population(config(*base))
    with pytest.raises(ValueError, match=r"column 'x' .* is neither numbers, lists of numbers of one shape"):
        load_population(config(*base, "data.image_key=x"))
    (tmp_path / "garbled.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"garbled.parquet: not readable as parquet"):
        load_population(config(*base[:2], f"data.test_files=[{tmp_path}/garbled.parquet]", "data.num_clients=1"))


@pytest.mark.slow
def test_a_parquet_text_run_trains_a_token_model_on_next_tokens(tmp_path):
    from fedjaxpriv.experiment import Experiment

    train_texts, test_texts, rule = text.keyboard_corpus(0, 6)
    train = write(tmp_path / "train.parquet", {"text": train_texts, "user": list(range(6))})
    test = write(tmp_path / "test.parquet", {"text": test_texts})
    experiment = Experiment(config(
        "data.dataset=parquet", f"data.train_files=[{train}]", f"data.test_files=[{test}]", "data.image_key=text",
        "data.client_column=user", "data.num_clients=6", "data.text_level=word", "model.name=transformer",
        "model.hidden=[16]", "server.clients_per_round=6", "run.rounds=2", "run.eval_every=2"))
    record = experiment.run(progress=False).history[-1]
    assert experiment.task.name == "next_token" and record["participants"] == 6
    keyboard = Experiment(config("data.dataset=keyboard", "data.num_clients=6", "model.name=transformer",
                                 "model.hidden=[16]", "server.clients_per_round=6", "run.rounds=2", "run.eval_every=2"))
    for got, want in zip(experiment.population, keyboard.population):  # the same users as the built-in corpus
        np.testing.assert_array_equal(got, want)
    assert record["test_loss"] == pytest.approx(keyboard.run(progress=False).history[-1]["test_loss"], rel=1e-5)
