"""BatchNormalization statistics recomputed for the current weights (precise BN)."""

import re

import numpy as np
import pytest
import tensorflow as tf

from keras_mgconv import batch_norm, models
from keras_mgconv._keras import USE_LEGACY_KERAS, keras


def small_network():
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.99, name="bn1")(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv2")(x)
    x = keras.layers.BatchNormalization(momentum=0.99, name="bn2")(x)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def batches(count, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(1.5, 2.0, (size, 6, 6, 3)).astype("float32") for _ in range(count)]


def moving_variance(x):
    """The variance of `x` as training updates a moving variance with it.

    tf_keras' fused batch norm (4D inputs) updates with the unbiased variance.
    """
    count = x.size // x.shape[-1]
    correction = count / (count - 1) if USE_LEGACY_KERAS and x.ndim == 4 else 1.0
    return x.var(axis=tuple(range(x.ndim - 1))) * correction


def test_statistics_are_the_average_batch_statistics_of_the_current_weights():
    model = small_network()
    images = batches(3)
    trainable = [w.numpy() for w in model.trainable_weights]
    assert (
        batch_norm.recompute_batch_norm_statistics(
            model, tf.data.Dataset.from_tensor_slices(np.concatenate(images)).batch(16)
        )
        == 2
    )
    # Reference: the layers called one by one, eagerly, in training mode.
    conv1, bn1, conv2, bn2 = (model.get_layer(n) for n in ("conv1", "bn1", "conv2", "bn2"))
    first, second = [], []
    for batch in images:
        x = conv1(batch).numpy()
        first.append((x.mean(axis=(0, 1, 2)), moving_variance(x)))
        normalised = (x - first[-1][0]) / np.sqrt(x.var(axis=(0, 1, 2)) + bn1.epsilon)
        x = np.maximum(normalised * bn1.gamma.numpy() + bn1.beta.numpy(), 0)
        x = conv2(x).numpy()
        second.append((x.mean(axis=(0, 1, 2)), moving_variance(x)))
    for layer, moments in ((bn1, first), (bn2, second)):
        np.testing.assert_allclose(
            layer.moving_mean, np.mean([m for m, _ in moments], 0), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            layer.moving_variance, np.mean([v for _, v in moments], 0), rtol=1e-4, atol=1e-5
        )
    # The weights themselves are untouched.
    for before, after in zip(trainable, model.trainable_weights):
        np.testing.assert_array_equal(before, after.numpy())


def test_inputs_and_targets_arrays_are_taken_as_inputs_and_targets():
    # As `fit` takes them: once refused inside Keras ("expects 1 input(s), received 2").
    images = batches(1, size=32)[0]
    targets = np.zeros(32, "int32")
    for data in [(images, targets), (images, targets, np.ones(32, "float32"))]:
        model = small_network()
        assert batch_norm.recompute_batch_norm_statistics(model, data) == 2
        np.testing.assert_allclose(
            model.get_layer("bn1").moving_mean,
            model.get_layer("conv1")(images).numpy().mean(axis=(0, 1, 2)),
            rtol=1e-4,
            atol=1e-5,
        )


@pytest.mark.skipif(
    USE_LEGACY_KERAS,
    reason="tf_keras' fused batch norm keeps the unbiased "
    "variance: inference mode divides by it, training mode by the biased one",
)
def test_inference_then_matches_batch_statistics_on_the_same_batch():
    # Stale moving averages (here: Keras' initial ones) make inference mode
    # compute another function than training did; recomputed on the batch
    # itself, the two modes agree.
    model = models.ResNet20(
        input_shape=(8, 8, 3), group_size=8, classes=4, classifier_activation=None
    )
    images = batches(1, size=32)[0][:, :6, :6]
    images = np.pad(images, [(0, 0), (1, 1), (1, 1), (0, 0)])
    training_mode = model(images, training=True).numpy()
    batch_norm.recompute_batch_norm_statistics(model, images)  # One batch of 32.
    inference_mode = model(images, training=False).numpy()
    np.testing.assert_allclose(
        inference_mode, training_mode, rtol=1e-3, atol=1e-3 * np.abs(training_mode).max()
    )


def test_callback_recomputes_before_validation():
    model = small_network()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    images = np.concatenate(batches(4))
    targets = np.random.default_rng(1).normal(size=(len(images), 2)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(16)
    callback = batch_norm.PreciseBatchNormalization(
        dataset, steps=2, validation_data=(images, targets)
    )
    history = model.fit(images, targets, batch_size=16, epochs=2, verbose=0, callbacks=[callback])
    # Validation ran after the recomputation: its loss is the model's loss now.
    assert history.history["val_loss"][-1] == pytest.approx(
        model.evaluate(images, targets, verbose=0), rel=1e-5
    )
    bn2 = model.get_layer("bn2")
    saved = bn2.moving_mean.numpy()
    batch_norm.recompute_batch_norm_statistics(model, dataset.take(2))
    np.testing.assert_allclose(bn2.moving_mean, saved, rtol=1e-5, atol=1e-6)


def nested_network(outer_batch_norm=True):
    """A BatchNormalization inside a nested model, and optionally one outside it."""
    inputs = keras.Input((4, 4, 3))
    nested = keras.Model(
        inputs, keras.layers.BatchNormalization(name="inner_bn")(inputs), name="nested"
    )
    outer_inputs = keras.Input((4, 4, 3))
    x = nested(outer_inputs)
    if outer_batch_norm:
        x = keras.layers.BatchNormalization(name="outer_bn")(keras.layers.Dense(3)(x))
    return keras.Model(outer_inputs, x)


@pytest.mark.parametrize("outer_batch_norm", [True, False])
def test_nested_models_batch_norm_is_recomputed(outer_batch_norm):
    # The nested layer used to take one moving-average step (mean 0.049 for
    # data of mean 4.9) and, alone, not to count.
    model = nested_network(outer_batch_norm)
    images = np.random.default_rng(0).normal(4.9, 2.0, (64, 4, 4, 3)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(16)
    assert batch_norm.recompute_batch_norm_statistics(model, dataset) == 1 + outer_batch_norm
    inner = model.get_layer("nested").get_layer("inner_bn")
    np.testing.assert_allclose(inner.moving_mean, images.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(
        inner.moving_variance,
        np.mean([moving_variance(batch) for batch in np.split(images, 4)], axis=0),
        rtol=1e-4,
    )


def test_frozen_and_channels_first_layers():
    inputs = keras.Input((4, 3, 5))
    frozen = keras.layers.BatchNormalization(axis=-1, name="frozen")
    channels_first = keras.layers.BatchNormalization(axis=1, name="channels_first")
    model = keras.Model(inputs, channels_first(frozen(inputs)))
    frozen.trainable = False
    images = np.random.default_rng(0).normal(3.0, 1.0, (8, 4, 3, 5)).astype("float32")
    assert batch_norm.recompute_batch_norm_statistics(model, images) == 1
    # Frozen: training does not update it, nor does this.
    np.testing.assert_array_equal(frozen.moving_mean, np.zeros(5))
    # The frozen layer normalises with its moving statistics (0 and 1).
    np.testing.assert_allclose(
        channels_first.moving_mean,
        images.mean(axis=(0, 2, 3)) / np.sqrt(1 + frozen.epsilon),
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "data",
    [
        np.ones((0, 4, 4, 3), "float32"),
        tf.data.Dataset.from_tensor_slices(np.ones((0, 4, 4, 3), "float32")).batch(4),
        # Of unknown cardinality.
        tf.data.Dataset.from_tensor_slices(np.ones((4, 4, 4, 3), "float32"))
        .filter(lambda x: False)
        .batch(4),
    ],
    ids=["array", "dataset", "filtered"],
)
def test_data_without_a_batch_is_refused_and_changes_nothing(data):
    model = nested_network()
    layers = [model.get_layer("nested").get_layer("inner_bn"), model.get_layer("outer_bn")]
    for layer in layers:
        layer.moving_mean.assign(np.full(3, 0.5, "float32"))
    with pytest.raises(ValueError, match=r"`data` must hold at least one batch\. Received: data="):
        batch_norm.recompute_batch_norm_statistics(model, data)
    for layer in layers:
        np.testing.assert_array_equal(layer.moving_mean, np.full(3, 0.5))
        np.testing.assert_array_equal(layer.moving_variance, np.ones(3))
        assert layer.momentum == 0.99


@pytest.mark.parametrize("steps", [-1, 0, 1.5, True, "2"])
def test_bad_steps_are_refused(steps):
    with pytest.raises(ValueError, match=re.escape(f"Received: steps={steps!r}.")):
        batch_norm.recompute_batch_norm_statistics(
            nested_network(), np.ones((4, 4, 4, 3)), steps=steps
        )
    with pytest.raises(ValueError, match=re.escape(f"Received: steps={steps!r}.")):
        batch_norm.PreciseBatchNormalization(np.ones((4, 6, 6, 3)), steps=steps)


def test_unbuilt_models_are_refused():
    with pytest.raises(ValueError, match="must be a built keras.Model"):
        batch_norm.recompute_batch_norm_statistics(keras.Sequential(), np.ones((2, 4)))
