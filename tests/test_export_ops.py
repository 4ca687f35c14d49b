"""The exported graph of one V-cycle: how many ops, and that they compute the cycle."""

import pytest

import keras_mgconv
from keras_mgconv._keras import keras
from keras_mgconv.export import export_tflite, float32_tolerance


@pytest.mark.parametrize("kwargs,input_channels,connectors", [
    ({"filters": 32, "kernel_size": 3, "padding": "same"}, 32, 0),
    ({"filters": 32, "kernel_size": 3, "strides": 2, "padding": "same"}, 16, 1),
    ({"filters": 32, "kernel_size": 3, "padding": "valid"}, 32, 1),
])
def test_a_cycle_exports_to_its_convolutions_and_one_addition_and_subtraction_a_level(
        tmp_path, kwargs, input_channels, connectors):
    # Levels 32, 16, 8: two restrictions, two prolongations, two smoothers
    # (each with its identity inside the kernel), the coarsest level (with the
    # identity subtracted, so that it gives the correction y_L - x_L itself),
    # one addition a level and one subtraction a level above the coarsest's.
    # Each added op costs dispatch and a pass over the activations.
    inputs = keras.Input((12, 12, input_channels))
    layer = keras_mgconv.MultigridConv2D(group_size=8, use_bias=False, **kwargs)
    model = keras.Model(inputs, layer(inputs))
    assert layer.levels == (32, 16, 8)
    report = export_tflite(model, str(tmp_path / "cycle.tflite"))
    assert report.op_counts == {"CONV_2D": connectors + 7, "ADD": 2, "SUB": 1}
    assert report.verification.max_rel_diff <= float32_tolerance(model)
