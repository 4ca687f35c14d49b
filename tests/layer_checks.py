"""The Keras layer checks every keras_mgconv layer passes (STYLE.md).

In order: config round-trip (directly and through Keras serialization), build
and weight counts, symbolic call and exact output shape, eager call, one `fit`
step that changes every weight, mixed precision, and saving to `.keras` with
identical predictions after loading.
"""

import math

import numpy as np

from float32_rounding import assert_within_rounding
from keras_mgconv._keras import keras


def to_numpy(tensor):
    """A tensor of any backend as a NumPy array (tf_keras has no `keras.ops`)."""
    if hasattr(keras, "ops"):
        return keras.ops.convert_to_numpy(tensor)
    return np.asarray(tensor)


def v_cycle_sum_length(layer):
    """A bound on the terms summed one after another through a MultigridConv2D's cycle, either way.

    Every convolution of the cycle, counted whether or not it lies on the path,
    with its products per output forwards (k * k * C_in / G) or per input
    backwards (k * k * C_out / G), and the cycle's additions: per level the
    difference, the correction and the smoother's identity; and the bias.
    """
    return (
        sum(
            math.prod(sublayer.kernel.shape[:2])
            * max(sublayer.kernel.shape[2], sublayer.kernel.shape[3] // sublayer.groups)
            for sublayer in layer.convolutions
        )
        + 3 * len(layer.smoothers)
        + 1
    )


def assert_same_predictions(model, arrays):
    """`model` (backend_checks.saved_model, loaded) predicts `arrays["predictions"]` to rounding.

    The V-cycle's chain, then the second convolution's sum and bias; the largest
    prediction stands in for the magnitudes, as in a V-cycle's test.
    """
    multigrid, grouped = model.layers[:2]
    length = v_cycle_sum_length(multigrid) + math.prod(grouped.kernel.shape[:3]) + 1
    assert_within_rounding(
        model.predict(arrays["inputs"], verbose=0),
        arrays["predictions"],
        length,
        np.max(np.abs(arrays["predictions"])),
    )


def check_layer(
    tmp_path, layer_cls, init_kwargs, input_shape, expected_output_shape, expected_num_weights
):
    rng = np.random.default_rng(0)
    batch_input_shape = (2, *input_shape[1:])
    batch_output_shape = (2, *expected_output_shape[1:])
    inputs = rng.standard_normal(batch_input_shape).astype("float32")

    # Config round-trip, directly and through Keras serialization.
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    assert layer_cls.from_config(config).get_config() == config
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is layer_cls
    assert revived.get_config() == config

    # Build: weight count and exact static output shape.
    layer.build(input_shape)
    assert len(layer.trainable_weights) == expected_num_weights
    assert tuple(layer.compute_output_shape(input_shape)) == tuple(expected_output_shape)

    # Symbolic call.
    symbolic = layer_cls(**init_kwargs)(keras.Input(batch_shape=input_shape))
    assert tuple(symbolic.shape) == tuple(expected_output_shape)

    # Eager call.
    outputs = to_numpy(layer(inputs))
    assert outputs.shape == batch_output_shape
    assert np.all(np.isfinite(outputs))

    # One fit step trains every weight.
    model = keras.Sequential([keras.Input(input_shape[1:]), layer_cls(**init_kwargs)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [w.numpy().copy() for w in model.trainable_weights]
    targets = rng.standard_normal(batch_output_shape).astype("float32")
    model.fit(inputs, targets, batch_size=2, epochs=1, verbose=0)
    after = [w.numpy().copy() for w in model.trainable_weights]
    unchanged = [
        w.name for w, b, a in zip(model.trainable_weights, before, after) if np.array_equal(b, a)
    ]
    assert not unchanged, f"weights not trained by fit: {unchanged}"

    # Mixed precision: computes in float16, keeps float32 weights, trains.
    mixed = layer_cls(**init_kwargs, dtype="mixed_float16")
    mixed_outputs = mixed(inputs)
    assert "float16" in str(mixed_outputs.dtype)
    assert all(w.dtype == "float32" for w in mixed.weights)
    mixed_model = keras.Sequential(
        [keras.Input(input_shape[1:]), layer_cls(**init_kwargs, dtype="mixed_float16")]
    )
    mixed_model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    history = mixed_model.fit(inputs, targets, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])

    # Save to .keras and load back: same predictions.
    path = str(tmp_path / "layer.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(
        loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0)
    )
