"""Plain `fit` then `evaluate` scores the trained weights (issue 17): PreciseBatchNormModel."""

import re
import warnings

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

from keras_mgconv import batch_norm, models
from keras_mgconv._keras import keras
from keras_mgconv.batch_norm import PreciseBatchNormModel


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = (data.images[..., None] / 16).astype("float32")
    return (images[:1200], data.target[:1200]), (images[1200:], data.target[1200:])


@pytest.mark.parametrize("multigrid", [False, "layer", "block"])
def test_every_design_is_a_precise_batch_norm_model(multigrid):
    assert isinstance(
        models.CIFARResNet(8, input_shape=(8, 8, 1), multigrid=multigrid, group_size=8),
        PreciseBatchNormModel,
    )
    assert isinstance(
        models.MobileNetV2(
            (32, 32, 3), alpha=0.5, classes=2, multigrid=bool(multigrid), group_size=8
        ),
        PreciseBatchNormModel,
    )


def test_fit_then_evaluate_scores_as_with_recomputed_statistics(digits):
    # A short Adam run with Keras' default momentum 0.99: the moving averages
    # still hold most of their initial values (0.99 ** 38 = 0.68), and before
    # PreciseBatchNormModel `evaluate` scored far below the trained weights
    # (0.36 against 0.92 here). Baseline only: the multigrid designs share
    # `finish_model` and take minutes to train on 2 cores.
    (train_images, train_labels), (test_images, test_labels) = digits
    keras.utils.set_random_seed(0)
    model = models.CIFARResNet(
        8, input_shape=(8, 8, 1), multigrid=False, classifier_activation=None
    )
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(train_images, train_labels, batch_size=64, epochs=2, verbose=0)
    _, after_fit = model.evaluate(test_images, test_labels, verbose=0)
    batch_norm.recompute_batch_norm_statistics(
        model, tf.data.Dataset.from_tensor_slices(train_images).shuffle(1200, seed=0).batch(64)
    )
    _, recomputed = model.evaluate(test_images, test_labels, verbose=0)
    assert recomputed > 0.6  # It trained.
    assert after_fit == pytest.approx(recomputed, abs=0.03)


def small_model():
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.99)(x)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    model = PreciseBatchNormModel(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def regression_data(count=64):
    rng = np.random.default_rng(0)
    images = rng.normal(1.5, 2.0, (count, 6, 6, 3)).astype("float32")
    return images, rng.normal(size=(count, 2)).astype("float32")


def moments_of_batch_norm_input(model, images):
    conv_output = model.layers[1](images).numpy()
    return conv_output.mean(axis=(0, 1, 2)), conv_output.var(axis=(0, 1, 2))


def test_statistics_after_fit_are_those_of_the_final_weights():
    model = small_model()
    images, targets = regression_data()
    model.fit(images, targets, batch_size=64, epochs=3, verbose=0)
    mean, variance = moments_of_batch_norm_input(model, images)  # One batch: all 64 images.
    np.testing.assert_allclose(model.layers[2].moving_mean, mean, rtol=1e-4, atol=1e-5)
    # tf_keras updates with the unbiased variance: n / (n - 1) = 1.0004 here.
    np.testing.assert_allclose(model.layers[2].moving_variance, variance, rtol=1e-3)


def test_statistics_come_from_the_training_part_of_a_validation_split():
    model = small_model()
    images, targets = regression_data()
    images[48:] += 100.0  # The validation part, which must not count.
    history = model.fit(images, targets, batch_size=48, epochs=2, validation_split=0.25, verbose=0)
    mean, _ = moments_of_batch_norm_input(model, images[:48])
    np.testing.assert_allclose(model.layers[2].moving_mean, mean, rtol=1e-4, atol=1e-5)
    # The last validation judged the final weights with these statistics.
    assert history.history["val_loss"][-1] == pytest.approx(
        model.evaluate(images[48:], targets[48:], verbose=0), rel=1e-5
    )


def test_moving_averages_stay_where_asked_or_where_data_cannot_be_read_again():
    images, targets = regression_data()
    model = small_model()
    model.batch_norm_statistics_batches = 0
    model.fit(images, targets, batch_size=64, epochs=1, verbose=0)
    # One step of momentum 0.99 from Keras' initial statistics (0, 1).
    mean, _ = moments_of_batch_norm_input(model, images)
    assert np.abs(model.layers[2].moving_mean.numpy()).max() < 0.05 * np.abs(mean).max() + 1e-3

    model = small_model()
    generator = ((images[i : i + 16], targets[i : i + 16]) for i in range(0, 64, 16))
    with pytest.warns(UserWarning, match="cannot recompute"):
        model.fit(generator, epochs=1, verbose=0)


@pytest.mark.parametrize("value", [-1, 2.0, True, "50"])
def test_bad_statistics_batches_are_refused_when_set(value):
    model = small_model()
    with pytest.raises(ValueError, match=re.escape(f"batch_norm_statistics_batches={value!r}")):
        model.batch_norm_statistics_batches = value
    assert model.batch_norm_statistics_batches == 50


def test_statistics_batches_take_numpy_ints_and_survive_saving(tmp_path):
    # Once a class attribute outside the config: a loaded model reverted to 50.
    model = small_model()
    model.batch_norm_statistics_batches = np.int64(0)
    assert type(model.batch_norm_statistics_batches) is int
    path = str(tmp_path / "model.keras")
    model.save(path)
    assert keras.models.load_model(path).batch_norm_statistics_batches == 0


def test_saved_model_loads_as_a_precise_batch_norm_model(tmp_path):
    model = small_model()
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, PreciseBatchNormModel)
    images, _ = regression_data(8)
    np.testing.assert_array_equal(
        loaded.predict(images, verbose=0), model.predict(images, verbose=0)
    )


def test_fit_without_steps_leaves_the_statistics_as_they_are():
    # Keras' fit changes nothing when it runs no step; the recomputation used
    # to rewrite every statistic (a moving mean moved by 1.52).
    model = small_model()
    images, targets = regression_data()
    model.fit(images, targets, batch_size=64, epochs=1, verbose=0)
    layer = model.layers[2]
    layer.moving_mean.assign(layer.moving_mean.numpy() + 3.0)
    before = [weight.numpy() for weight in model.non_trainable_weights]
    model.fit(images, targets, batch_size=64, epochs=0, verbose=0)
    model.fit(images, targets, batch_size=64, epochs=1, initial_epoch=1, verbose=0)
    for weight, value in zip(model.non_trainable_weights, before):
        np.testing.assert_array_equal(weight.numpy(), value)


@pytest.mark.parametrize("callback", ["checkpoint", "backup"])
def test_epoch_checkpoints_hold_the_statistics_of_their_weights(tmp_path, callback):
    # Without validation the statistics used to be recomputed only at the end
    # of fit: a checkpoint of an epoch kept the moving averages.
    model = small_model()
    images, targets = regression_data()
    saved = []

    class Interrupt(keras.callbacks.Callback):
        # Stops the run after its second epoch's backup, as a killed process would.
        def on_epoch_end(self, epoch, logs=None):
            saved.append([weight.numpy() for weight in self.model.weights])
            if callback == "backup" and epoch == 1:
                raise KeyboardInterrupt

    if callback == "checkpoint":
        path = str(tmp_path / "epoch.keras")
        saving = keras.callbacks.ModelCheckpoint(path, monitor="loss")
    else:
        saving = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    try:
        model.fit(
            images, targets, batch_size=32, epochs=2, verbose=0, callbacks=[saving, Interrupt()]
        )
    except KeyboardInterrupt:
        pass
    if callback == "checkpoint":
        checkpoint = keras.models.load_model(path)
    else:
        checkpoint = small_model()
        checkpoint.load_weights(next((tmp_path / "backup").rglob("*.weights.h5")))
    mean, _ = moments_of_batch_norm_input(checkpoint, images)
    np.testing.assert_allclose(checkpoint.layers[2].moving_mean, mean, rtol=1e-4, atol=1e-4)
    for weight, value in zip(checkpoint.weights, saved[-1]):
        np.testing.assert_array_equal(weight.numpy(), value)


def batch_statistics_accuracy(model, images, labels):
    """Accuracy with every BatchNormalization using the test batch's own statistics.

    The model's layers in training mode, but for its augmentation.
    """
    layers = [
        layer
        for layer in model.layers
        if not isinstance(layer, (keras.layers.InputLayer, keras.layers.RandomTranslation))
    ]
    if not isinstance(model, keras.Sequential):
        layers = [model]

    def logits(x):
        for layer in layers:
            x = layer(x, training=True)
        return x.numpy()

    moving = [weight.numpy() for weight in model.non_trainable_weights]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="keras_mgconv: ")  # Not training.
            logits = np.concatenate(
                [logits(images[i : i + 256]) for i in range(0, len(images), 256)]
            )
    finally:
        for weight, value in zip(model.non_trainable_weights, moving):
            weight.assign(value)
    return float(np.mean(logits.argmax(-1) == labels))


def nested(pattern):
    """A factory backbone inside a model of the user's."""
    backbone = models.CIFARResNet(
        8, input_shape=(8, 8, 1), include_top=False, pooling="avg", multigrid=False
    )
    if pattern == "sequential":
        return keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.RandomTranslation(0.1, 0.1, fill_mode="constant"),
                backbone,
                keras.layers.Dense(10),
            ]
        )
    inputs = keras.Input((8, 8, 1))
    return keras.Model(inputs, keras.layers.Dense(10)(backbone(inputs)))


@pytest.mark.parametrize("pattern", ["functional", "sequential", "functional_with_callback"])
def test_a_nested_factory_model_scores_as_with_batch_statistics(digits, pattern):
    # Before, with Keras' moving averages inside the user's fit: 0.18
    # (functional) and 0.11 (Sequential with augmentation) against 0.97 with
    # batch statistics.
    (train_images, train_labels), (test_images, test_labels) = digits
    keras.utils.set_random_seed(0)
    model = nested(pattern)
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callbacks = []
        if pattern == "functional_with_callback":
            callbacks = [
                batch_norm.PreciseBatchNormalization(
                    tf.data.Dataset.from_tensor_slices(train_images).batch(64), steps=10
                )
            ]
        for epochs in (2, 1):  # Two fits: it warns once.
            model.fit(
                train_images,
                train_labels,
                batch_size=64,
                epochs=epochs,
                verbose=0,
                callbacks=callbacks,
            )
    ours = [str(w.message) for w in caught if str(w.message).startswith("keras_mgconv: ")]
    momenta = {
        layer.momentum
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    if callbacks:
        assert not ours and momenta == {0.99}  # Recomputed: nothing to change.
    else:
        assert len(ours) == 1 and "momentum 0.9, was 0.99" in ours[0]  # Once.
        assert momenta == {0.9}
    _, accuracy = model.evaluate(test_images, test_labels, verbose=0)
    expected = batch_statistics_accuracy(model, test_images, test_labels)
    assert expected > 0.6  # It trained.
    assert accuracy == pytest.approx(expected, abs=0.03)


def test_fit_on_no_data_does_what_keras_does():
    # The recomputation used to fail, naming an argument (`data`) nobody passed.
    model = small_model()
    model.fit(np.zeros((0, 6, 6, 3), "float32"), np.zeros((0, 2), "float32"), verbose=0)
    empty = tf.data.Dataset.from_tensor_slices(regression_data(0)).batch(8)
    with pytest.warns(UserWarning, match="ran out of data"):  # Keras' own warning.
        model.fit(empty, verbose=0)
