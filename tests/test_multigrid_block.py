"""The authors' block design (`models.multigrid_block`, `multigrid="block"`).

Run as a script under tf_keras (TF_USE_LEGACY_KERAS=1), this file prints one
JSON report of the block design's QAT, int8 TFLite and pruning, which
`test_quantization_and_pruning_under_tf_keras` checks.
"""

import json
import math
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras_mgconv
from conftest import bottleneck_resnet
from keras_mgconv import models
from keras_mgconv._keras import USE_LEGACY_KERAS, keras
from keras_mgconv.layers import ChannelProlongation, ChannelRestriction, MultigridConv2D
from keras_mgconv.layers.grouped_conv import GroupedConvBase

MOMENTUM = 0.9
EPSILON = 1e-3


def _block_model(input_channels, filters, strides=1, bottleneck=False, group_size=8, name="block"):
    build = models.multigrid_bottleneck_block if bottleneck else models.multigrid_basic_block
    inputs = keras.Input((8, 8, input_channels))
    outputs = build(
        inputs,
        filters,
        strides,
        group_size=group_size,
        batch_norm_momentum=MOMENTUM,
        batch_norm_epsilon=EPSILON,
        name=name,
        # Every scale at 1: a zero start cuts the correction and the finest
        # unit's convolutions until training moves them, and these untrained
        # blocks are to compute through all of the cycle.
        zero_init_residual=False,
    )
    return keras.Model(inputs, outputs)


def _reference_block(
    input_channels, filters, strides, bottleneck, connector_groups, group_size, name
):
    """The block design written out from its definition with plain Keras layers.

    `Conv2D(groups=...)` for the grouped convolutions and transfers; the
    weighted layers have the block's names, so that weights can be copied over.
    """
    expansion = 4 if bottleneck else 1
    layers = keras.layers

    def conv_bn(x, conv_filters, kernel_size, groups, prefix, conv_strides=1):
        x = layers.Conv2D(
            conv_filters,
            kernel_size,
            strides=conv_strides,
            padding="same",
            groups=groups,
            use_bias=False,
            name=f"{prefix}_conv",
        )(x)
        return layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, name=f"{prefix}_bn")(x)

    def unit(z, width, groups, prefix):
        if bottleneck:
            y = layers.ReLU()(conv_bn(z, width, 1, groups, f"{prefix}_1"))
            y = layers.ReLU()(conv_bn(y, width, 3, groups, f"{prefix}_2"))
            y = conv_bn(y, 4 * width, 1, groups, f"{prefix}_3")
        else:
            y = layers.ReLU()(conv_bn(z, width, 3, groups, f"{prefix}_1"))
            y = conv_bn(y, width, 3, groups, f"{prefix}_2")
        return layers.ReLU()(z + y)

    def cycle(x, width, level):
        prefix = f"{name}_level{level}"
        if width <= group_size:
            return unit(x, width, 1, prefix)
        groups = width // group_size
        coarse = layers.Conv2D(
            expansion * width // 2, 1, groups=groups, use_bias=False, name=f"{prefix}_restrict"
        )(x)
        correction = layers.Conv2D(
            expansion * width, 1, groups=groups, use_bias=False, name=f"{prefix}_prolong"
        )(cycle(coarse, width // 2, level + 1) - coarse)
        correction = layers.BatchNormalization(
            momentum=MOMENTUM, epsilon=EPSILON, name=f"{prefix}_prolong_bn"
        )(correction)
        return unit(x + correction, width, groups, prefix)

    inputs = keras.Input((8, 8, input_channels))
    x = inputs
    if strides != 1 or input_channels != expansion * filters:
        x = layers.ReLU()(
            conv_bn(x, expansion * filters, 3, connector_groups, f"{name}_connector", strides)
        )
    return keras.Model(inputs, cycle(x, filters, 0))


def _randomize(model, rng):
    """Random batch-norm statistics and scales, and random transfers (not group means)."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape),
                    rng.normal(0, 0.2, beta.shape),
                    rng.normal(0, 0.2, mean.shape),
                    rng.uniform(0.5, 1.5, variance.shape),
                ]
            )
        elif isinstance(layer, (ChannelRestriction, ChannelProlongation)):
            (kernel,) = layer.get_weights()
            layer.set_weights([rng.normal(0, 0.5, kernel.shape)])


@pytest.mark.parametrize(
    "input_channels,filters,strides,bottleneck,connector_groups",
    [
        (16, 32, 2, False, 2),  # connector in groups of 8 inputs, levels 32-16-8
        (32, 32, 1, False, None),  # no connector
        (32, 16, 2, True, 4),  # bottleneck: 64 channels, levels 16-8 (x4)
    ],
    ids=["basic-connector", "basic", "bottleneck"],
)
def test_block_equals_a_reference_of_plain_keras_layers(
    input_channels, filters, strides, bottleneck, connector_groups
):
    rng = np.random.default_rng(0)
    model = _block_model(input_channels, filters, strides, bottleneck)
    reference = _reference_block(
        input_channels, filters, strides, bottleneck, connector_groups, 8, "block"
    )
    _randomize(model, rng)
    weighted = {layer.name: layer.get_weights() for layer in model.layers if layer.weights}
    assert weighted.keys() == {layer.name for layer in reference.layers if layer.weights}
    for name, weights in weighted.items():
        reference.get_layer(name).set_weights(weights)
    assert model.count_params() == reference.count_params()

    x = rng.normal(size=(4, 8, 8, input_channels)).astype("float32")
    for training in (False, True):
        np.testing.assert_allclose(
            model(x, training=training), reference(x, training=training), rtol=1e-4, atol=1e-4
        )


def _coupling(model, x):
    """(output channel, input channel): total |gradient| of the channel's spatial sum."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        channel_sums = tf.reduce_sum(model(x, training=False), axis=(0, 1, 2))
    return tf.reduce_sum(tf.abs(tape.jacobian(channel_sums, x)), axis=(1, 2, 3)).numpy()


def test_every_output_channel_depends_on_every_input_channel():
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 32)).astype("float32")
    block = _block_model(32, 32)
    assert (_coupling(block, x) > 0).all()

    # The same measure finds the groups of a grouped residual unit alone, the
    # block's smoother: the coupling above is the cycle's.
    inputs = keras.Input((8, 8, 32))
    y = keras_mgconv.GroupedConv2D(32, 3, groups=4, padding="same")(inputs)
    y = keras_mgconv.GroupedConv2D(32, 3, groups=4, padding="same")(keras.layers.ReLU()(y))
    outputs = keras.layers.ReLU()(inputs + y)
    coupled = _coupling(keras.Model(inputs, outputs), x) > 0
    same_group = np.kron(np.eye(4, dtype=bool), np.ones((8, 8), dtype=bool))
    np.testing.assert_array_equal(coupled, same_group)


def test_factories_build_the_block_design_where_widths_allow():
    model = models.ResNet20(
        input_shape=(8, 8, 3),
        multigrid="block",
        group_size=16,
        coarsest_channels=16,
        batch_norm_momentum=0.9,
    )
    names = {layer.name for layer in model.layers}
    # 16 channels at coarsest width 16 is a single level: the baseline block, shortcut and all.
    assert isinstance(model.get_layer("conv2_block1_1_conv"), keras.layers.Conv2D)
    assert "conv2_block1_add" in names
    # Wider stages: V-cycles, their width and stride change by the connector, no shortcut.
    assert model.get_layer("conv3_block1_connector_conv").strides == (2, 2)
    assert model.get_layer("conv4_block3_level1_restrict").groups == 2
    assert {"conv3_block1_pad", "conv3_block1_add"}.isdisjoint(names)
    assert not any(isinstance(layer, MultigridConv2D) for layer in model.layers)
    assert {
        layer.momentum
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    } == {0.9}


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda x: models.multigrid_basic_block(x, 24, group_size=8), "filters=24"),
        (lambda x: models.multigrid_basic_block(x, 8, group_size=8), "two levels.*filters=8"),
        (
            lambda x: models.multigrid_basic_block(x, 32, group_size=8, coarsest_channels=32),
            "two levels.*coarsest_channels=32",
        ),
        (lambda x: models.multigrid_basic_block(x, 32, group_size=7), "group_size=7"),
        (lambda x: models.multigrid_basic_block(x, 32, strides=0), "strides=0"),
        (lambda x: models.multigrid_bottleneck_block(x, 48, group_size=16), "filters=48"),
        (
            lambda x: models.multigrid_basic_block(keras.Input((8, 8, None)), 32),
            r"x.shape=\(None, 8, 8, None\)",
        ),
        (
            lambda x: models.multigrid_basic_block(x, 32, batch_norm_momentum=float("nan")),
            r"batch_norm_momentum=nan\.",
        ),
        (
            lambda x: models.multigrid_bottleneck_block(x, 32, batch_norm_momentum=1.5),
            r"batch_norm_momentum=1\.5\.",
        ),
        (
            lambda x: models.multigrid_basic_block(x, 32, batch_norm_epsilon=0.0),
            r"batch_norm_epsilon=0\.0\.",
        ),
        (
            lambda x: models.multigrid_basic_block(x, 32, batch_norm_epsilon=float("inf")),
            r"batch_norm_epsilon=inf\.",
        ),
    ],
    ids=[
        "indivisible",
        "one-level",
        "coarsest",
        "odd-group",
        "strides",
        "bottleneck",
        "unknown-channels",
        "momentum-nan",
        "momentum-above-1",
        "epsilon-0",
        "epsilon-inf",
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call(keras.Input((8, 8, 16)))


def test_block_trains_saves_loads_and_exports_to_tflite(tmp_path):
    from keras_mgconv.export import export_tflite

    model = _block_model(16, 32, strides=2)
    rng = np.random.default_rng(0)
    x = rng.random((4, 8, 8, 16), dtype=np.float32)
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, rng.random((4, 4, 4, 32), dtype=np.float32), verbose=0)
    assert np.isfinite(history.history["loss"][0])
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(loaded(x), model(x))

    if USE_LEGACY_KERAS:
        # export_tflite converts through Keras 3's `export`: it says where to go.
        with pytest.raises(RuntimeError, match="optimization.export_int8"):
            export_tflite(model, str(tmp_path / "model.tflite"))
        return
    report = export_tflite(model, str(tmp_path / "model.tflite"), verification_data=x)
    assert report.builtin_only
    assert report.verification.max_rel_diff < 1e-5
    # One CONV_2D per convolution and transfer, the batch norms folded into them.
    assert report.op_counts["CONV_2D"] == sum(
        isinstance(layer, GroupedConvBase) for layer in model.layers
    )
    assert "MUL" not in report.op_counts


def _trainable_parameters(model):
    return sum(math.prod(weight.shape) for weight in model.trainable_weights)


def test_resnet56_counts_match_the_authors():
    # Their resnetMG.py, ResNet56 layout (16/32/64, CIFAR stem and classifier),
    # group size 8: 294,778 trainable parameters and 67.8M multiply-adds. Their
    # levels halve down to half the group size (coarsest_channels=4 here; the
    # default stops at the group size). Their connector has one input channel
    # per group, 9 * C_out weights; ours has `group_size` inputs per group, as
    # MultigridConv2D's: 16 -> 32 in 2 groups at 16x16, 32 -> 64 in 4 at 8x8.
    connectors = [(16, 32, 2, 16 * 16), (32, 64, 4, 8 * 8)]
    weights = sum(9 * c_in * c_out // groups - 9 * c_out for c_in, c_out, groups, _ in connectors)
    assert weights == 6_048

    # A CIFAR ResNet of depth 6n+2 is ResNet8 plus n-1 more of the blocks that
    # ResNet14 adds to it (building ResNet56 itself takes 15 s).
    def counts(depth):
        model = models.CIFARResNet(depth, multigrid="block", group_size=8, coarsest_channels=4)
        return np.array([_trainable_parameters(model), keras_mgconv.count_multiply_adds(model)])

    resnet8 = counts(8)
    parameters, multiply_adds = resnet8 + 8 * (counts(14) - resnet8)
    assert parameters == 294_778 + weights
    multiply_adds -= sum(
        pixels * (9 * c_in * c_out // groups - 9 * c_out)
        for c_in, c_out, groups, pixels in connectors
    )
    assert round(multiply_adds / 1e6, 1) == 67.8


def tf_keras_report(output_dir):
    """QAT, int8 TFLite and pruning of a one-block classifier; tf_keras only.

    One block has every kind of layer the block design adds (connector,
    transfers, the batch norm after the prolongation, subtraction, grouped and
    dense units); the whole ResNet8 takes minutes here on 2 cores.
    """
    import tensorflow_model_optimization as tfmot

    from keras_mgconv import optimization
    from optimization_checks import tflite_report

    def max_difference(first, second):
        return float(np.max(np.abs(first(x, training=False) - second(x, training=False))))

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    block = _block_model(16, 32, strides=2)
    outputs = keras.layers.Dense(10, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(block.output)
    )
    model = keras.Model(block.input, outputs)
    x = rng.random((64, 8, 8, 16), dtype=np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((x, rng.integers(0, 10, 64))).batch(32)
    report = {"convolutions": sum(isinstance(layer, GroupedConvBase) for layer in model.layers)}

    # Calibrated, not fine-tuned: test_optimization.py fine-tunes QAT models.
    qat_model = optimization.quantize_model(model, calibration_data=[x])
    report["qat_relative_difference"] = max_difference(qat_model, model) / float(
        np.max(np.abs(model(x)))
    )
    converter = optimization.tflite_converter(qat_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    report.update(tflite_report(converter.convert(), dataset))

    pruned = optimization.prune_low_magnitude(
        model, tfmot.sparsity.keras.ConstantSparsity(0.5, 0, frequency=1)
    )
    pruned.compile("adam", "sparse_categorical_crossentropy", run_eagerly=True)
    pruned.fit(dataset, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    wrapped = [layer for layer in pruned.layers if hasattr(layer, "pruning_vars")]
    report["wrapped"] = sorted({type(layer.layer).__name__ for layer in wrapped})
    report["sparsities"] = [
        float(np.mean(weight.numpy() == 0))
        for layer in wrapped
        for weight, _, _ in layer.pruning_vars
    ]
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    stripped.save(f"{output_dir}/pruned.keras")
    report["pruned_reload_difference"] = max_difference(
        stripped, keras.models.load_model(f"{output_dir}/pruned.keras")
    )
    report["pruned_difference"] = max_difference(stripped, pruned)
    return report


def test_quantization_and_pruning_under_tf_keras(tmp_path):
    from test_optimization import run_under_tf_keras

    output = run_under_tf_keras("test_multigrid_block.py", str(tmp_path))
    report = json.loads(output.strip().splitlines()[-1])
    # Calibrated, the QAT model starts close to the float model's function.
    assert report["qat_relative_difference"] < 0.05
    # Every convolution and transfer is one int8 CONV_2D (the batch norms folded).
    assert report["compute_op_types"] == ["int8"]
    assert report["conv_ops"] == report["convolutions"]
    assert set(report["float_ops"]) <= {"DELEGATE", "DEQUANTIZE"}
    assert {"GroupedConv2D", "ChannelRestriction", "ChannelProlongation", "Dense"} <= set(
        report["wrapped"]
    )
    assert all(abs(sparsity - 0.5) <= 0.02 for sparsity in report["sparsities"])
    assert report["pruned_difference"] == report["pruned_reload_difference"] == 0.0


def test_bottleneck_resnet_block_design_builds():
    model = bottleneck_resnet(
        input_shape=(32, 32, 3), classes=10, multigrid="block", group_size=16, width=0.25
    )
    # ResNet50's stages at width 0.25: bottleneck widths 16 (one level at group
    # size 16: the baseline block), 32, 64, 128.
    assert "conv2_block1_add" in {layer.name for layer in model.layers}
    assert model.get_layer("conv5_block2_level0_restrict").group_size == 64
    assert model.get_layer("conv5_block2_level0_2_conv").groups == 8
    assert model.output_shape == (None, 10)


if __name__ == "__main__":
    print(json.dumps(tf_keras_report(sys.argv[1])))
