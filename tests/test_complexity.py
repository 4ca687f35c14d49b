import pytest

import keras_mgconv
from keras_mgconv._keras import keras
from keras_mgconv.complexity import count_multiply_adds


def _model(input_shape, *layers):
    inputs = keras.Input(input_shape)
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x)


@pytest.mark.parametrize(
    "input_shape,layer,expected",
    [
        # 10*10 positions, 3*3*4 inputs per output, 8 outputs.
        ((10, 10, 4), keras.layers.Conv2D(8, 3, padding="same"), 10 * 10 * 3 * 3 * 4 * 8),
        # valid, stride 2: 4*4 positions.
        ((9, 9, 4), keras.layers.Conv2D(8, 3, strides=2), 4 * 4 * 3 * 3 * 4 * 8),
        # Depthwise: one 3x3 filter per channel, 4*4 positions.
        ((6, 6, 4), keras.layers.DepthwiseConv2D(3), 4 * 4 * 3 * 3 * 4),
        ((7,), keras.layers.Dense(5), 7 * 5),
        # 4 groups: each output sees 16/4 inputs.
        (
            (6, 6, 16),
            keras_mgconv.GroupedConv2D(32, 3, groups=4, padding="same"),
            6 * 6 * 3 * 3 * 4 * 32,
        ),
    ],
)
def test_counts_known_layers(input_shape, layer, expected):
    assert count_multiply_adds(_model(input_shape, layer)) == expected


def test_counts_multigrid_conv_by_hand():
    # 32 channels, group size 8, 3x3, 6x6 "same": levels 32, 16, 8.
    # smoothers 9*32*8 + 9*16*8; transfers (R and P) 32*8 + 16*8; coarsest 9*8*8.
    per_position = 9 * 32 * 8 + 9 * 16 * 8 + 32 * 8 + 16 * 8 + 9 * 8 * 8
    layer = keras_mgconv.MultigridConv2D(32, 3, padding="same", group_size=8)
    assert count_multiply_adds(_model((6, 6, 32), layer)) == 6 * 6 * per_position


def test_counts_multigrid_connector_at_output_resolution():
    # 16 -> 32 channels, stride 2 on 8x8: 4x4 outputs; connector 2 groups of 8 inputs.
    per_position = 9 * 16 * 32 // 2 + 9 * 32 * 8 + 9 * 16 * 8 + 32 * 8 + 16 * 8 + 9 * 8 * 8
    layer = keras_mgconv.MultigridConv2D(32, 3, strides=2, padding="same", group_size=8)
    assert count_multiply_adds(_model((8, 8, 16), layer)) == 4 * 4 * per_position


def test_frozen_layers_count_as_much():
    # A frozen backbone (trainable=False) computes as much; it counted 0.
    layer = keras_mgconv.MultigridConv2D(32, 3, padding="same", group_size=8)
    model = _model((6, 6, 32), layer)
    counted = count_multiply_adds(model)
    model.trainable = False
    assert count_multiply_adds(model) == counted > 0


def test_sums_layers_and_nested_models():
    inner = _model((8, 8, 4), keras.layers.Conv2D(4, 1))
    outer = _model((8, 8, 4), inner, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3))
    assert count_multiply_adds(outer) == 8 * 8 * 4 * 4 + 4 * 3


def test_matches_keras_applications_resnet50_convention():
    # ResNet50's well-known 4.1 GMACs (3.8-4.1 depending on what is counted).
    model = keras.applications.ResNet50(weights=None)
    assert 3.8e9 < count_multiply_adds(model) < 4.2e9


def test_unknown_spatial_size_is_an_error():
    with pytest.raises(ValueError, match="fixed input_shape"):
        count_multiply_adds(_model((None, None, 3), keras.layers.Conv2D(4, 3)))
