"""MobileNetV3 Small and Large: keras.applications' networks exactly, and multigrid versions."""

import doctest

import numpy as np
import pytest

import keras_mgconv
from applications_parity import assert_same_function
from keras_mgconv import batch_norm, models, training
from keras_mgconv._keras import USE_LEGACY_KERAS, keras
from keras_mgconv.models import mobilenet_v3

# Each factory at both alphas and both settings of `minimalistic`; each build
# takes 1-3 s on 2 cores, so not all eight pairs. The two at keras.applications'
# defaults (input shape (None, None, 3), 1000 classes) give the counts;
# the odd input size takes the other branch of the stride-2 padding.
PARITY = [
    ("Small", {"alpha": 1.0}, 2_554_968),
    ("Large", {"alpha": 1.0}, 5_507_432),
    (
        "Small",
        {"alpha": 0.75, "minimalistic": True, "input_shape": (33, 33, 3), "classes": 10},
        None,
    ),
    (
        "Large",
        {
            "alpha": 0.75,
            "minimalistic": True,
            "input_shape": (32, 32, 3),
            "include_top": False,
            "pooling": "avg",
        },
        None,
    ),
]


# Calls in training mode outside `fit` warn that nothing recomputes the statistics.
@pytest.mark.filterwarnings("ignore:keras_mgconv.*nothing recomputes:UserWarning")
@pytest.mark.parametrize(
    "kind,kwargs,params", PARITY, ids=[f"{kind}-{kwargs}" for kind, kwargs, _ in PARITY]
)
def test_baseline_is_keras_applications_network(kind, kwargs, params):
    if USE_LEGACY_KERAS:
        pytest.skip(
            "tf_keras' MobileNetV3 names its layers otherwise ('Conv/BatchNorm'): "
            "the factories follow Keras 3's keras.applications"
        )
    ours = getattr(models, f"MobileNetV3{kind}")(multigrid=False, **kwargs)
    theirs = getattr(keras.applications, f"MobileNetV3{kind}")(weights=None, **kwargs)
    assert ours.count_params() == theirs.count_params() == (params or theirs.count_params())
    assert ours.output_shape == theirs.output_shape
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 33, 33, 3)).astype("float32")
    shape = kwargs.get("input_shape", (32, 32, 3))
    assert_same_function(ours, theirs, pixels[:, : shape[0], : shape[1]])


def _small(**kwargs):
    return models.MobileNetV3Small((32, 32, 3), alpha=0.75, classes=3, **kwargs)


def test_multigrid_swaps_exactly_the_expansions_and_projections():
    multigrid, baseline = _small(coarsest_channels=8), _small(multigrid=False)
    assert [layer.name for layer in multigrid.layers[1:]] == [
        layer.name for layer in baseline.layers[1:]
    ]

    def swapped_layers(model):
        return {
            layer.name for layer in model.layers if isinstance(layer, keras_mgconv.MultigridConv2D)
        }

    def wider_than(channels):
        return {
            layer.name
            for layer in baseline.layers
            if layer.name.endswith(("expand", "project")) and layer.filters > channels
        }

    swapped = swapped_layers(multigrid)
    # Every expansion and projection wider than the coarsest width 8: all ten
    # expansions (the first block has none) and eleven projections.
    assert swapped == wider_than(8) and len(swapped) == 21
    # By default those of 32 channels or fewer stay dense.
    assert swapped_layers(_small()) == wider_than(32) != swapped
    for layer in baseline.layers[1:]:
        if layer.name not in swapped:  # Depthwise, squeeze-and-excitation, stem, head.
            other = multigrid.get_layer(layer.name)
            assert type(other) is type(layer), layer.name
            assert [w.shape for w in other.weights] == [w.shape for w in layer.weights]
    assert multigrid.count_params() < baseline.count_params()
    assert isinstance(multigrid, batch_norm.PreciseBatchNormModel)


def test_train_builds_it_after_its_own_normalisation():
    """`keras-mgconv train --model MobileNetV3Small` passes normalised images.

    Not fitted here: tracing its training step takes 20-50 s on 2 cores. The
    backend checks fit it under JAX and PyTorch and check there that `fit`
    leaves the statistics of the final weights; the tf_keras checks quantize it.
    """
    inputs = keras.Input((32, 32, 1))
    normalized = keras.layers.Normalization(mean=0.5, variance=0.25)(inputs)
    model = training.MODELS["MobileNetV3Small"](
        input_tensor=normalized, classes=10, multigrid=False, width=1.0, batch_norm_momentum=0.9
    )
    assert isinstance(model, batch_norm.PreciseBatchNormModel)
    assert model.output_shape == (None, 10)
    # No second rescaling, of [0, 255] pixels, inside the model.
    assert not any(
        isinstance(layer, keras.layers.Rescaling) and layer.name == "rescaling"
        for layer in model.layers
    )
    assert model.get_layer("conv_bn").momentum == 0.9


def test_docstring_examples():
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = doctest.DocTestFinder().find(mobilenet_v3, globs={"keras_mgconv": keras_mgconv})
    assert sum(len(test.examples) for test in tests) == 4
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda: models.MobileNetV3Small(multigrid="block"),
            "MobileNetV3Small has only the layer design.*multigrid='block'",
        ),
        (lambda: models.MobileNetV3Large(dropout_rate=1.0), r"`dropout_rate`.*dropout_rate=1\.0\."),
        (lambda: models.MobileNetV3Small(dropout_rate=float("nan")), r"dropout_rate=nan\."),
        (lambda: models.MobileNetV3Small(dropout_rate=True), r"dropout_rate=True\."),
        (lambda: models.MobileNetV3Large(alpha=0), "alpha=0"),
        (lambda: models.MobileNetV3Small(width=float("inf")), r"`width`.*width=inf\."),
        (lambda: models.MobileNetV3Small(weights="imagenet"), "weights='imagenet'"),
        (lambda: models.MobileNetV3Large(input_shape=(16, 16, 3)), r"input_shape=\(16, 16, 3\)"),
        (lambda: models.MobileNetV3Small(include_top=True, pooling="avg"), "pooling='avg'"),
        (lambda: models.MobileNetV3Large(batch_norm_momentum=1.0), r"batch_norm_momentum=1\.0\."),
        (lambda: models.MobileNetV3Small(group_size=7), "group_size=7"),
        # 128 divides no expansion or projection of MobileNetV3Small at alpha 0.75.
        (
            lambda: models.MobileNetV3Small(alpha=0.75, group_size=128),
            r"MobileNetV3Small: `group_size` must divide.*group_size=128",
        ),
    ],
)
def test_invalid_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
