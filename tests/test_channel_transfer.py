import numpy as np
import pytest

import keras_mgconv
from layer_checks import check_layer


@pytest.mark.parametrize(
    "layer_cls,input_shape,output_shape",
    [
        (keras_mgconv.ChannelRestriction, (None, 6, 6, 32), (None, 6, 6, 16)),
        (keras_mgconv.ChannelProlongation, (None, 6, 6, 16), (None, 6, 6, 32)),
    ],
)
def test_transfer_layer(tmp_path, layer_cls, input_shape, output_shape):
    check_layer(tmp_path, layer_cls, {"group_size": 8}, input_shape, output_shape, 1)


def test_restriction_initialises_to_group_average():
    inputs = np.random.default_rng(0).standard_normal((2, 5, 5, 32)).astype("float32")
    outputs = np.asarray(keras_mgconv.ChannelRestriction(group_size=8)(inputs))
    group_means = inputs.reshape(2, 5, 5, 4, 8).mean(axis=-1)
    # Each of the 4 groups gives 4 coarse channels, all equal to its mean.
    expected = np.repeat(group_means, 4, axis=-1)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)


def test_prolongation_initialises_to_broadcast_of_group_average():
    inputs = np.random.default_rng(1).standard_normal((2, 5, 5, 16)).astype("float32")
    outputs = np.asarray(keras_mgconv.ChannelProlongation(group_size=8)(inputs))
    # 4 groups of 4 coarse channels, each broadcast as its mean to 8 fine channels.
    expected = np.repeat(inputs.reshape(2, 5, 5, 4, 4).mean(axis=-1), 8, axis=-1)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)


def test_prolongation_after_restriction_is_the_group_mean_projection():
    inputs = np.random.default_rng(2).standard_normal((1, 3, 3, 64)).astype("float32")
    coarse = keras_mgconv.ChannelRestriction(group_size=16)(inputs)
    fine = np.asarray(keras_mgconv.ChannelProlongation(group_size=16)(coarse))
    expected = np.repeat(inputs.reshape(1, 3, 3, 4, 16).mean(axis=-1), 16, axis=-1)
    np.testing.assert_allclose(fine, expected, rtol=1e-5, atol=1e-6)


def test_transfer_weights_are_linear_in_width():
    for channels in (32, 64, 128):
        restriction = keras_mgconv.ChannelRestriction(group_size=16)
        restriction.build((None, 4, 4, channels))
        prolongation = keras_mgconv.ChannelProlongation(group_size=16)
        prolongation.build((None, 4, 4, channels // 2))
        assert restriction.count_params() == channels * 16 // 2
        assert prolongation.count_params() == channels * 16 // 2


def test_transfer_accepts_a_custom_initializer():
    layer = keras_mgconv.ChannelRestriction(group_size=8, kernel_initializer="ones")
    layer.build((None, 4, 4, 16))
    np.testing.assert_array_equal(layer.kernel, np.ones((1, 1, 8, 8)))
    assert layer.get_config()["kernel_initializer"]["class_name"] == "Ones"


@pytest.mark.parametrize(
    "group_size,message",
    [
        (0, "group_size=0"),
        (-4, "group_size=-4"),
        (7, "group_size=7"),
        (2.0, "group_size=2.0"),
    ],
)
@pytest.mark.parametrize(
    "layer_cls", [keras_mgconv.ChannelRestriction, keras_mgconv.ChannelProlongation]
)
def test_transfer_rejects_bad_group_size(layer_cls, group_size, message):
    with pytest.raises(ValueError, match=message):
        layer_cls(group_size=group_size)


def test_transfers_reject_widths_not_matching_group_size():
    with pytest.raises(ValueError, match="input channels=24, group_size=16"):
        keras_mgconv.ChannelRestriction(group_size=16).build((None, 4, 4, 24))
    with pytest.raises(ValueError, match="input channels=12, group_size=16"):
        keras_mgconv.ChannelProlongation(group_size=16).build((None, 4, 4, 12))
