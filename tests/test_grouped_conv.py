import logging
import math

import numpy as np
import pytest
import tensorflow as tf

import keras_mgconv
from float32_rounding import assert_within_rounding
from grouped_reference import block_diagonal_kernel, diagonal_blocks
from keras_mgconv import _keras
from keras_mgconv._keras import keras
from keras_mgconv.layers import _tensorflow_ops
from keras_mgconv.layers.grouped_conv import (
    grouped_conv2d,
    grouped_gradient_supported,
    merge_groups,
)
from layer_checks import check_layer


@pytest.mark.parametrize("implementation", ["auto", "grouped", "split"])
@pytest.mark.parametrize("strides,padding", [(1, "same"), (2, "same"), (1, "valid"), (2, "valid")])
@pytest.mark.parametrize("groups,kernel_size", [(4, 3), (8, 1), (2, 5)])
def test_grouped_conv2d_equals_full_conv_with_block_diagonal_kernel(
    implementation, strides, padding, groups, kernel_size
):
    rng = np.random.default_rng(1)
    inputs = rng.standard_normal((2, 9, 9, 16)).astype("float32")
    kernel = rng.standard_normal((kernel_size, kernel_size, 16 // groups, 24)).astype("float32")
    expected = tf.nn.conv2d(inputs, block_diagonal_kernel(kernel, groups), strides, padding.upper())
    outputs = grouped_conv2d(inputs, kernel, groups, (strides, strides), padding, implementation)
    # Both sum the same k * k * C_in / G products per output, in other orders:
    # the full convolution's other products are exact zeros.
    magnitudes = tf.nn.conv2d(
        np.abs(inputs), np.abs(block_diagonal_kernel(kernel, groups)), strides, padding.upper()
    )
    assert_within_rounding(outputs, expected, math.prod(kernel.shape[:3]), magnitudes)


def test_grouped_conv2d_gradients_match_between_implementations():
    rng = np.random.default_rng(2)
    inputs = tf.constant(rng.standard_normal((2, 8, 8, 32)).astype("float32"))
    kernel = tf.constant(rng.standard_normal((3, 3, 8, 32)).astype("float32"))

    def gradients(implementation, inputs, kernel):
        with tf.GradientTape() as tape:
            tape.watch([inputs, kernel])
            outputs = grouped_conv2d(inputs, kernel, 4, implementation=implementation)
            loss = tf.reduce_sum(outputs**2)
        return tape.gradient(loss, [inputs, kernel])

    # The same gradients at the absolute values (for the inputs 2 |K|^T |K| |x|)
    # are the magnitudes that their rounding errors scale with.
    magnitudes = gradients("split", tf.abs(inputs), tf.abs(kernel))
    # Every output sums 3 * 3 * C_in / G products; then every input's gradient
    # sums 3 * 3 * C_out / G, and every kernel weight's one per output position.
    outputs = math.prod(kernel.shape[:3])
    lengths = [outputs + 3 * 3 * 32 // 4, outputs + 2 * 8 * 8]
    for split_grad, auto_grad, length, magnitude in zip(
        gradients("split", inputs, kernel), gradients("auto", inputs, kernel), lengths, magnitudes
    ):
        assert_within_rounding(auto_grad, split_grad, length, magnitude)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16])
def test_gradient_probe_answers_per_dtype_what_a_tape_finds(dtype):
    """Which dtypes train as one grouped convolution depends on the CPU (AMX/AVX512-FP16)."""
    inputs = tf.ones((1, 6, 6, 8), dtype)
    kernel = tf.Variable(tf.ones((3, 3, 2, 8), dtype))
    try:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(
                _tensorflow_ops.trainable_conv(inputs, kernel, (1, 1), "same", training=True)
            )
        differentiable = tape.gradient(loss, kernel) is not None
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, tf.errors.NotFoundError):
        differentiable = False
    assert grouped_gradient_supported(dtype) is differentiable


@pytest.mark.skipif(
    not _tensorflow_ops.onednn_kernels_work(tf.float32),
    reason="a TensorFlow build without oneDNN kernels (x86 builds have them)",
)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("strides,padding", [(1, "same"), (2, "valid")])
def test_onednn_kernels_called_directly_compute_the_grouped_convolution_and_its_gradients(
    training, strides, padding
):
    """The path that trains grouped convolutions where TensorFlow's oneDNN is off.

    Called directly here, so that it is checked whether TensorFlow turned
    oneDNN on or not; against TensorFlow's ungrouped convolution with the
    block-diagonal kernel and its gradients.
    """
    groups = 4
    rng = np.random.default_rng(3)
    inputs = tf.constant(rng.standard_normal((2, 9, 9, 16)).astype("float32"))
    kernel = tf.constant(rng.standard_normal((3, 3, 4, 24)).astype("float32"))

    def grouped(inputs, kernel):
        return _tensorflow_ops._conv_with_onednn_gradient(
            inputs, kernel, (strides, strides), padding.upper(), training
        )

    def full(inputs, kernel):
        return tf.nn.conv2d(inputs, kernel, strides, padding.upper())

    weights = tf.constant(
        rng.standard_normal(full(inputs, block_diagonal_kernel(kernel, groups)).shape).astype(
            "float32"
        )
    )

    def outputs_and_gradients(convolve, inputs, kernel, weights):
        with tf.GradientTape() as tape:
            tape.watch([inputs, kernel])
            loss = tf.reduce_sum(convolve(inputs, kernel) * weights)
        return [convolve(inputs, kernel), *tape.gradient(loss, [inputs, kernel])]

    # The full kernel's gradient has the grouped kernel's in its diagonal blocks;
    # the same computation on absolute values gives the terms' magnitudes.
    expected, magnitudes = (
        outputs_and_gradients(full, x, tf.constant(block_diagonal_kernel(k, groups)), w)
        for x, k, w in (
            (inputs, kernel, weights),
            (tf.abs(inputs), tf.abs(kernel), tf.abs(weights)),
        )
    )
    expected[2], magnitudes[2] = (
        diagonal_blocks(values[2], groups) for values in (expected, magnitudes)
    )
    # An output sums 3 * 3 * C_in / G products, an input's gradient
    # 3 * 3 * C_out / G, a kernel weight's one per output position.
    lengths = [3 * 3 * 4, 3 * 3 * 24 // groups, math.prod(weights.shape[:3])]
    for actual, wanted, length, magnitude in zip(
        outputs_and_gradients(grouped, inputs, kernel, weights), expected, lengths, magnitudes
    ):
        assert_within_rounding(actual, wanted, length, magnitude)


def test_split_fallback_says_why_and_what_it_costs(monkeypatch):
    """Where no grouped gradient exists (float16 on most CPUs), "auto" splits, and says so once."""
    _tensorflow_ops._warn_split_fallback.cache_clear()
    monkeypatch.setattr(_tensorflow_ops, "_gradient_source", lambda dtype: None)
    try:
        with pytest.warns(
            RuntimeWarning,
            match=r"per-group convolutions.*slower.*float16.*"
            r"train in float32",
        ):
            assert _tensorflow_ops.auto_implementation(tf.float16) == "split"
    finally:
        _tensorflow_ops._warn_split_fallback.cache_clear()


@pytest.mark.parametrize(
    "kernel_shape,groups,min_group_filters,merged_groups",
    [
        (
            (3, 3, 8, 64),
            8,
            16,
            4,
        ),  # a smoother at group size 8: groups of 8 filters, merged in pairs
        ((1, 1, 8, 32), 8, 16, 2),  # its restriction: 4 filters a group, merged in fours
        ((1, 1, 4, 64), 8, 16, 4),  # its prolongation: 4 inputs and 8 filters a group
        ((3, 3, 8, 24), 3, 32, 1),  # no merge reaches 32 filters: a full convolution
        ((3, 3, 8, 64), 8, 8, 8),  # wide enough already: as it was
    ],
)
def test_merged_groups_are_the_same_convolution(
    kernel_shape, groups, min_group_filters, merged_groups
):
    kernel = np.random.default_rng(0).normal(size=kernel_shape).astype("float32")
    merged, count = merge_groups(tf.constant(kernel), groups, min_group_filters)
    assert count == merged_groups
    assert merged.shape == (*kernel_shape[:2], kernel_shape[2] * groups // count, kernel_shape[3])
    # The same full kernel: the same function, whatever the strides or padding.
    np.testing.assert_array_equal(
        block_diagonal_kernel(merged, count), block_diagonal_kernel(kernel, groups)
    )


def test_grouped_conv2d_rejects_unknown_implementation():
    with pytest.raises(ValueError, match="implementation='fast'"):
        grouped_conv2d(tf.ones((1, 4, 4, 4)), tf.ones((1, 1, 2, 4)), 2, implementation="fast")


@pytest.mark.parametrize(
    "kwargs,input_shape,output_shape,num_weights",
    [
        (
            {"filters": 32, "kernel_size": 3, "groups": 4, "padding": "same"},
            (None, 8, 8, 16),
            (None, 8, 8, 32),
            2,
        ),
        (
            {"filters": 16, "kernel_size": 3, "groups": 8, "strides": 2, "use_bias": False},
            (None, 9, 9, 16),
            (None, 4, 4, 16),
            1,
        ),
        (
            {"filters": 8, "kernel_size": (1, 3), "groups": 1, "activation": "relu"},
            (None, 6, 6, 4),
            (None, 6, 4, 8),
            2,
        ),
        (
            {"filters": 16, "kernel_size": 3, "groups": 4, "padding": "same", "residual": True},
            (None, 5, 5, 16),
            (None, 5, 5, 16),
            2,
        ),
    ],
)
def test_grouped_conv2d_layer(tmp_path, kwargs, input_shape, output_shape, num_weights):
    check_layer(
        tmp_path, keras_mgconv.GroupedConv2D, kwargs, input_shape, output_shape, num_weights
    )


def test_grouped_conv2d_layer_matches_keras_conv2d_with_groups():
    inputs = np.random.default_rng(3).standard_normal((2, 8, 8, 16)).astype("float32")
    ours = keras_mgconv.GroupedConv2D(32, 3, groups=4, padding="same")
    theirs = keras.layers.Conv2D(32, 3, groups=4, padding="same")
    ours.build(inputs.shape)
    theirs.build(inputs.shape)
    assert ours.kernel.shape == theirs.kernel.shape
    theirs.set_weights(ours.get_weights())
    np.testing.assert_allclose(ours(inputs), theirs(inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"filters": 0, "kernel_size": 3}, "filters=0"),
        ({"filters": 8, "kernel_size": 3, "groups": -1}, "groups=-1"),
        ({"filters": 10, "kernel_size": 3, "groups": 4}, "filters=10, groups=4"),
        ({"filters": 8, "kernel_size": (3, 0)}, r"kernel_size=\(3, 0\)"),
        ({"filters": 8, "kernel_size": 3, "strides": 0}, "strides=0"),
        ({"filters": 8, "kernel_size": 3, "padding": "causal"}, "padding='causal'"),
        (
            {"filters": 8, "kernel_size": 3, "data_format": "channels_first"},
            "data_format='channels_first'",
        ),
    ],
)
def test_grouped_conv2d_layer_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_mgconv.GroupedConv2D(**kwargs)


def test_grouped_conv2d_layer_rejects_input_channels_not_divisible_by_groups():
    with pytest.raises(ValueError, match="input channels=6, groups=4"):
        keras_mgconv.GroupedConv2D(8, 3, groups=4).build((None, 8, 8, 6))


@pytest.mark.parametrize("kernel_size", [1, 3, 4, (3, 2)])
@pytest.mark.parametrize("groups", [1, 4])
def test_residual_adds_the_input(kernel_size, groups):
    inputs = np.random.default_rng(4).standard_normal((2, 7, 7, 16)).astype("float32")
    layer = keras_mgconv.GroupedConv2D(
        16, kernel_size, groups=groups, padding="same", residual=True
    )
    plain = keras_mgconv.GroupedConv2D(16, kernel_size, groups=groups, padding="same")
    layer.build(inputs.shape)
    plain.build(inputs.shape)
    plain.set_weights(layer.get_weights())
    np.testing.assert_allclose(layer(inputs), inputs + plain(inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"strides": 2, "padding": "same"}, r"strides=\(2, 2\), padding='same'"),
        ({"padding": "valid"}, "padding='valid'"),
    ],
)
def test_residual_rejects_size_changes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_mgconv.GroupedConv2D(16, 3, residual=True, **kwargs)


def test_residual_rejects_width_changes():
    with pytest.raises(ValueError, match="input channels=8, output channels=16"):
        keras_mgconv.GroupedConv2D(16, 3, padding="same", residual=True).build((None, 4, 4, 8))


@pytest.mark.parametrize("use_bias", [False, True])
def test_input_smaller_than_a_valid_kernel_is_refused_like_conv2d(use_bias):
    # Without the check, an eager call without bias returned its input unchanged.
    images = np.zeros((1, 2, 2, 16), "float32")
    # Keras 3's Conv2D raises (tf_keras' may return an empty tensor).
    if not _keras.USE_LEGACY_KERAS:
        with pytest.raises(ValueError):
            keras.layers.Conv2D(16, 3, groups=4, use_bias=use_bias)(images)
    message = r"would give an empty output.*padding='valid'.*Received: input_shape=\(.*\)\.$"
    for inputs in (images, keras.Input((2, 2, 16))):
        with pytest.raises(ValueError, match=message):
            keras_mgconv.GroupedConv2D(16, 3, groups=4, use_bias=use_bias)(inputs)
    assert keras_mgconv.GroupedConv2D(16, 3, groups=4, use_bias=use_bias, padding="same")(
        images
    ).shape == (1, 2, 2, 16)


@pytest.mark.skipif(
    not _tensorflow_ops.onednn_kernels_work(tf.float32),
    reason="a TensorFlow build without oneDNN kernels (x86 builds have them)",
)
@pytest.mark.parametrize(
    "layer_class,kwargs,channels",
    [
        ("GroupedConv2D", {"filters": 16, "kernel_size": 3, "groups": 4, "padding": "same"}, 16),
        (
            "MultigridConv2D",
            {"filters": 16, "kernel_size": 3, "padding": "same", "group_size": 4},
            16,
        ),
        ("ChannelRestriction", {"group_size": 4}, 16),
        ("ChannelProlongation", {"group_size": 4}, 8),
    ],
)
def test_layers_called_eagerly_at_several_shapes_do_not_retrace_warn(
    monkeypatch, layer_class, kwargs, channels
):
    """Issue 34, item 12: no "triggered tf.function retracing" warnings from eager calls.

    The layers train through TensorFlow's oneDNN kernels called directly
    wherever TensorFlow's oneDNN is off (`TF_ENABLE_ONEDNN_OPTS=0`), in
    `tf.function`s; that path is taken here whatever the setting, and each
    layer is called (and differentiated) eagerly at 6 image sizes.
    """
    if not keras_mgconv.layers._ops.TENSORFLOW:
        pytest.skip("the TensorFlow ops only")
    monkeypatch.setattr(_tensorflow_ops, "_gradient_source", lambda dtype: "onednn")
    # TensorFlow warns at most twice per function and process: a fresh count,
    # so that a warning an earlier test drew cannot hide one here.
    from tensorflow.python.eager.polymorphic_function import polymorphic_function

    monkeypatch.setattr(
        polymorphic_function,
        "_frequent_tracing_detector_manager",
        polymorphic_function._FrequentTracingDetectorManager(),
    )
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    tensorflow_logger = logging.getLogger("tensorflow")  # tf_logging.warning's logger
    tensorflow_logger.addHandler(handler)
    try:
        layer = getattr(keras_mgconv, layer_class)(**kwargs)
        for size in range(5, 11):
            inputs = tf.random.normal((2, size, size + 1, channels))
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                outputs = layer(inputs, training=True)
            assert outputs.shape[1:3] == (size, size + 1)
            assert all(
                gradient is not None
                for gradient in tape.gradient(outputs, [inputs, *layer.trainable_weights])
            )
    finally:
        tensorflow_logger.removeHandler(handler)
    assert not [record.getMessage() for record in records if "retracing" in record.getMessage()]
