"""`zero_init_residual`: residual blocks that start as the identity (all of a multigrid net)."""

import numpy as np
import pytest

import keras_mgconv
from keras_mgconv._keras import keras


def _stream(model, block, images):
    """The residual stream after `block`, in training mode (batch statistics)."""
    probe = keras.Model(model.input, model.get_layer(f"{block}_out").output)
    return probe(images, training=True).numpy()


def _path(variable):
    """A variable's layer/weight path, under Keras 3 and tf_keras ("name:0") alike."""
    return getattr(variable, "path", variable.name.split(":")[0])


def _images(size, count=16):
    return np.random.default_rng(0).uniform(size=(count, size, size, 3)).astype("float32")


def _scales(model):
    """The smallest scale of each BatchNormalization, by layer name."""
    return {
        layer.name: float(np.min(np.abs(layer.gamma.numpy())))
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }


@pytest.mark.parametrize("multigrid", ["layer", "block"])
@pytest.mark.parametrize("zero_init_residual", [True, "multigrid"])
def test_a_multigrid_block_without_connector_starts_as_the_identity(multigrid, zero_init_residual):
    # Every width multigrid (coarsest level 8), so every stage's blocks are.
    keras.utils.set_random_seed(0)
    model = keras_mgconv.models.ResNet20(
        input_shape=(8, 8, 3),
        multigrid=multigrid,
        coarsest_channels=8,
        zero_init_residual=zero_init_residual,
    )
    images = _images(8)
    for stage in (2, 3, 4):
        first, second = (_stream(model, f"conv{stage}_block{index}", images) for index in (1, 2))
        np.testing.assert_array_equal(second, first)


@pytest.mark.parametrize("multigrid", [False, "layer", "block"])
def test_every_channel_of_a_zero_started_network_learns(multigrid):
    """No channel stuck: every zero scale has a gradient at the start, every scale after a step.

    Two traps leave weights at their initial values for good: two zero scales
    in series (a block-design coarse unit started as the identity sends up a
    difference of exactly zero to a zero-scaled correction), and a zero-started
    branch beside a zero-padded shortcut (its new channels sit at exactly 0,
    where ReLU passes no gradient).
    """
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    # 64 channels at s=8, c=8: four levels, so coarse units inside coarse levels.
    model = keras_mgconv.models.ResNet20(
        input_shape=(8, 8, 3),
        classes=4,
        multigrid=multigrid,
        coarsest_channels=8,
        zero_init_residual=True,
    )
    images, labels = _images(8), np.arange(16) % 4

    def gradients():
        with tf.GradientTape() as tape:
            loss = keras.losses.sparse_categorical_crossentropy(
                labels, model(images, training=True)
            )
        variables = model.trainable_variables
        return dict(zip(map(_path, variables), tape.gradient(loss, variables)))

    scales = [_path(v) for v in model.trainable_variables if _path(v).endswith("gamma")]
    zero_scales = [
        _path(v) for v in model.trainable_variables if _path(v) in scales and not np.any(v)
    ]
    assert any("level" in path for path in zero_scales) == (multigrid == "block")
    start = gradients()
    assert zero_scales and all(np.all(start[path].numpy()) for path in zero_scales)
    keras.optimizers.SGD(0.1).apply_gradients(
        [(start[_path(v)], v) for v in model.trainable_variables]
    )
    after = gradients()
    assert not [path for path in scales if not np.all(after[path].numpy())]
    assert not [path for path, gradient in after.items() if not np.any(gradient.numpy())]


def test_multigrid_zeroes_the_multigrid_blocks_only():
    keras.utils.set_random_seed(0)
    model = keras_mgconv.models.ResNet20(input_shape=(8, 8, 3), zero_init_residual="multigrid")
    scales = {name: scale for name, scale in _scales(model).items() if name.endswith("_2_bn")}
    # The 16- and 32-channel stages stay Conv2D (coarsest_channels=32): scale 1;
    # so does conv4_block1, beside a zero-padded shortcut.
    assert {name for name, scale in scales.items() if scale == 0} == {
        f"conv4_block{index}_2_bn" for index in (2, 3)
    }
    assert all(scale == 1 for name, scale in scales.items() if not name.startswith("conv4"))


@pytest.mark.parametrize(
    "zero_init_residual, within", [(True, True), ("multigrid", True), (None, True), (False, False)]
)
def test_a_deep_multigrid_stream_stays_within_1_5x_of_the_baselines(zero_init_residual, within):
    """ResNet56 at initialisation: the stream's std after the last block, against the baseline's.

    Every scale starting at 1 (False) grows it to about 3x the baseline's; a
    zero start, the default's included, keeps it below.
    """
    images = _images(16, count=32)
    deviations = {}
    for multigrid in (False, True):
        keras.utils.set_random_seed(0)
        model = keras_mgconv.models.ResNet56(
            input_shape=(16, 16, 3),
            multigrid=multigrid,
            # None: the factory's default.
            **(
                {}
                if zero_init_residual is None
                else {"zero_init_residual": zero_init_residual if multigrid else False}
            ),
        )
        deviations[multigrid] = float(np.std(_stream(model, "conv4_block9", images)))
    assert (deviations[True] <= 1.5 * deviations[False]) == within, deviations


def test_true_and_the_multigrid_default_zero_every_residual_branch_false_none():
    keras.utils.set_random_seed(0)
    everywhere = keras_mgconv.models.ResNet20(
        input_shape=(8, 8, 3), multigrid=False, zero_init_residual=True
    )
    zero = {name for name, scale in _scales(everywhere).items() if scale == 0}
    branches = {name for name in _scales(everywhere) if name.endswith("_2_bn")}
    # Every branch but those beside a zero-padded shortcut (each stage's first
    # block after the first stage).
    assert zero == branches - {"conv3_block1_2_bn", "conv4_block1_2_bn"}
    # The baseline's default start is keras.applications': every scale at 1.
    baseline = keras_mgconv.models.ResNet20(input_shape=(8, 8, 3), multigrid=False)
    assert all(scale == 1 for scale in _scales(baseline).values())
    for multigrid in ("layer", "block"):
        default, chosen, ones = (
            _scales(
                keras_mgconv.models.ResNet20(input_shape=(8, 8, 3), multigrid=multigrid, **start)
            )
            for start in ({}, {"zero_init_residual": True}, {"zero_init_residual": False})
        )
        # A multigrid network starts as the baseline started at zero, its
        # dense blocks (16 and 32 channels, coarsest_channels=32) included.
        assert default == chosen
        zero_here = {name for name, scale in default.items() if scale == 0}
        dense = {name for name in zero if not name.startswith("conv4")}
        assert zero_here == zero if multigrid == "layer" else zero_here >= dense
        assert all(scale == 1 for scale in ones.values())


def test_auto_and_multigrid_differ_only_in_the_dense_blocks_of_a_multigrid_network():
    """'multigrid' leaves the dense blocks at scale 1; with every block
    multigrid (coarsest level 8) it is the default's start."""
    starts = {}
    for coarsest_channels in (None, 8):
        for start in ("auto", "multigrid"):
            keras.utils.set_random_seed(0)
            model = keras_mgconv.models.ResNet20(
                input_shape=(8, 8, 3),
                coarsest_channels=coarsest_channels,
                zero_init_residual=start,
            )
            starts[coarsest_channels, start] = {
                name for name, scale in _scales(model).items() if scale == 0
            }
    assert starts[None, "multigrid"] < starts[None, "auto"]
    assert {name[:5] for name in starts[None, "auto"] - starts[None, "multigrid"]} == {
        "conv2",
        "conv3",
    }
    assert starts[8, "multigrid"] == starts[8, "auto"] == starts[None, "auto"]


@pytest.mark.parametrize("value", ["yes", None])
def test_a_bad_zero_init_residual_is_refused_naming_it(value):
    with pytest.raises(ValueError, match=rf"Received: zero_init_residual={value!r}\."):
        keras_mgconv.models.ResNet20(zero_init_residual=value)


MOBILENETS = ("MobileNetV2", "MobileNetV3Small", "MobileNetV3Large")


def _mobilenet(factory, **kwargs):
    keras.utils.set_random_seed(0)
    return getattr(keras_mgconv.models, factory)(input_shape=(32, 32, 3), classes=10, **kwargs)


def _projections(model):
    """{projection BatchNormalization: whether its projection is multigrid}, by residual block."""
    names = {layer.name for layer in model.layers}
    blocks = [name[: -len("add")] for name in names if name.endswith("_add")]
    return {
        next(f"{block}project_{bn}" for bn in ("BN", "bn") if f"{block}project_{bn}" in names): (
            isinstance(model.get_layer(f"{block}project"), keras_mgconv.MultigridConv2D)
        )
        for block in blocks
    }


@pytest.mark.parametrize("factory", MOBILENETS)
def test_a_multigrid_mobilenet_zeroes_every_residual_branch_multigrid_those_multigrid(factory):
    default, false, true, multigrid_only = (
        _mobilenet(factory, **start)
        for start in (
            {},
            {"zero_init_residual": False},
            {"zero_init_residual": True},
            {"zero_init_residual": "multigrid"},
        )
    )
    projections = _projections(default)
    multigrid = {name for name, is_multigrid in projections.items() if is_multigrid}
    # Some residual projections stay dense (24 and 32 channels), some are multigrid.
    assert multigrid and set(projections) - multigrid
    assert {name for name, scale in _scales(default).items() if scale == 0} == set(projections)
    assert {name for name, scale in _scales(true).items() if scale == 0} == set(projections)
    assert {name for name, scale in _scales(multigrid_only).items() if scale == 0} == multigrid
    assert all(scale == 1 for scale in _scales(false).values())
    # The baseline's default start is keras.applications': every scale at 1.
    baseline = _mobilenet(factory, multigrid=False)
    assert all(scale == 1 for scale in _scales(baseline).values())


@pytest.mark.parametrize(
    "factory, block", [("MobileNetV2", "block_8"), ("MobileNetV3Small", "expanded_conv_5")]
)
def test_a_zero_started_mobilenet_block_starts_as_the_identity(factory, block):
    model = _mobilenet(factory, include_top=False)
    add = model.get_layer(f"{block}_add")
    probe = keras.Model(model.input, [add.input[0], add.output])
    stream, output = (t.numpy() for t in probe(_images(32, count=4) * 255, training=True))
    np.testing.assert_array_equal(output, stream)
    assert np.std(stream) > 0


@pytest.mark.parametrize("factory", MOBILENETS)
def test_a_bad_mobilenet_zero_init_residual_is_refused_naming_it(factory):
    with pytest.raises(ValueError, match=r"Received: zero_init_residual='yes'\."):
        getattr(keras_mgconv.models, factory)(zero_init_residual="yes")
