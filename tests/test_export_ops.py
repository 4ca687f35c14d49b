"""The exported graph of one V-cycle: how many ops, and that they compute the cycle."""

import numpy as np
import pytest
from ai_edge_litert.tools import flatbuffer_utils

import keras_mgconv
from keras_mgconv._keras import keras
from keras_mgconv.export import export_tflite, float32_tolerance, predict_tflite


@pytest.mark.parametrize(
    "kwargs,input_channels,connectors",
    [
        ({"filters": 32, "kernel_size": 3, "padding": "same"}, 32, 0),
        ({"filters": 32, "kernel_size": 3, "strides": 2, "padding": "same"}, 16, 1),
        ({"filters": 32, "kernel_size": 3, "padding": "valid"}, 32, 1),
    ],
)
def test_a_cycle_exports_to_its_convolutions_and_one_addition_and_subtraction_a_level(
    tmp_path, kwargs, input_channels, connectors
):
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
    assert report.min_group_filters == 1  # float32: the groups as trained
    assert report.verification.max_rel_diff <= float32_tolerance(model)


def _conv_groups(path):
    """(groups, filters per group) of every CONV_2D in a .tflite file, in graph order."""
    model = flatbuffer_utils.read_model(str(path))
    graph = model.subgraphs[0]
    conv = next(
        index
        for index, code in enumerate(model.operatorCodes)
        if max(code.builtinCode, code.deprecatedBuiltinCode) == 3
    )  # CONV_2D
    result = []
    for op in graph.operators:
        if op.opcodeIndex == conv:
            inputs, kernel = (graph.tensors[index].shape for index in op.inputs[:2])
            groups = inputs[-1] // kernel[-1]
            result.append((int(groups), int(kernel[0] // groups)))
    return result


def test_int8_export_merges_narrow_groups_into_the_same_function(tmp_path):
    # Levels 32, 16, 8 at group size 8: the restrictions' groups have 4
    # filters, the prolongations' and smoothers' 8. XNNPACK's int8 kernels
    # take about as long for those as for 16, so int8 exports merge them.
    inputs = keras.Input((8, 8, 32))
    layer = keras_mgconv.MultigridConv2D(32, 3, padding="same", group_size=8)
    model = keras.Model(inputs, layer(inputs))
    images = np.random.default_rng(0).random((16, 8, 8, 32), np.float32)
    reports = {
        filters: export_tflite(
            model,
            tmp_path / f"{filters}.tflite",
            "int8",
            representative_data=images,
            min_group_filters=filters,
        )
        for filters in ("auto", 1)
    }
    assert reports["auto"].min_group_filters == 16 and reports[1].min_group_filters == 1
    assert "groups of fewer than 16 filters merged up to 16" in str(reports["auto"])
    as_trained, merged = _conv_groups(reports[1].path), _conv_groups(reports["auto"].path)
    assert min(filters for _, filters in as_trained) == 4
    assert len(merged) == len(as_trained) == len(layer.convolutions)
    # At least 16 filters a group, or (where no merge reaches 16) one group.
    assert all(filters >= 16 or groups == 1 for groups, filters in merged)
    assert sum(groups for groups, _ in merged) < sum(groups for groups, _ in as_trained)
    # The same function: with the same calibration, the same int8 outputs.
    np.testing.assert_array_equal(
        predict_tflite(reports["auto"].path, images), predict_tflite(reports[1].path, images)
    )
    # On request float32 merges too, and computes the same to rounding.
    report = export_tflite(model, tmp_path / "merged.tflite", min_group_filters=16)
    assert _conv_groups(report.path) == merged
    assert report.verification.max_rel_diff <= float32_tolerance(model)


def test_merging_past_a_layers_width_reports_one_group(tmp_path):
    """Issue 34, item 12: a group cannot outgrow its layer, and the report says what was done.

    16 filters in 4 groups, `min_group_filters=1000`: all 4 are merged into one
    group of 16 filters, which the report must not call a merge "up to 1000"
    alone.
    """
    inputs = keras.Input((6, 6, 16))
    model = keras.Model(inputs, keras_mgconv.GroupedConv2D(16, 3, groups=4)(inputs))
    report = export_tflite(model, tmp_path / "wide.tflite", min_group_filters=1000)
    assert _conv_groups(report.path) == [(1, 16)]
    text = str(report)
    assert "layers of fewer than 1000 filters into one group, a full convolution" in text
    assert "merged up to 1000 (same function)" not in text
