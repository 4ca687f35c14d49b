import collections
import logging
import math
import os
import re
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

import keras_mgconv  # noqa: F401  Registers `digits` with TFDS.
from keras_mgconv import data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A fresh TFDS directory: the embedded dataset must prepare itself offline."""
    return str(tmp_path_factory.mktemp("tensorflow_datasets"))


def _arrays(dataset):
    images, labels = zip(*tfds.as_numpy(dataset))
    return np.stack(images), np.array(labels)


def test_digits_loads_through_tfds_with_fixed_splits(data_dir):
    train, info = tfds.load(
        "digits", split="train", data_dir=data_dir, as_supervised=True, with_info=True
    )
    test = tfds.load("digits", split="test", data_dir=data_dir, as_supervised=True)
    train_images, train_labels = _arrays(train)
    test_images, test_labels = _arrays(test)
    assert info.features["image"].shape == (8, 8, 1)
    # Of each digit's images in scikit-learn's order, every fifth is a test image.
    digits = load_digits()
    expected = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    rank = np.array(
        [np.sum(digits.target[: i + 1] == label) for i, label in enumerate(digits.target)]
    )
    is_test = rank % 5 == 0
    assert (
        (len(train_labels), len(test_labels))
        == (1442, 355)
        == (int((~is_test).sum()), int(is_test.sum()))
    )
    assert np.bincount(test_labels, minlength=10).min() >= 34
    assert np.bincount(train_labels, minlength=10).min() >= 140
    order = np.lexsort(test_images.reshape(len(test_images), -1).T)
    expected_order = np.lexsort(expected[is_test].reshape(int(is_test.sum()), -1).T)
    np.testing.assert_array_equal(test_images[order], expected[is_test][expected_order])
    np.testing.assert_array_equal(test_labels[order], digits.target[is_test][expected_order])
    train_rows = {image.tobytes() for image in train_images}
    assert train_rows.isdisjoint(image.tobytes() for image in test_images)


def test_dataset_info(data_dir):
    info = data.image_dataset_info("digits", data_dir)
    assert info.image_shape == (8, 8, 1)
    assert info.num_classes == 10
    assert (info.train_split, info.test_split) == ("train", "test")
    assert info.num_examples == {"train": 1442, "test": 355}
    assert not info.flippable  # A mirrored digit is another symbol.


def test_evaluation_pipeline_gives_the_images_in_order_as_float(data_dir):
    batches = data.image_pipeline("digits", "test", 100, data_dir=data_dir)
    images, labels = map(np.concatenate, zip(*tfds.as_numpy(batches)))
    raw_images, raw_labels = _arrays(
        tfds.load("digits", split="test", data_dir=data_dir, as_supervised=True)
    )
    assert images.dtype == np.float32 and images.shape == (355, 8, 8, 1)
    np.testing.assert_array_equal(images, raw_images.astype(np.float32))
    np.testing.assert_array_equal(labels, raw_labels)


def test_training_pipeline_shuffles_and_augments(data_dir):
    batches = data.image_pipeline("digits", "train", 1442, training=True, seed=3, data_dir=data_dir)
    images, labels = next(iter(batches))
    raw_images, raw_labels = _arrays(
        tfds.load("digits", split="train", data_dir=data_dir, as_supervised=True)
    )
    assert images.shape == (1442, 8, 8, 1)
    assert not np.array_equal(labels, raw_labels)
    assert sorted(labels.numpy()) == sorted(raw_labels)
    # Pad by 1 and crop back: every image is its original shifted by at most one pixel.
    padded = np.pad(raw_images, [(0, 0), (1, 1), (1, 1), (0, 0)]).astype(np.float32)
    originals = {
        image.tobytes(): index for index, image in enumerate(raw_images.astype(np.float32))
    }
    shifted = 0
    for image, label in zip(images.numpy(), labels.numpy()):
        crops = [padded[:, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
        matches = [np.flatnonzero((crop == image).all(axis=(1, 2, 3))) for crop in crops]
        assert any(raw_labels[m].tolist().count(label) for m in matches if len(m))
        shifted += image.tobytes() not in originals
    assert shifted > 500


def test_epoch_stream_is_fixed_by_seed_and_epoch(data_dir):
    def batches(epochs, seed=0):
        stream = data.image_pipeline(
            "digits",
            "train",
            64,
            training=True,
            seed=seed,
            drop_remainder=True,
            epochs=epochs,
            data_dir=data_dir,
        )
        return [images.numpy() for images, _ in stream]

    two_epochs = batches(range(2, 4))
    assert len(two_epochs) == 2 * (1442 // 64)
    # However often it is rebuilt or restarted, and from whichever epoch it starts.
    np.testing.assert_array_equal(np.stack(two_epochs), np.stack(batches(range(2, 4))))
    np.testing.assert_array_equal(np.stack(two_epochs[22:]), np.stack(batches(range(3, 4))))
    assert not np.array_equal(two_epochs[0], two_epochs[22])
    assert not np.array_equal(two_epochs[0], batches(range(2, 3), seed=1)[0])


def test_epoch_stream_is_built_once_whatever_the_epoch_count(data_dir):
    def first_batch(epochs):
        return next(
            iter(
                data.image_pipeline(
                    "digits",
                    "train",
                    64,
                    training=True,
                    seed=0,
                    drop_remainder=True,
                    epochs=epochs,
                    data_dir=data_dir,
                )
            )
        )[0].numpy()

    start = time.perf_counter()
    # One dataset per epoch took 45 s for 2,000 epochs, and never ended for these.
    many = first_batch(range(5, 10**12))
    assert time.perf_counter() - start < 10
    np.testing.assert_array_equal(many, first_batch(range(5, 6)))


def test_pipeline_adapts_size_and_channels(data_dir):
    images, _ = next(
        iter(data.image_pipeline("digits", "test", 4, image_shape=(16, 16, 3), data_dir=data_dir))
    )
    assert images.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    with pytest.raises(ValueError, match=r"1-channel images.*image_shape=\(8, 8, 4\)"):
        data.image_pipeline("digits", "test", 4, image_shape=(8, 8, 4), data_dir=data_dir)


def test_normalization_layer_has_the_training_statistics(data_dir):
    layer = data.normalization_layer("digits", data_dir=data_dir)
    layer.build((None, 8, 8, 1))
    images, _ = _arrays(tfds.load("digits", split="train", data_dir=data_dir, as_supervised=True))
    np.testing.assert_allclose(np.ravel(layer.mean), [images.mean()], rtol=1e-4)
    np.testing.assert_allclose(np.ravel(layer.variance), [images.var()], rtol=1e-4)
    normalized = layer(tf.constant(images[:500], tf.float32))
    assert abs(float(tf.reduce_mean(normalized))) < 0.1


def test_unknown_dataset_is_refused():
    with pytest.raises(
        ValueError, match=r"no dataset named 'no_such_data'.*dataset='no_such_data'"
    ):
        data.image_dataset_info("no_such_data")


class _TwoClassesOfTinyImages:
    """The `_info` of the test builders: 4x4 grayscale images of two classes.

    A mixin, not a builder: TFDS would register a builder subclass by name.
    """

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(4, 4, 1)),
                    "label": tfds.features.ClassLabel(num_classes=2),
                }
            ),
            supervised_keys=("image", "label"),
        )


class UnreachableImages(_TwoClassesOfTinyImages, tfds.core.GeneratorBasedBuilder):
    """Downloads from a host that cannot resolve anywhere (RFC 6761 `.invalid`)."""

    VERSION = tfds.core.Version("1.0.0")

    def _split_generators(self, dl_manager):
        path = dl_manager.download("https://keras-mgconv-test.invalid/images.tar.gz")
        return {"train": self._generate_examples(path)}

    def _generate_examples(self, path):
        yield 0, {"image": np.zeros((4, 4, 1), np.uint8), "label": 0}


class UnreachableImagesConfig(tfds.core.BuilderConfig):
    pass


class UnreachableConfiguredImages(UnreachableImages):
    """A dataset with configs, as imagenette: TFDS writes its `.config/metadata.json` first."""

    BUILDER_CONFIGS = [UnreachableImagesConfig(name="small")]


class HandDownloadedImages(UnreachableImages):
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put images.tar in the manual folder."

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(dl_manager.manual_dir / "images.tar")}


def _folders(top):
    return {
        os.path.relpath(os.path.join(parent, name), top)
        for parent, names, _ in os.walk(top)
        for name in names
    }


def test_undownloadable_dataset_fails_fast_and_says_how_to_provide_it(tmp_path):
    for _ in range(2):
        start = time.perf_counter()
        with pytest.raises(ValueError) as error:
            data.image_dataset_info("unreachable_images", data_dir=str(tmp_path))
        assert time.perf_counter() - start < 30
    message = str(error.value)
    assert "'unreachable_images' is not prepared in" in message
    assert "cannot be downloaded" in message and "data_dir" in message
    assert "manual_dir" in message
    # No empty folder of the failed downloads, nor a lock file, is left behind.
    assert _folders(tmp_path) == set()
    assert not [name for _, _, files in os.walk(tmp_path) for name in files]


def test_failed_first_use_of_a_new_data_dir_leaves_nothing_behind(tmp_path, capsys, caplog):
    """Neither the files of a dataset with configs, nor the data directory it created.

    Nor a line before the error: TFDS' progress bars and urllib3's retries
    were a dozen. The error names the dataset with its config, and its cause whole.
    """
    with pytest.raises(ValueError) as error:
        data.image_dataset_info(
            "unreachable_configured_images/small",
            data_dir=str(tmp_path / "new" / "tensorflow_datasets"),
        )
    assert os.listdir(tmp_path) == []
    assert capsys.readouterr() == ("", "")
    assert not [
        record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING
    ]
    message = str(error.value)
    assert message.startswith("Dataset 'unreachable_configured_images/small' is not prepared")
    assert "cannot be downloaded (ConnectionError: " in message
    assert "host='keras-mgconv-test.invalid', port=443)" in message
    assert message.endswith("Received: dataset='unreachable_configured_images/small'.")


def test_preparation_that_takes_a_while_shows_tfds_progress_bars(tmp_path, capsys, monkeypatch):
    # Preparing the digits takes about a second: bars due at once.
    monkeypatch.setattr(data, "_PROGRESS_DELAY", 0.0)
    data.image_dataset_info("digits", str(tmp_path))
    assert "Generating splits" in capsys.readouterr().err


def test_new_data_dir_is_created_and_said_so(tmp_path, capsys, monkeypatch):
    # However slow the machine, no progress bar between the lines compared.
    monkeypatch.setattr(data, "_PROGRESS_DELAY", math.inf)
    data_dir = tmp_path / "new" / "tensorflow_datasets"
    assert data.image_dataset_info("digits", str(data_dir)).num_examples["test"] == 355
    assert capsys.readouterr().err == (
        f"Created {data_dir}, the data directory (`data_dir`), which did not exist, and "
        f"prepared dataset 'digits' in it.\n"
    )
    data.image_dataset_info("digits", str(data_dir))
    assert capsys.readouterr().err == ""


def test_two_first_uses_of_a_data_dir_at_once_both_succeed(tmp_path):
    start = threading.Barrier(2)
    results = []

    def first_use():
        start.wait()
        try:
            results.append(data.image_dataset_info("digits", str(tmp_path)).num_examples)
        except ValueError as error:
            results.append(error)

    threads = [threading.Thread(target=first_use) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [{"train": 1442, "test": 355}] * 2
    assert not [name for _, _, files in os.walk(tmp_path) for name in files if "lock" in name]


def test_preparing_the_embedded_dataset_is_quiet(tmp_path, capsys, caplog):
    data.image_dataset_info("digits", str(tmp_path))
    out, err = capsys.readouterr()
    assert (out, err) == ("", "")
    assert not [
        record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING
    ]


def test_data_dir_that_is_not_a_folder_is_reported(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(
        ValueError,
        match=r"'digits' could not be prepared in .*file.*Error: "
        r".*Received: dataset='digits', data_dir=",
    ):
        data.image_dataset_info("digits", str(not_a_folder))


@pytest.mark.parametrize(
    "dataset, reason",
    [
        ("digits:9.9.9", "cannot be loaded at version 9.9.9, only: 1.0.0"),
        ("digits:1.0", "Parsing builder name string digits:1.0 failed"),
        ("digits/nine", "BuilderConfig nine not found"),
    ],
)
def test_unknown_version_or_config_is_one_line(dataset, reason):
    with pytest.raises(ValueError) as error:
        data.image_dataset_info(dataset)
    message = str(error.value)
    assert message.startswith("Invalid value for argument `dataset`: ")
    assert reason in message and message.endswith(f"Received: dataset={dataset!r}.")
    assert "\n" not in message


def test_manual_dataset_says_where_its_files_go(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"must be downloaded by hand.*manual_dir.*"
        r"Put images.tar in the manual folder",
    ):
        data.image_dataset_info("hand_downloaded_images", data_dir=str(tmp_path))


def test_bad_batch_size_is_refused(data_dir):
    with pytest.raises(ValueError, match="batch_size=0"):
        data.image_pipeline("digits", "test", 0, data_dir=data_dir)


@pytest.mark.parametrize("split", ["train[:0]", "test[5:5]"])
def test_split_without_examples_is_refused(data_dir, split):
    with pytest.raises(
        ValueError, match=re.escape(f"holds no examples. Received: split={split!r}.")
    ):
        data.image_pipeline("digits", split, 32, data_dir=data_dir)


def test_batch_larger_than_memory_is_refused_at_once(data_dir):
    start = time.perf_counter()
    # tf.data allocated the 25.6 GB of the batch and retried for a minute.
    with pytest.raises(ValueError, match=re.escape("more than this machine's")) as error:
        data.image_pipeline(
            "digits",
            "train",
            64,
            training=True,
            drop_remainder=True,
            image_shape=(100_000, 100_000, 1),
            data_dir=data_dir,
        )
    assert "Received: batch_size=64, image_shape=(100000, 100000, 1)." in str(error.value)
    assert time.perf_counter() - start < 10
    # A batch larger than the split is the split: the memory of its images alone.
    images, _ = next(iter(data.image_pipeline("digits", "test", 10**8, data_dir=data_dir)))
    assert images.shape[0] == 355


def _examples_of(batches):
    """The (image bytes, label) pairs in batches of numpy arrays, as a multiset."""
    return collections.Counter(
        (image.tobytes(), int(label))
        for images, labels in batches
        for image, label in zip(images, labels)
    )


def _pipeline_examples(*args, **kwargs):
    return _examples_of(tfds.as_numpy(data.image_pipeline(*args, **kwargs)))


def test_validation_split_is_a_fixed_stratified_part_of_train(data_dir):
    fit, validation, description = data.validation_splits("digits", data_dir)
    assert description == str(validation) == "10% of 'train', stratified"
    train = _pipeline_examples("digits", "train", 512, data_dir=data_dir)
    fitted = _pipeline_examples("digits", fit, 512, data_dir=data_dir)
    held_out = _pipeline_examples("digits", validation, 512, data_dir=data_dir)
    # Disjoint, and together the whole train split: every example once.
    assert fitted + held_out == train
    assert data.split_size("digits", fit, data_dir) == fitted.total()
    assert data.split_size("digits", validation, data_dir) == held_out.total()
    per_class = np.bincount([label for _, label in held_out.elements()])
    class_sizes = np.bincount([label for _, label in train.elements()])
    assert np.all(np.abs(per_class - 0.1 * class_sizes) <= 0.5)
    # The same parts whatever the seed, in every epoch, and after the choice is made again.
    data._validation_mask.cache_clear()
    for seed in (1, 2):
        epochs = data.image_pipeline(
            "digits",
            fit,
            fitted.total(),
            training=True,
            augment=False,
            seed=seed,
            epochs=range(2),
            data_dir=data_dir,
        )
        for images, labels in tfds.as_numpy(epochs):
            assert _examples_of([(images, labels)]) == fitted


def test_pipelines_and_statistics_of_the_parts(data_dir):
    fit, validation, _ = data.validation_splits("digits", data_dir, fraction=0.25)
    assert str(fit) == "'train' less a stratified 25% for validation"
    size = data.split_size("digits", fit, data_dir)
    assert size + data.split_size("digits", validation, data_dir) == 1442
    assert abs(size - 0.75 * 1442) <= 10
    batches = data.image_pipeline(
        "digits",
        fit,
        64,
        training=True,
        drop_remainder=True,
        seed=0,
        epochs=range(3),
        data_dir=data_dir,
    )
    assert int(batches.cardinality()) == 3 * (size // 64)
    assert sum(1 for _ in batches) == 3 * (size // 64)
    assert int(data.image_pipeline("digits", validation, 64, data_dir=data_dir).cardinality()) == (
        -(-(1442 - size) // 64)
    )
    layer = data.normalization_layer("digits", data_dir=data_dir, split=fit)
    layer.build((None, 8, 8, 1))
    images = np.stack(
        [
            np.frombuffer(image, np.float32)
            for image, _ in _pipeline_examples("digits", fit, 512, data_dir=data_dir).elements()
        ]
    )
    np.testing.assert_allclose(np.ravel(layer.mean), [images.mean()], rtol=1e-4)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan"), True, "0.1", None])
def test_fraction_out_of_range_is_refused(fraction):
    with pytest.raises(ValueError, match=r"`fraction`.*Received: fraction="):
        data.validation_splits("digits", fraction=fraction)


@pytest.mark.parametrize("fraction, empty", [(0.001, "validation"), (0.999, "fit")])
def test_fraction_that_empties_a_part_is_refused(data_dir, fraction, empty):
    with pytest.raises(ValueError, match=rf"leaves the {empty} part empty.*fraction={fraction}"):
        data.validation_splits("digits", data_dir, fraction=fraction)


class ThreeSplitImages(_TwoClassesOfTinyImages, tfds.core.GeneratorBasedBuilder):
    """Train, validation and test splits, like cifar10 would have with a validation split."""

    VERSION = tfds.core.Version("1.0.0")
    TEST_LABEL = 1

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(20, 0),
            "validation": self._generate_examples(6, 0),
            "test": self._generate_examples(4, self.TEST_LABEL),
        }

    def _generate_examples(self, count, label):
        for index in range(count):
            yield index, {"image": np.full((4, 4, 1), index, np.uint8), "label": label}


class UnlabelledTestImages(ThreeSplitImages):
    """imagenet2012's splits: its test images have no labels (-1)."""

    TEST_LABEL = -1


def test_own_validation_split_is_used_where_it_is_not_the_test_split(tmp_path):
    data_dir = str(tmp_path)
    assert data.validation_splits("three_split_images", data_dir) == (
        "train",
        "validation",
        "validation",
    )
    assert data.image_dataset_info("unlabelled_test_images", data_dir).test_split == "validation"
    fit, validation, description = data.validation_splits("unlabelled_test_images", data_dir)
    assert (fit.split, validation.split) == ("train", "train")
    assert description == "10% of 'train', stratified"
    assert data.split_size("unlabelled_test_images", validation, data_dir) == 2
