import json

import numpy as np
import pytest
import tensorflow as tf

import keras_mgconv
from conftest import FAMILY_MEMBER, bottleneck_resnet, layer_kinds
from keras_mgconv import models
from keras_mgconv._keras import keras

# One member of each factory family at the smallest input its architecture
# takes; the other factories are made of the same layers (below).
FACTORIES = [
    (models.ResNet20, (16, 16, 3)),
    (models.ResNet18, (32, 32, 3)),
    (bottleneck_resnet, (32, 32, 3)),
    (models.MobileNetV2, (32, 32, 3)),
]


def _multigrid_layers(model):
    return [layer for layer in model.layers if isinstance(layer, keras_mgconv.MultigridConv2D)]


@pytest.mark.parametrize("factory", FAMILY_MEMBER, ids=lambda factory: factory.__name__)
def test_factory_is_made_of_its_family_members_layers(factory):
    member = FAMILY_MEMBER[factory]
    input_shape = (8, 8, 3) if member is models.ResNet20 else (32, 32, 3)
    kinds = layer_kinds(factory(input_shape=input_shape, classes=10))
    assert kinds == layer_kinds(member(input_shape=input_shape, classes=10))
    # Not trivially: the kinds tell a multigrid layer from a baseline one.
    assert kinds != layer_kinds(factory(input_shape=input_shape, classes=10, multigrid=False))


@pytest.mark.parametrize("factory,input_shape", FACTORIES, ids=[f.__name__ for f, _ in FACTORIES])
def test_factory_builds_trains_and_reloads(tmp_path, factory, input_shape):
    model = factory(input_shape=input_shape, classes=3)
    baseline = factory(input_shape=input_shape, classes=3, multigrid=False)
    assert _multigrid_layers(model) and not _multigrid_layers(baseline)
    assert model.count_params() < baseline.count_params()
    assert model.output_shape == baseline.output_shape == (None, 3)

    rng = np.random.default_rng(0)
    x = rng.random((2, *input_shape), dtype=np.float32)
    y = rng.integers(0, 3, 2)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    history = model.fit(x, y, epochs=1, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_mobilenet_v2_baseline_equals_keras_applications():
    ours = models.MobileNetV2(multigrid=False, weights=None)
    theirs = keras.applications.MobileNetV2(weights=None)
    assert ours.count_params() == theirs.count_params() == 3_538_984
    assert ours.name == theirs.name == "mobilenetv2_1.00_224"  # The input's size.
    # Same layers under the same names, up to the (unnamed there) pooling of the top.
    assert [layer.name for layer in ours.layers[1:-2]] == [
        layer.name for layer in theirs.layers[1:-2]
    ]


@pytest.mark.parametrize("alpha", [0.35, 0.5, 1.3])
def test_mobilenet_v2_baseline_parity_for_alpha(alpha):
    ours = models.MobileNetV2((96, 96, 3), alpha=alpha, multigrid=False)
    theirs = keras.applications.MobileNetV2((96, 96, 3), alpha=alpha, weights=None)
    assert ours.count_params() == theirs.count_params()
    assert ours.name == theirs.name


def test_resnet50_baseline_equals_keras_applications():
    ours = models.ResNet50(multigrid=False, weights=None)
    theirs = keras.applications.ResNet50(weights=None)
    assert ours.count_params() == theirs.count_params() == 25_636_712


def test_cifar_resnet56_baseline_has_about_085m_parameters():
    # He et al. 2016, Table 6: 0.85M.
    assert 0.84e6 < models.ResNet56(multigrid=False).count_params() < 0.87e6


def test_multigrid_true_is_the_layer_design():
    layer_design = layer_kinds(models.ResNet20(input_shape=(8, 8, 3), multigrid="layer"))
    assert layer_kinds(models.ResNet20(input_shape=(8, 8, 3), multigrid=True)) == layer_design
    assert layer_kinds(models.ResNet20(input_shape=(8, 8, 3), multigrid="block")) != layer_design


def test_baseline_and_multigrid_share_the_graph():
    baseline = models.ResNet20(multigrid=False)
    multigrid = models.ResNet20(group_size=8, coarsest_channels=8)
    assert [layer.name for layer in baseline.layers[1:]] == [
        layer.name for layer in multigrid.layers[1:]
    ]
    # Every block convolution above the coarsest width became multigrid; the stem stayed.
    swapped = {layer.name for layer in _multigrid_layers(multigrid)}
    assert "conv1_conv" not in swapped
    assert len(swapped) == 18


def test_by_default_layers_of_32_channels_or_fewer_stay_dense():
    # ResNet20's 16- and 32-channel stages stay Conv2D; the 64-channel one
    # (6 convolutions) becomes cycles of groups of 8 that stop at 32 channels.
    model = models.ResNet20()
    swapped = _multigrid_layers(model)
    assert len(swapped) == 6
    assert {(layer.group_size, layer.levels) for layer in swapped} == {(8, (64, 32))}
    assert type(model.get_layer("conv3_block1_1_conv")) is keras.layers.Conv2D
    # A group size above 32 is its own coarsest width: 64 channels stay dense.
    assert {
        layer.levels for layer in _multigrid_layers(models.ResNet20(width=4, group_size=64))
    } == {(128, 64), (256, 128, 64)}
    # MobileNetV2's 16-, 24- and 32-channel projections stay dense too.
    mobile = models.MobileNetV2((32, 32, 3))
    assert type(mobile.get_layer("block_2_project")) is keras.layers.Conv2D
    assert mobile.get_layer("block_6_project").levels == (64, 32)
    with pytest.raises(ValueError, match=r"smaller `coarsest_channels`.*coarsest_channels=32\."):
        models.ResNet20(width=0.5)
    assert len(_multigrid_layers(models.ResNet20(width=0.5, coarsest_channels=8))) == 12


def test_widened_multigrid_network_is_smaller_than_the_baseline():
    # The paper's point: 2x wider and still fewer parameters than the 1x
    # baseline, with every level down to the group size; with the default
    # dense 32-channel stage the 2x network has about as many.
    baseline = models.ResNet56(multigrid=False).count_params()
    assert models.ResNet56(width=2, coarsest_channels=8).count_params() < 0.75 * baseline
    assert models.ResNet56(width=2).count_params() < 1.05 * baseline


def test_width_multiplies_block_channels():
    model = models.ResNet20(width=2, multigrid=False)
    assert model.get_layer("conv4_block3_2_conv").filters == 128


def test_multigrid_block_layers_follow_group_size_rule():
    # MobileNetV2 at group size 16: 24-wide projections are not multiples of 16
    # and stay full; the 144-wide expansion halves to 72 (not a multiple): coarsest 72.
    model = models.MobileNetV2((32, 32, 3), group_size=16)
    assert not isinstance(model.get_layer("block_1_project"), keras_mgconv.MultigridConv2D)
    assert model.get_layer("block_2_expand").levels == (144, 72)


def test_include_top_false_with_pooling_and_input_tensor():
    features = models.ResNet18(input_shape=(64, 64, 3), include_top=False, pooling="avg")
    assert features.output_shape == (None, 512)
    tensor = keras.Input((32, 32, 3))
    model = models.ResNet20(input_tensor=tensor, include_top=False)
    assert model.output_shape == (None, 8, 8, 64)
    # An `input_shape` that agrees with the tensor, where both are known, is fine.
    model = models.ResNet20(
        input_shape=(None, 32, 3),
        input_tensor=tensor,
        include_top=False,
        width=np.float32(1.0),
        batch_norm_momentum=np.float64(0.0),
    )
    assert model.output_shape == (None, 8, 8, 64)


def test_weights_file_is_loaded(tmp_path):
    model = models.ResNet20(input_shape=(16, 16, 3))
    path = str(tmp_path / "resnet20.weights.h5")
    model.save_weights(path)
    reloaded = models.ResNet20(input_shape=(16, 16, 3), weights=path)
    x = np.random.default_rng(1).random((1, 16, 16, 3), dtype=np.float32)
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: models.CIFARResNet(58), "depth=58"),
        (lambda: models.CIFARResNet(2), "depth=2"),
        (lambda: models.MobileNetV2(alpha=0), "alpha=0"),
        (lambda: models.MobileNetV2(alpha=-1.0), "alpha=-1.0"),
        (lambda: models.ResNet20(width=0), "width=0"),
        (lambda: models.ResNet50(width=-2), "width=-2"),
        (lambda: models.ResNet20(group_size=24), "group_size=24"),
        (lambda: models.ResNet20(group_size=7), "group_size=7"),
        (lambda: models.MobileNetV2(weights="imagenet"), "weights='imagenet'"),
        (lambda: models.ResNet50(weights="missing.weights.h5"), "weights='missing.weights.h5'"),
        (lambda: models.ResNet18(include_top=True, pooling="avg"), "pooling='avg'"),
        (lambda: models.ResNet18(include_top=False, pooling="mean"), "pooling='mean'"),
        (lambda: models.ResNet56(classes=0), "classes=0"),
        (lambda: models.MobileNetV2(input_shape=(16, 16, 3)), r"input_shape=\(16, 16, 3\)"),
        (lambda: models.ResNet20(multigrid="blocks"), "multigrid='blocks'"),
        (lambda: models.ResNet50(multigrid=None), "multigrid=None"),
        (lambda: models.CIFARResNet(8, multigrid=1), "multigrid=1"),
        (lambda: models.MobileNetV2(multigrid="block"), "only the layer design.*multigrid='block'"),
        # Accepted before, and NaN predictions after one fit.
        (lambda: models.ResNet20(batch_norm_momentum=float("nan")), r"batch_norm_momentum=nan\."),
        (lambda: models.ResNet50(batch_norm_momentum=1.5), r"batch_norm_momentum=1\.5\."),
        (lambda: models.CIFARResNet(8, batch_norm_momentum=-0.1), "batch_norm_momentum=-0.1"),
        (
            lambda: models.ResNet20(multigrid="block", batch_norm_momentum=1.0),
            r"batch_norm_momentum=1\.0\.",
        ),
        (lambda: models.MobileNetV2(batch_norm_momentum=float("inf")), "batch_norm_momentum=inf"),
        (lambda: models.ResNet20(batch_norm_momentum="0.9"), "batch_norm_momentum='0.9'"),
        # `cannot convert float NaN to integer` and OverflowError before.
        (lambda: models.ResNet20(width=float("nan")), r"`width`.*width=nan\."),
        (lambda: models.ResNet18(width=float("inf")), r"`width`.*width=inf\."),
        (lambda: models.MobileNetV2(alpha=float("nan")), r"`alpha`.*alpha=nan\."),
        (lambda: models.MobileNetV2(alpha=float("inf")), r"`alpha`.*alpha=inf\."),
        (lambda: models.MobileNetV2(width=float("inf")), r"`width`.*width=inf\."),
        # Ignored before, as keras.applications does not.
        (
            lambda: models.ResNet20(input_shape=(16, 16, 3), input_tensor=keras.Input((32, 32, 3))),
            r"disagree.*input_shape=\(16, 16, 3\), input_tensor.shape=\(None, 32, 32, 3\)",
        ),
        (
            lambda: models.MobileNetV2(
                input_shape=(64, 64, 1), input_tensor=keras.Input((64, 64, 3))
            ),
            r"input_shape=\(64, 64, 1\)",
        ),
    ],
)
def test_invalid_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("multigrid", ["layer", "block"])
def test_numpy_integer_arguments_build_a_model_whose_config_is_json(multigrid):
    """`np.int64(8)`, as read from an array, is an integer: accepted, and saved as one."""
    model = models.CIFARResNet(
        8,
        input_shape=(8, 8, 1),
        classes=3,
        weights=None,
        multigrid=multigrid,
        group_size=np.int64(8),
        coarsest_channels=np.int64(8),
    )
    config = json.loads(json.dumps(model.get_config()))
    assert (
        model.count_params()
        == models.CIFARResNet(
            8,
            input_shape=(8, 8, 1),
            classes=3,
            weights=None,
            multigrid=multigrid,
            group_size=8,
            coarsest_channels=8,
        ).count_params()
    )
    layer = keras_mgconv.MultigridConv2D(
        np.int64(16), 3, group_size=np.int64(8), coarsest_channels=np.int64(8)
    )
    assert json.loads(json.dumps(layer.get_config()))["group_size"] == 8
    assert config["name"] == model.name


@pytest.mark.parametrize("policy", ["mixed_float16", "float32"])
def test_classifier_computes_in_float32_under_mixed_precision(policy):
    # In float16 the softmax rounds an unlikely class's probability, and the
    # cross-entropy's gradient (-1 / p, times the loss scale) overflowed: the
    # multigrid networks' loss scale fell to 32 with 10 of 38 steps skipped.
    keras.mixed_precision.set_global_policy(policy)
    model = models.CIFARResNet(8, input_shape=(8, 8, 1), group_size=8, classes=3)
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert model.output.dtype == "float32"
    # Confident and wrong: the true class's probability is about e^-30.
    predictions = model.get_layer("predictions")
    predictions.bias.assign([30.0, 0.0, 0.0])
    images = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
    with tf.GradientTape() as tape:
        loss = (
            keras.losses.SparseCategoricalCrossentropy()(np.ones(4), model(images, training=True))
            * 32768.0
        )  # Keras' first loss scale.
    gradient = tape.gradient(loss, predictions.kernel)
    assert np.all(np.isfinite(gradient.numpy()))


def test_imagenet_weights_for_a_baseline_say_where_to_get_them():
    # The baseline is keras.applications' ResNet50: "no weights exist for
    # multigrid networks" was all it said.
    with pytest.raises(
        ValueError,
        match=r"build keras\.applications' model with "
        r"weights='imagenet' and copy its weights into the "
        r"baseline layer by layer\. "
        r"Received: weights='imagenet'\.$",
    ):
        models.ResNet50(multigrid=False, weights="imagenet")
