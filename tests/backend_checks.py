"""The layers' core checks under the Keras backend chosen by KERAS_BACKEND; one JSON report.

Run by test_backends.py in a subprocess per backend, since Keras reads
KERAS_BACKEND once, when it is imported:

    KERAS_BACKEND=jax python tests/backend_checks.py OUTPUT_DIR [SAVED.keras ...]

Checks, on tiny shapes: grouped convolution and the V-cycle against a NumPy
reference (a full convolution with the block-diagonal kernel, in float64);
gradients against the backend's own full convolution with that kernel; the
layer checks of layer_checks.py (config, fit, mixed precision, save and load)
for every layer; every model factory built and fitted one step. Before Keras'
serialization runs, it records whether building, calling and differentiating
the layers imported TensorFlow. It saves a
small model to OUTPUT_DIR/<backend>.keras with its inputs and predictions, and
loads each SAVED.keras given (saved under other backends) to compare its
predictions with the saving backend's.
"""

import json
import math
import os
import pathlib
import sys
import warnings

import numpy as np

import keras_mgconv
from float32_rounding import assert_within_rounding
from grouped_reference import block_diagonal_kernel, diagonal_blocks
from keras_mgconv._keras import keras
from layer_checks import assert_same_predictions, check_layer, v_cycle_sum_length

BACKEND = keras.backend.backend()
RNG = np.random.default_rng(0)


def numpy_conv(images, kernel, strides=(1, 1), padding="same"):
    """A full 2D convolution in NumPy, as TensorFlow pads: the reference."""
    kh, kw = kernel.shape[:2]
    paddings = [(0, 0)]
    for length, size, stride in zip(images.shape[1:3], (kh, kw), strides):
        if padding == "same":
            total = max((math.ceil(length / stride) - 1) * stride + size - length, 0)
            paddings.append((total // 2, total - total // 2))
        else:
            paddings.append((0, 0))
    padded = np.pad(images, [*paddings, (0, 0)])
    out_h = (padded.shape[1] - kh) // strides[0] + 1
    out_w = (padded.shape[2] - kw) // strides[1] + 1
    outputs = 0
    for i in range(kh):
        for j in range(kw):
            window = padded[
                :, i : i + strides[0] * out_h : strides[0], j : j + strides[1] * out_w : strides[1]
            ]
            outputs = outputs + window @ kernel[i, j]
    return outputs


def grouped_reference(images, layer):
    """A sublayer's grouped convolution as a NumPy full convolution."""
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
    if getattr(layer, "residual", False):
        kernel = kernel + keras_mgconv.layers.grouped_conv.identity_kernel(kernel.shape)
    return numpy_conv(
        images, block_diagonal_kernel(kernel, layer.groups), layer.strides, layer.padding
    )


def check_grouped_conv_output():
    inputs = RNG.standard_normal((2, 9, 9, 16)).astype("float32")
    # Both implementations: "auto" picks "split" under JAX on CPU, "grouped" elsewhere.
    for strides, padding, groups, kernel_size, implementation in [
        (1, "same", 4, 3, "grouped"),
        (2, "valid", 2, 3, "grouped"),
        (2, "same", 8, 1, "grouped"),
        (1, "same", 4, 3, "split"),
    ]:
        layer = keras_mgconv.GroupedConv2D(
            24,
            kernel_size,
            groups=groups,
            strides=strides,
            padding=padding,
            bias_initializer="random_normal",
            implementation=implementation,
        )
        outputs = keras.ops.convert_to_numpy(layer(inputs))
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        full = block_diagonal_kernel(kernel, groups).astype(np.float64)
        expected = numpy_conv(inputs.astype(np.float64), full, (strides, strides), padding)
        magnitudes = numpy_conv(
            np.abs(inputs.astype(np.float64)), np.abs(full), (strides, strides), padding
        )
        bias = keras.ops.convert_to_numpy(layer.bias)
        # One sum of k * k * C_in / G products, then the bias.
        assert_within_rounding(
            outputs, expected + bias, math.prod(kernel.shape[:3]) + 1, magnitudes + np.abs(bias)
        )


def check_v_cycle_output():
    inputs = RNG.standard_normal((2, 9, 9, 32)).astype("float32")
    layer = keras_mgconv.MultigridConv2D(
        64, 3, strides=2, padding="same", group_size=8, bias_initializer="random_normal"
    )
    layer.build(inputs.shape)
    for transfer in layer.restrictions + layer.prolongations:
        transfer.kernel.assign(RNG.standard_normal(transfer.kernel.shape) * 0.3)
    x = [grouped_reference(inputs.astype(np.float64), layer.connector)]
    for restriction in layer.restrictions:
        x.append(grouped_reference(x[-1], restriction))
    y = grouped_reference(x[-1], layer.coarsest)
    for level in reversed(range(len(layer.smoothers))):
        z = x[level] + grouped_reference(y - x[level + 1], layer.prolongations[level])
        y = grouped_reference(z, layer.smoothers[level])
    expected = y + keras.ops.convert_to_numpy(layer.bias)
    # A deep chain: the largest result stands in for the magnitudes (float32_rounding.py).
    assert_within_rounding(
        keras.ops.convert_to_numpy(layer(inputs)),
        expected,
        v_cycle_sum_length(layer),
        np.max(np.abs(expected)),
    )


def gradients(function, *arguments):
    """The gradients of the scalar `function(*arguments)` with this backend's autodiff."""
    if BACKEND == "jax":
        import jax

        return jax.grad(function, argnums=tuple(range(len(arguments))))(*arguments)
    if BACKEND == "torch":
        import torch

        arguments = [torch.tensor(argument, requires_grad=True) for argument in arguments]
        function(*arguments).backward()
        return [argument.grad for argument in arguments]
    import tensorflow as tf

    arguments = [tf.constant(argument) for argument in arguments]
    with tf.GradientTape() as tape:
        tape.watch(arguments)
        value = function(*arguments)
    return tape.gradient(value, arguments)


def check_grouped_conv_gradients():
    groups = 4
    inputs = RNG.standard_normal((2, 7, 7, 16)).astype("float32")
    kernel = RNG.standard_normal((3, 3, 16 // groups, 16)).astype("float32")
    weights = RNG.standard_normal((2, 4, 4, 16)).astype("float32")

    def grouped(implementation):
        def loss(x, k):
            outputs = keras_mgconv.layers.grouped_conv2d(
                x, k, groups, (2, 2), "same", implementation
            )
            return keras.ops.sum(keras.ops.multiply(outputs, weights))

        return loss

    def full(weights):
        return lambda x, k: keras.ops.sum(
            keras.ops.multiply(keras.ops.conv(x, k, strides=2, padding="same"), weights)
        )

    def numpy_gradients(function, x, k):
        input_gradient, kernel_gradient = gradients(function, x, k)
        return (
            keras.ops.convert_to_numpy(input_gradient),
            diagonal_blocks(keras.ops.convert_to_numpy(kernel_gradient), groups),
        )

    reference = numpy_gradients(full(weights), inputs, block_diagonal_kernel(kernel, groups))
    # The same gradients at the absolute values are the magnitudes of their
    # terms. The loss is linear: an input's gradient sums 3 * 3 * 16 / 4
    # products, a weight's one per output position, 2 * 4 * 4.
    magnitudes = numpy_gradients(
        full(np.abs(weights)), np.abs(inputs), block_diagonal_kernel(np.abs(kernel), groups)
    )
    for implementation in ("grouped", "split"):
        ours = [
            keras.ops.convert_to_numpy(g)
            for g in gradients(grouped(implementation), inputs, kernel)
        ]
        for mine, theirs, length, magnitude in zip(ours, reference, (36, 32), magnitudes):
            assert_within_rounding(mine, theirs, length, magnitude)


def check_layers(output_dir):
    layer_dir = pathlib.Path(output_dir) / f"{BACKEND}_layers"
    for layer_cls, kwargs, input_shape, output_shape, weights in [
        (
            keras_mgconv.GroupedConv2D,
            {"filters": 16, "kernel_size": 3, "groups": 4, "strides": 2, "padding": "same"},
            (None, 7, 7, 8),
            (None, 4, 4, 16),
            2,
        ),
        (
            keras_mgconv.MultigridConv2D,
            {"filters": 32, "kernel_size": 3, "strides": 2, "padding": "same", "group_size": 8},
            (None, 7, 7, 16),
            (None, 4, 4, 32),
            9,
        ),
        (
            keras_mgconv.MultigridConv2D,
            {"filters": 16, "kernel_size": 1, "group_size": 4},
            (None, 3, 3, 16),
            (None, 3, 3, 16),
            8,
        ),
        (keras_mgconv.ChannelRestriction, {"group_size": 8}, (None, 3, 3, 16), (None, 3, 3, 8), 1),
        (keras_mgconv.ChannelProlongation, {"group_size": 8}, (None, 3, 3, 8), (None, 3, 3, 16), 1),
    ]:
        directory = layer_dir / f"{layer_cls.__name__}_{kwargs.get('kernel_size')}"
        directory.mkdir(parents=True)
        check_layer(directory, layer_cls, kwargs, input_shape, output_shape, weights)
    padded = keras_mgconv.ChannelZeroPadding(3)(np.ones((1, 2, 2, 2), "float32"))
    assert keras.ops.convert_to_numpy(padded).tolist() == [[[[1, 1, 0, 0, 0]] * 2] * 2]


def check_factories():
    # The factories' module last: the layers are checked without it.
    from keras_mgconv import models

    # XLA compiles a whole network's step for minutes on 2 cores under JAX:
    # CIFARResNet(8) has every layer kind of the CIFAR ResNets (test_models), and
    # MobileNetV2 with groups of 32 six multigrid 1x1 layers (31 s against 92 s
    # for the twenty of groups of 8).
    small = {"input_shape": (8, 8, 3), "classes": 10, "group_size": 8}
    for name, build, size in [
        ("ResNet8 layer", lambda: models.CIFARResNet(8, **small), 8),
        ("ResNet8 block", lambda: models.CIFARResNet(8, multigrid="block", **small), 8),
        (
            "MobileNetV2",
            lambda: models.MobileNetV2(
                input_shape=(32, 32, 3), classes=10, alpha=0.35, group_size=32
            ),
            32,
        ),
        # Squeeze-and-excitation and hard-swish; four multigrid layers (11-16 s
        # after the models above, against 30 s or more for the first model compiled).
        (
            "MobileNetV3Small",
            lambda: models.MobileNetV3Small(
                input_shape=(32, 32, 3), classes=10, alpha=0.75, group_size=32
            ),
            32,
        ),
    ]:
        images = RNG.standard_normal((4, size, size, 3)).astype("float32")
        labels = np.arange(4) % 10
        model = build()
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
        history = model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0]), name
        # `fit` left the statistics of the final weights on its one batch: the
        # first normalisation's mean is its input's batch mean.
        first = next(
            layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
        )
        inputs = keras.ops.convert_to_numpy(keras.Model(model.input, first.input)(images))
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(first.moving_mean),
            inputs.mean(axis=(0, 1, 2)),
            rtol=1e-4,
            atol=1e-4,
            err_msg=name,
        )


def check_precise_batch_norm():
    """`fit` leaves the statistics of the final weights, and says nothing, on this backend."""
    from keras_mgconv.batch_norm import PreciseBatchNormModel

    inputs = keras.Input((4,))
    dense = keras.layers.Dense(4)
    model = PreciseBatchNormModel(
        inputs, keras.layers.Dense(1)(keras.layers.BatchNormalization()(dense(inputs)))
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = RNG.normal(3.0, 2.0, (64, 4)).astype("float32")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="PreciseBatchNormModel")
        model.fit(x, x[:, :1], batch_size=64, epochs=1, verbose=0)
    # One batch of all 64 inputs: the statistics of the Dense outputs, exactly
    # (Keras' moving averages after one step would be 0.99 * 0 + 0.01 * mean).
    outputs = keras.ops.convert_to_numpy(dense(x))
    batch_norm = model.layers[2]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(batch_norm.moving_mean),
        outputs.mean(axis=0),
        rtol=1e-4,
        atol=1e-4,
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(batch_norm.moving_variance),
        outputs.var(axis=0),
        rtol=1e-3,
        atol=1e-4,
    )


def saved_model():
    return keras.Sequential(
        [
            keras.Input((6, 6, 8)),
            keras_mgconv.MultigridConv2D(
                16, 3, strides=2, padding="same", group_size=4, bias_initializer="random_normal"
            ),
            keras_mgconv.GroupedConv2D(16, 3, groups=4, padding="same", activation="relu"),
            keras_mgconv.ChannelZeroPadding(4),
        ]
    )


def save_for_other_backends(output_dir):
    model = saved_model()
    inputs = RNG.standard_normal((2, 6, 6, 8)).astype("float32")
    model.save(os.path.join(output_dir, f"{BACKEND}.keras"))
    np.savez(
        os.path.join(output_dir, f"{BACKEND}.npz"),
        inputs=inputs,
        predictions=model.predict(inputs, verbose=0),
    )


def check_loads(saved):
    """Loads a model saved under another backend: the same predictions, to rounding."""
    assert_same_predictions(
        keras.models.load_model(saved), np.load(os.path.splitext(saved)[0] + ".npz")
    )


def main():
    output_dir, *saved = sys.argv[1:]
    reports = {}
    checks = {
        "grouped_conv_output": check_grouped_conv_output,
        "v_cycle_output": check_v_cycle_output,
        "grouped_conv_gradients": check_grouped_conv_gradients,
        # Keras' own serialization (config round-trips, saving) imports
        # TensorFlow wherever it is installed; the layers' computation must not.
        "no_tensorflow": lambda: reports.update(
            tensorflow_imported_by_layers="tensorflow" in sys.modules
        ),
        "layers": lambda: check_layers(output_dir),
        "precise_batch_norm": check_precise_batch_norm,
        "save": lambda: save_for_other_backends(output_dir),
        **{
            f"load {os.path.basename(path)}": (lambda path=path: check_loads(path))
            for path in saved
        },
    }
    for check in checks.values():
        check()
    try:
        if BACKEND != "tensorflow":  # test_models.py trains every factory there.
            check_factories()
        factories_error = None
    except Exception as error:  # Reported, so that the layers' report still comes back.
        factories_error = f"{type(error).__name__}: {str(error)[:500]}"
    print(
        json.dumps(
            {
                "backend": BACKEND,
                "checks": list(checks),
                "auto": keras_mgconv.layers.grouped_conv.resolve_implementation("auto", "float32"),
                **reports,
                "factories_error": factories_error,
            }
        )
    )


if __name__ == "__main__":
    main()
