"""BatchNormalization statistics recomputed for the current weights (precise BN)."""

import numpy as np
import pytest
import tensorflow as tf

from keras_mgconv import batch_norm, models
from keras_mgconv._keras import keras


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


def test_statistics_are_the_average_batch_statistics_of_the_current_weights():
    model = small_network()
    images = batches(3)
    trainable = [w.numpy() for w in model.trainable_weights]
    assert batch_norm.recompute_batch_norm_statistics(
        model, tf.data.Dataset.from_tensor_slices(np.concatenate(images)).batch(16)) == 2
    # Reference: the layers called one by one, eagerly, in training mode.
    conv1, bn1, conv2, bn2 = (model.get_layer(n) for n in ("conv1", "bn1", "conv2", "bn2"))
    first, second = [], []
    for batch in images:
        x = conv1(batch).numpy()
        first.append((x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))))
        normalised = (x - first[-1][0]) / np.sqrt(first[-1][1] + bn1.epsilon)
        x = np.maximum(normalised * bn1.gamma.numpy() + bn1.beta.numpy(), 0)
        x = conv2(x).numpy()
        second.append((x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))))
    for layer, moments in ((bn1, first), (bn2, second)):
        np.testing.assert_allclose(layer.moving_mean, np.mean([m for m, _ in moments], 0),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.moving_variance, np.mean([v for _, v in moments], 0),
                                   rtol=1e-4, atol=1e-5)
    # The weights themselves are untouched.
    for before, after in zip(trainable, model.trainable_weights):
        np.testing.assert_array_equal(before, after.numpy())


def test_inference_then_matches_batch_statistics_on_the_same_batch():
    # Stale moving averages (here: Keras' initial ones) make inference mode
    # compute another function than training did; recomputed on the batch
    # itself, the two modes agree.
    model = models.ResNet20(input_shape=(8, 8, 3), group_size=8, classes=4,
                            classifier_activation=None)
    images = batches(1, size=32)[0][:, :6, :6]
    images = np.pad(images, [(0, 0), (1, 1), (1, 1), (0, 0)])
    training_mode = model(images, training=True).numpy()
    batch_norm.recompute_batch_norm_statistics(model, images)  # One batch of 32.
    inference_mode = model(images, training=False).numpy()
    np.testing.assert_allclose(inference_mode, training_mode, rtol=1e-3, atol=1e-3 * np.abs(
        training_mode).max())


def test_callback_recomputes_before_validation():
    model = small_network()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    images = np.concatenate(batches(4))
    targets = np.random.default_rng(1).normal(size=(len(images), 2)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(16)
    callback = batch_norm.PreciseBatchNormalization(dataset, steps=2,
                                                    validation_data=(images, targets))
    history = model.fit(images, targets, batch_size=16, epochs=2, verbose=0,
                        callbacks=[callback])
    # Validation ran after the recomputation: its loss is the model's loss now.
    assert history.history["val_loss"][-1] == pytest.approx(
        model.evaluate(images, targets, verbose=0), rel=1e-5)
    bn2 = model.get_layer("bn2")
    saved = bn2.moving_mean.numpy()
    batch_norm.recompute_batch_norm_statistics(model, dataset.take(2))
    np.testing.assert_allclose(bn2.moving_mean, saved, rtol=1e-5, atol=1e-6)


def test_bad_models_are_refused():
    inputs = keras.Input((4, 3, 5))
    channels_first = keras.Model(inputs, keras.layers.BatchNormalization(axis=1)(inputs))
    with pytest.raises(ValueError, match="only channels-last"):
        batch_norm.recompute_batch_norm_statistics(channels_first, np.ones((2, 4, 3, 5)))
    with pytest.raises(ValueError, match="functional model with known inputs"):
        batch_norm.recompute_batch_norm_statistics(keras.Sequential(), np.ones((2, 4)))
