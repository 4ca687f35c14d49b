"""QAT and pruning with tensorflow-model-optimization, and keras_mgconv under tf_keras.

tfmot runs only on tf_keras, which TensorFlow selects when TF_USE_LEGACY_KERAS=1
is set before it is imported: those checks run in subprocesses, so that this
process keeps Keras 3. Here, the helpers must refuse Keras 3 with a message.
"""

import json
import os
import platform
import re
import subprocess
import sys

import pytest

from keras_mgconv import data, models, optimization

TESTS = os.path.dirname(os.path.abspath(__file__))
TF_KERAS = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}

# Under tf_keras: the layers' own tests (config, weights, fit, mixed precision,
# saving), a factory's build-train-save-load (the other factories' take minutes
# there; optimization_checks.py saves and reloads a MobileNetV2), the batch
# norm statistics that `train` recomputes every epoch, and the optimization
# module's docstring examples.
TF_KERAS_TESTS = [
    "test_grouped_conv.py",
    "test_channel_transfer.py",
    "test_multigrid_conv.py",
    "test_models.py::test_factory_builds_trains_and_reloads[ResNet20]",
    *(
        f"test_batch_norm.py::{name}"
        for name in (
            "test_statistics_are_the_average_batch_statistics_of_the_current_weights",
            "test_callback_recomputes_before_validation",
            "test_nested_models_batch_norm_is_recomputed",
            "test_data_without_a_batch_is_refused_and_changes_nothing",
        )
    ),
    "test_docstrings.py::test_docstring_examples[keras_mgconv.optimization]",
]


def run_under_tf_keras(*args, **environment):
    result = subprocess.run(
        [sys.executable, *args],
        env={**TF_KERAS, **environment},
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return result.stdout


@pytest.fixture(scope="module")
def optimization_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("optimization")


@pytest.fixture(scope="module")
def keras3_file(optimization_dir):
    """A Keras 3 `.keras` file for optimization_checks.py to load into tf_keras, and its outputs.

    What tf_keras cannot read from Keras 3 files, each once: an adapted
    Normalization (variables, and constants derived from them), a nested
    functional model and a nested Sequential one (tf_keras numbers their calls
    from 1), keras_mgconv layers with sublayers, a mixed_float16 layer (dtype
    policies as objects), a Dense (options tf_keras lacks).
    """
    import numpy as np

    import keras_mgconv
    from keras_mgconv._keras import keras

    rng = np.random.default_rng(0)
    inputs_array = (255 * rng.random((16, 8, 8, 3))).astype("float32")
    normalization = keras.layers.Normalization()
    normalization.adapt(inputs_array)
    inner_inputs = keras.Input((8, 8, 3))
    inner = keras.Model(
        inner_inputs,
        keras.layers.BatchNormalization()(
            keras_mgconv.MultigridConv2D(16, 3, padding="same", group_size=8)(inner_inputs)
        ),
        name="inner",
    )
    sequential = keras.Sequential(
        [
            keras.Input((8, 8, 16)),
            keras_mgconv.GroupedConv2D(16, 3, groups=2, padding="same", residual=True),
            keras.layers.Activation("relu"),
        ],
        name="sequential_block",
    )
    inputs = keras.Input((8, 8, 3))
    x = sequential(inner(normalization(inputs)))
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, activation="relu", dtype="mixed_float16")(x)
    outputs = keras.layers.Dense(10, activation="softmax", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name="outer")
    model.compile("adam", "sparse_categorical_crossentropy")
    # Trained a step: batch statistics and weights away from their initial values.
    model.fit(inputs_array, np.arange(16) % 10, epochs=1, verbose=0)
    directory = optimization_dir / "keras3"
    directory.mkdir()
    model.save(directory / "model.keras")
    np.savez(
        directory / "expected.npz",
        inputs=inputs_array,
        outputs=model.predict(inputs_array, verbose=0),
    )
    return directory


@pytest.fixture(scope="module")
def report(optimization_dir, keras3_file):
    output = run_under_tf_keras("optimization_checks.py", str(optimization_dir))
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report_without_onednn(optimization_dir, report, tmp_path_factory):
    """QAT where TensorFlow itself cannot differentiate grouped convolutions (AVX2-only
    CPUs, oneDNN off): the layers train through its oneDNN kernels called directly,
    and must still export grouped. From the float model that `report` trained.

    Where `report`'s own run had no grouped gradient from TensorFlow (oneDNN off:
    the default on AVX2-only CPUs, or TF_ENABLE_ONEDNN_OPTS=0), it is that run:
    a second one would repeat it.
    """
    if report["gradient_source"] == "onednn":
        return report
    output = run_under_tf_keras(
        "optimization_checks.py",
        str(tmp_path_factory.mktemp("optimization_without_onednn")),
        str(optimization_dir / "float.keras"),
        TF_ENABLE_ONEDNN_OPTS="0",
    )
    return json.loads(output.strip().splitlines()[-1])


def test_layer_and_model_tests_pass_under_tf_keras():
    output = run_under_tf_keras("-m", "pytest", "-q", "-p", "no:cacheprovider", *TF_KERAS_TESTS)
    summary = output.strip().splitlines()[-1]
    assert int(re.search(r"(\d+) passed", summary).group(1)) > 130
    assert not re.search(r"failed|skipped|error|deselected", summary), summary


def test_saving_and_loading_under_tf_keras(report):
    # HDF5 failed on duplicate weight names before sublayers got their own scope.
    assert report["h5_difference"] == 0.0
    assert report["keras_difference"] == 0.0
    assert report["mobilenet_difference"] == 0.0


def test_unroll_multigrid_spells_out_the_v_cycle(report):
    assert report["unroll_difference"] < 1e-5
    layers = report["unrolled_layers"]
    assert "MultigridConv2D" not in layers
    # Two 3-level layers, with 2 restrictions, subtractions and additions each.
    assert layers.count("Subtract") == layers.count("Add") == 4
    assert layers.count("ChannelRestriction") == 2 + 2 + 1
    assert not any(report["unrolled_residual"])


def test_empty_calibration_data_is_refused(report):
    assert report["empty_calibration_error"] == (
        "`calibration_data` must hold at least one batch. Received: calibration_data=[]."
    )


@pytest.mark.parametrize("name", ["nan", "inf"])
def test_non_finite_calibration_data_is_refused(report, name):
    # Accepted before: NaN quantizer ranges, and every output NaN.
    assert re.match(
        r"`calibration_data` must give finite activations: its batch 1 gives layer "
        r"'\w+' the range \[.*(nan|inf).*\].*Received: calibration_data=\[array",
        report[f"{name}_calibration_error"],
    ), report.get(f"{name}_calibration_error")


@pytest.mark.parametrize("onednn", ["default", "off"])
def test_quantization_aware_training_exports_an_int8_model_as_accurate(onednn, request):
    # Converted from the QAT model, the TFLite model computes in int8 and loses
    # at most 1 point of the float model's test accuracy, whether the layers
    # trained through TensorFlow's grouped gradient or oneDNN's kernels called
    # directly.
    report = request.getfixturevalue("report" if onednn == "default" else "report_without_onednn")
    assert report["grouped_gradient"] is True
    if onednn == "off" and platform.machine().lower() in ("x86_64", "amd64"):
        assert report["gradient_source"] == "onednn"
    assert report["test_examples"] == data.image_dataset_info("digits").num_examples["test"]
    assert report["float_accuracy"] > 0.95
    assert report["tflite_accuracy"] >= report["float_accuracy"] - 0.01
    assert abs(report["tflite_accuracy"] - report["qat_accuracy"]) <= 0.01
    assert report["compute_op_types"] == ["int8"]
    # Every convolution of the V-cycles is one int8 CONV_2D, grouped ones included.
    assert report["conv_ops"] == report["unrolled_convolutions"] > 40
    # Only the input normalisation before tfmot's first quantizer is float.
    assert set(report["float_ops"]) <= {"DELEGATE", "DEQUANTIZE", "SUB", "MUL"}
    assert report["qat_reload_difference"] == 0.0


def test_mobilenet_v3_quantizes_to_int8_and_is_wrapped_for_pruning(report):
    # tfmot refused it before: "Layer rescaling:<class '...Rescaling'> is not
    # supported", and its 28 Multiply layers (hard-swish, squeeze-and-excitation) after.
    ops = set(report["mobilenet_v3_ops"])
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "MUL", "ADD", "MEAN"} <= ops
    assert not any(op.startswith(("Flex", "CUSTOM")) for op in ops)
    # Only the input preprocessing (x / 127.5 - 1) before tfmot's first
    # quantizer, and the float output, are float.
    assert report["mobilenet_v3_float_ops"] == ["ADD", "DEQUANTIZE", "DEQUANTIZE", "MUL"]
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "MUL", "ADD", "MEAN"} <= set(
        report["mobilenet_v3_int8_ops"]
    )
    # The int8 file computes the QAT model's function: softmax outputs within a few steps.
    assert report["mobilenet_v3_int8_difference"] < 0.01
    assert report["mobilenet_v3_int8_top1"] >= 7 / 8
    # tfmot prunes no depthwise kernel.
    assert report["mobilenet_v3_pruned"] == ["Conv2D", "MultigridConv2D"]
    assert "Rescaling" in report["mobilenet_v3_unwrapped"]


def test_pruning_reaches_the_sparsity_and_keeps_the_accuracy(report):
    assert abs(report["sparsity"] - 0.5) <= 0.02
    assert all(abs(s - 0.5) <= 0.02 for s in report["multigrid_sparsities"])
    # Every kernel of every V-cycle, as tfmot's own prune_low_magnitude finds them.
    assert len(report["multigrid_sparsities"]) == report["tfmot_multigrid_kernels"] > 30
    assert {"MultigridConv2D", "Conv2D", "Dense"} <= set(report["wrapped"])
    assert report["pruned_accuracy"] >= report["float_accuracy"] - 0.02
    # strip_pruning gives plain layers with the same function, saved and reloaded.
    assert report["stripped_accuracy"] == report["pruned_accuracy"]
    assert "PruneLowMagnitude" not in report["stripped_layers"]
    assert "Normalization" in report["stripped_layers"]


def test_structured_pruning_zeroes_whole_groups(report):
    assert report["structured_wrapped"][1:3] == ["GroupPruneLowMagnitude"] * 2
    groups = report["structured_groups"]
    assert len(groups) == 12
    for name, count, zero, partly in groups:
        assert partly == 0, name
        # Zeroed connector groups would silence channels: it keeps them all.
        expected = 0 if name == "connector" else count - max(1, round(count * 0.5))
        assert zero == expected, name
    assert groups[0][:2] == ["connector", 2]
    assert report["structured_silent_channels"] == 0
    assert report["structured_stripped_difference"] == 0.0
    assert report["structured_dense_zeros"] == 0


def test_structured_pruning_refuses_the_block_design(report):
    assert re.match(
        r"Structured pruning prunes the groups of MultigridConv2D .* model 'resnet8' "
        r"has none\..*structured=False\. Received: structured=True\.$",
        report["block_design_structured_error"],
    ), report.get("block_design_structured_error")


@pytest.fixture(scope="module")
def keras3_model():
    return models.ResNet20(input_shape=(8, 8, 1), group_size=16)


@pytest.mark.parametrize(
    "call",
    [
        lambda model: optimization.quantize_model(model),
        lambda model: optimization.unroll_multigrid(model),
        lambda model: optimization.prune_low_magnitude(model, None),
        lambda model: optimization.quantize_scope(),
        lambda model: optimization.prune_scope(),
        lambda model: optimization.tflite_converter(model),
    ],
    ids=[
        "quantize_model",
        "unroll_multigrid",
        "prune_low_magnitude",
        "quantize_scope",
        "prune_scope",
        "tflite_converter",
    ],
)
def test_helpers_refuse_keras_3_with_the_way_out(call, keras3_model):
    with pytest.raises(
        RuntimeError,
        match=r'pip install "keras-mgconv\[optimization\]"'
        r".*TF_USE_LEGACY_KERAS=1.*Received: Keras 3",
    ):
        call(keras3_model)
    # Importing tfmot would have switched this process' environment to tf_keras.
    assert "tensorflow_model_optimization" not in sys.modules
    assert os.environ.get("TF_USE_LEGACY_KERAS") != "1"


def test_a_keras_3_file_loads_into_tf_keras_with_its_weights(report):
    # tf_keras' own load_model: "Unrecognized keyword arguments: ['batch_shape']".
    assert report["keras3_load_difference"] < 1e-5
    assert {"Normalization", "Functional", "Sequential", "Dense"} <= set(report["keras3_layers"])
    assert "mixed_float16" in report["keras3_policies"]
    assert re.fullmatch(
        r"`path` must be an existing \.keras file\. Received: "
        r"path='.*missing\.keras'\.",
        report["load_missing_error"],
    )
    assert re.fullmatch(
        r".*damaged\.keras is not a readable Keras model \(BadZipFile: .*\): "
        r"it is truncated, damaged or was not saved by Keras\. "
        r"Received: path='.*damaged\.keras'\.",
        report["load_damaged_error"],
    )


@pytest.mark.parametrize("channels", [1, 16])
def test_calibration_data_as_an_array_is_batched(report, channels):
    # Iterated one image at a time before: with 1 channel a relative error of
    # 0.67, against 0.02-0.03 as one batch; with 16, a bare shape error.
    # Batched by 32 (averages of two batches' ranges, slightly narrower than
    # the whole array's): 0.04-0.06.
    array = report[f"calibration_array_{channels}"]
    assert isinstance(array, float), array
    assert array < 0.1
    if channels == 1:
        assert report["calibration_batch_1"] < 0.05


def test_calibration_batches_of_the_wrong_shape_are_refused(report):
    assert report["calibration_shape_error_images"].startswith(
        "`calibration_data` must give batches of the model's inputs, of shape "
        "(batch, 8, 8, 16): its batch 0 has shape (8, 8, 16)."
    )
    assert report["calibration_shape_error_array"] == (
        "`calibration_data` must be an array of the model's inputs, of shape (inputs, 8, 8, "
        "16). Received: calibration_data of shape (64, 8, 8, 3)."
    )


@pytest.mark.parametrize(
    "name,message",
    [
        (
            "schedule",
            "ValueError: `pruning_schedule` must be a tfmot.sparsity.keras."
            "PruningSchedule, e.g. ConstantSparsity(0.5, 0) or PolynomialDecay(0.0, 0.5, "
            "0, 1000). Received: pruning_schedule='notaschedule'.",
        ),
        (
            "structured",
            "ValueError: `structured` must be True or False. Received: structured='yes'.",
        ),
        (
            "converter",
            "ValueError: `model` must be a built model with known inputs, e.g. "
            "functional or Sequential with an Input. Received: model='x'.",
        ),
    ],
)
def test_helpers_refuse_bad_arguments_when_called(report, name, message):
    # Accepted before, and failed inside fit, or (tflite_converter) an AttributeError.
    assert report[f"{name}_error"] == message


def _test_accuracy(model_path):
    """The Keras 3 test accuracy of a saved digits classifier, and the number of images."""
    import numpy as np

    from keras_mgconv._keras import keras

    model = keras.models.load_model(model_path)
    batches = list(data.image_pipeline("digits", "test", 256))
    correct = sum(
        int(np.sum(np.argmax(model(images, training=False), -1) == labels))
        for images, labels in batches
    )
    count = sum(len(labels) for _, labels in batches)
    return correct / count, count


def test_quantize_command_fine_tunes_a_trained_model_to_int8(digits_run, tmp_path, capfd):
    """train (Keras 3), then QAT under tf_keras, then an int8 file: the command line's path."""
    from keras_mgconv import cli

    output_dir, _ = digits_run
    model_path = os.path.join(output_dir, "best.keras")
    output = tmp_path / "model.int8.tflite"
    # A short run: 2 steps after calibrating on 2 batches.
    assert (
        cli.main(
            [
                "quantize",
                model_path,
                "--dataset",
                "digits",
                "--epochs",
                "1",
                "--steps-per-epoch",
                "2",
                "--calibration-batches",
                "2",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    printed = capfd.readouterr().out
    figures = re.search(
        r"Test accuracy on (\d+) images: float ([\d.]+), QAT ([\d.]+), int8 "
        r"LiteRT ([\d.]+)\.",
        printed,
    )
    assert figures, printed
    count, float_accuracy, qat_accuracy, int8_accuracy = (
        int(figures[1]),
        *map(float, figures.groups()[1:]),
    )
    # tf_keras read the Keras 3 file whole: the accuracy Keras 3 gives it.
    keras3_accuracy, keras3_count = _test_accuracy(model_path)
    assert count == keras3_count
    assert float_accuracy == pytest.approx(keras3_accuracy, abs=0.5e-4 + 1 / count)
    assert float_accuracy > 0.9
    assert int8_accuracy >= float_accuracy - 0.03
    assert abs(int8_accuracy - qat_accuracy) <= 0.02
    assert output.exists()
    assert f"{output}: {output.stat().st_size:,} bytes, int8 (input float32, " in printed
    assert "all TFLite builtins" in printed


def test_quantize_command_refuses_a_missing_model_in_one_line(capfd):
    from keras_mgconv import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quantize", "missing.keras"])
    assert exit_info.value.code == 2
    error = capfd.readouterr().err.strip().splitlines()
    assert error == [
        "keras-mgconv quantize: error: `model` must be an existing .keras file. "
        "Received: model='missing.keras'."
    ]
