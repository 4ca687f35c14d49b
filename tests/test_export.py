import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert import interpreter as litert

import keras_mgconv
from conftest import bottleneck_resnet
from keras_mgconv import data, export, models
from keras_mgconv._keras import keras
from keras_mgconv.export import export_tflite, float32_tolerance, measure_latency

MODES = [quantization or "float32" for quantization in export.QUANTIZATIONS]


# One member of each factory family (see conftest.FAMILY_MEMBER): each export
# takes 5-50 s on 2 cores, growing with depth and width, and all 36 would take
# about 15 minutes. Narrowed, the ImageNet ResNets convert to the same ops in
# half the time (ResNet18: 8.8 s against 15.5 s); so does MobileNetV2 with six
# multigrid layers of groups of 32 instead of thirty of groups of 8.
EXPORTED = {
    "ResNet20": (models.ResNet20, (8, 8, 3), {}),
    "ResNet18": (models.ResNet18, (32, 32, 3), {"width": 0.25}),
    "MobileNetV2": (models.MobileNetV2, (32, 32, 3), {"alpha": 0.35, "group_size": 32}),
    # Squeeze-and-excitation, hard-swish (HARD_SWISH) and 1x1 head convolutions;
    # groups of 32 leave four multigrid layers of 2-3 levels, which cost less
    # to convert than its twenty-one of groups of 8.
    "MobileNetV3Small": (models.MobileNetV3Small, (32, 32, 3), {"alpha": 0.75, "group_size": 32}),
    "ResNet50-2222": (bottleneck_resnet, (32, 32, 3), {"width": 0.25}),
}


@pytest.fixture(scope="module")
def digits_model(digits_run):
    """A multigrid ResNet20 trained briefly on the embedded digits."""
    output_dir, _ = digits_run
    return keras.models.load_model(os.path.join(output_dir, "best.keras"))


@pytest.fixture(scope="module")
def digits_images(digits_model):
    """(train images, test images) of the digits at the model's input shape."""

    def images(split):
        return np.concatenate(
            [
                batch
                for batch, _ in data.image_pipeline(
                    "digits", split, 256, image_shape=digits_model.input_shape[1:]
                )
            ]
        )

    return images("train"), images("test")


def _run_tflite(path, images):
    """The float outputs of a float-input .tflite model, one image at a time."""
    interpreter = litert.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    outputs = []
    for image in images:
        interpreter.set_tensor(input_index, image[None])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(output_index)[0])
    return np.stack(outputs)


def _small_model():
    inputs = keras.Input((8, 8, 16))
    x = keras.layers.Conv2D(32, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))


# float16 and dynamic_range change how the weights are stored, not which ops a
# layer converts to (test_quantization_modes_shrink_the_file shows them); every
# family converts in float32 (exactly) and in int8 (every tensor quantized).
@pytest.mark.parametrize(
    "name,mode", [(name, mode) for name in EXPORTED for mode in ("float32", "int8")]
)
def test_factory_model_exports_with_builtin_ops_only(tmp_path, name, mode):
    factory, input_shape, kwargs = EXPORTED[name]
    model = factory(input_shape=input_shape, classes=10, **kwargs)
    images = np.random.default_rng(0).random((8, *input_shape), np.float32)
    path = tmp_path / "model.tflite"
    report = export_tflite(
        model, path, None if mode == "float32" else mode, representative_data=images
    )
    assert report.builtin_only, report.op_counts
    assert report.quantization == mode
    assert report.op_counts["CONV_2D"] > 0
    assert report.size_bytes == os.path.getsize(path)
    assert report.input_dtype == report.output_dtype == "float32"
    assert report.verification.examples == 8
    if mode == "float32":
        assert report.verification.max_rel_diff <= float32_tolerance(model)
        assert report.verification.top1_agreement == 1.0


def test_quantization_modes_shrink_the_file(tmp_path):
    inputs = keras.Input((8, 8, 64))
    x = keras_mgconv.MultigridConv2D(128, 3, padding="same", group_size=16)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    images = np.random.default_rng(0).random((16, 8, 8, 64), np.float32)
    reports = {
        mode: export_tflite(
            model,
            tmp_path / f"{mode}.tflite",
            None if mode == "float32" else mode,
            representative_data=images,
        )
        for mode in MODES
    }
    assert all(report.builtin_only for report in reports.values())
    size = {
        mode: report.size_bytes / reports["float32"].size_bytes for mode, report in reports.items()
    }
    # Weights take 2 bytes in float16 and 1 in int8, against 4.
    assert 0.4 < size["float16"] < 0.6
    assert size["dynamic_range"] < 0.4 and size["int8"] < 0.4
    # Float16 weights are dequantized on load; int8 with float input and output
    # quantizes the input and dequantizes the output.
    assert "DEQUANTIZE" in reports["float16"].op_counts
    assert reports["int8"].op_counts["QUANTIZE"] == reports["int8"].op_counts["DEQUANTIZE"] == 1
    assert "QUANTIZE" not in reports["dynamic_range"].op_counts
    # Float16 rounds every weight by up to 2**-11, 2**13 times float32's unit
    # roundoff: more than float32's rounding of this model's sums (about 1000
    # terms) can change its outputs.
    assert (
        reports["float32"].verification.max_rel_diff
        <= float32_tolerance(model)
        < min(reports[mode].verification.max_rel_diff for mode in MODES[1:])
    )


def test_float32_and_split_exports_match_trained_keras_model(tmp_path, digits_model, digits_images):
    _, test_images = digits_images
    grouped = export_tflite(
        digits_model, tmp_path / "grouped.tflite", verification_data=test_images
    )
    assert grouped.verification.examples == len(test_images) > 300
    assert grouped.verification.data == "verification_data"
    # Both exports and Keras compute the same float32 sums in other orders.
    rounding = float32_tolerance(digits_model)
    assert grouped.verification.max_rel_diff <= rounding
    assert grouped.verification.top1_agreement == 1.0
    # Checked independently of export_tflite's own verification.
    expected = digits_model.predict(test_images, verbose=0)
    grouped_outputs = _run_tflite(grouped.path, test_images)
    atol = rounding * np.max(np.abs(expected))
    np.testing.assert_allclose(grouped_outputs, expected, atol=atol)

    split = export_tflite(digits_model, tmp_path / "split.tflite", lowering="split")
    assert "SPLIT" not in grouped.op_counts and "CONCATENATION" not in grouped.op_counts
    assert split.op_counts["SPLIT"] == split.op_counts["CONCATENATION"] > 0
    assert split.op_counts["CONV_2D"] > grouped.op_counts["CONV_2D"]
    np.testing.assert_allclose(_run_tflite(split.path, test_images), grouped_outputs, atol=atol)
    # The model exported is a rebuilt copy: the user's model keeps its layers.
    implementations = {
        layer.implementation for layer in digits_model.layers if hasattr(layer, "implementation")
    }
    assert implementations == {"auto"}


@pytest.mark.parametrize("integer_io", [False, True])
def test_int8_export_agrees_with_keras_on_digits(tmp_path, digits_model, digits_images, integer_io):
    train_images, test_images = digits_images
    report = export_tflite(
        digits_model,
        tmp_path / "model.tflite",
        "int8",
        representative_data=train_images[:200],
        verification_data=test_images,
        integer_io=integer_io,
    )
    dtype = "int8" if integer_io else "float32"
    assert report.input_dtype == report.output_dtype == dtype
    assert report.builtin_only
    assert report.verification.examples == len(test_images)
    assert report.verification.top1_agreement >= 0.98
    # Quantized, so not float32-exact, but close on softmax outputs.
    assert 1e-4 < report.verification.max_abs_diff < 0.3


def test_xnnpack_off_leaves_the_graph_undelegated(tmp_path):
    path = tmp_path / "model.tflite"
    export_tflite(_small_model(), path)
    # Delegated partitions show up as "DELEGATE" nodes in the execution plan.
    for xnnpack in (True, False):
        ops = export._interpreter(str(path), threads=1, xnnpack=xnnpack)._get_ops_details()
        assert any(op["op_name"] == "DELEGATE" for op in ops) == xnnpack


def test_measure_latency_reports_each_combination(tmp_path):
    path = tmp_path / "model.tflite"
    export_tflite(_small_model(), path)
    rows = measure_latency(path, threads=(1, 2), repeats=5, warmup=1)
    assert [(row["threads"], row["xnnpack"]) for row in rows] == [
        (1, True),
        (1, False),
        (2, True),
        (2, False),
    ]
    assert all(0 < row["median_ms"] <= row["p90_ms"] for row in rows)


class _Cumprod(keras.layers.Layer):
    """A layer whose op (tf.math.cumprod) TFLite has no builtin for."""

    def call(self, inputs):
        return tf.math.cumprod(inputs, axis=-1)


def _flex_model():
    inputs = keras.Input((4,))
    return keras.Model(inputs, _Cumprod()(inputs), name="cumprod_model")


def test_flex_ops_are_refused_and_leave_the_file_as_it_was(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"previous export")
    with pytest.raises(
        ValueError,
        match=r"\(Cumprod\).*allow_flex_ops=True.*"
        r"Received: model='cumprod_model'\.",
    ):
        export_tflite(_flex_model(), path)
    assert path.read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["model.tflite"]


def test_flex_ops_when_allowed_are_reported_and_not_verified(tmp_path):
    report = export_tflite(_flex_model(), tmp_path / "model.tflite", allow_flex_ops=True)
    assert not report.builtin_only
    assert "FlexCumprod" in report.op_counts
    assert report.verification is None
    assert "not verified" in str(report)


@pytest.mark.parametrize(
    "arguments,message",
    [
        ({"path": "missing/model.tflite"}, r"existing, writable directory.*Received: path="),
        ({"path": "model.h5"}, r"ending in \.tflite\. Received: path="),
        ({"quantization": "int8"}, r"Received: representative_data=None\."),
        ({"quantization": "int4"}, r"Received: quantization='int4'\."),
        ({"lowering": "fused"}, r"Received: lowering='fused'\."),
        ({"pointwise": "folded"}, r"Received: pointwise='folded'\."),
        ({"min_group_filters": 0}, r"'auto' or a positive int.*Received: min_group_filters=0\."),
        ({"min_group_filters": "wide"}, r"Received: min_group_filters='wide'\."),
        ({"integer_io": True}, r"Received: integer_io=True, quantization=None\."),
        (
            {"representative_data": np.zeros((4, 8, 8, 3), np.float32)},
            r"input shape \(8, 8, 16\)\. Received: representative_data of shape \(4, 8, 8, 3\)\.",
        ),
        ({"verification_data": 3}, r"Received: verification_data=3\."),
        # Calibrated on NaN, an int8 export was written and "agreed 100%, max abs diff nan".
        (
            {
                "quantization": "int8",
                "representative_data": np.full((4, 8, 8, 16), np.nan, np.float32),
            },
            r"`representative_data` must hold finite values; "
            r"4096 of its 4096 are NaN or infinite\. "
            r"Received: representative_data of shape \(4, 8, 8, 16\)\.",
        ),
        (
            {
                "verification_data": np.stack(
                    [np.zeros((8, 8, 16), np.float32), np.full((8, 8, 16), -np.inf, np.float32)]
                )
            },
            r"`verification_data` must hold finite values; 1024 of its 2048",
        ),
    ],
)
def test_bad_arguments_raise_before_writing(tmp_path, arguments, message):
    arguments = {"path": "model.tflite", **arguments}
    arguments["path"] = str(tmp_path / arguments["path"])
    with pytest.raises(ValueError, match=message):
        export_tflite(_small_model(), **arguments)
    assert os.listdir(tmp_path) == []


def test_export_removes_the_temporary_file_of_a_killed_export(tmp_path):
    dead_pid = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # A SIGKILLed export of model.tflite, and one of another file.
    stale = tmp_path / f".model.{dead_pid}.tmp.tflite"
    other = tmp_path / f".other.{dead_pid}.tmp.tflite"
    for path in (stale, other):
        path.write_bytes(b"half an export")
    export_tflite(_small_model(), tmp_path / "model.tflite")
    assert sorted(os.listdir(tmp_path)) == sorted(["model.tflite", other.name])


def _normalized_model():
    """`_small_model` behind the input normalisation `train` gives its models: pixels 0-255."""
    inputs = keras.Input((8, 8, 16))
    normalized = keras.layers.Normalization(mean=100.0, variance=50.0**2)(inputs)
    return keras.Model(inputs, _small_model()(normalized))


@pytest.mark.parametrize(
    "scale, offset", [(1e30, 0.0), (0.0, 0.0), (0.01, 0.0), (10.0, 0.0), (1.0, 200.0)]
)
def test_int8_calibration_unlike_the_training_inputs_is_refused(tmp_path, scale, offset):
    # A trained model calibrated on 1e30 * ones agreed 100% with Keras on them,
    # and 11.5% (chance) on its test images; see export._check_representative.
    typical = np.random.default_rng(0).normal(100.0, 50.0, (16, 8, 8, 16)).astype(np.float32)
    with pytest.raises(
        ValueError,
        match=r"`representative_data` does not look like the "
        r"inputs the model was trained on",
    ):
        export_tflite(
            _normalized_model(),
            tmp_path / "model.tflite",
            "int8",
            representative_data=typical * scale + offset,
        )
    assert os.listdir(tmp_path) == []
    export._check_representative(_normalized_model(), typical)


@pytest.fixture(scope="module")
def small_trained_models():
    """{batch_norm: a small CNN trained briefly on the digits (90% test accuracy), with
    a BatchNormalization after its convolution or without}, and (train, test) images
    in [0, 1]. No input normalisation: as a factory model trained by the user."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = (digits.images / 16).astype(np.float32)[..., None], digits.target
    trained = {}
    for batch_norm in (True, False):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(8, 3, padding="same"),
                *([keras.layers.BatchNormalization(momentum=0.9)] if batch_norm else []),
                keras.layers.ReLU(),
                keras.layers.Flatten(),
                keras.layers.Dense(10),
            ]
        )
        model.compile(
            keras.optimizers.Adam(0.01),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(images[:1500], labels[:1500], epochs=3, batch_size=64, verbose=0)
        trained[batch_norm] = model
    return trained, (images[:1500], images[1500:])


def test_int8_calibration_far_from_the_batch_norm_statistics_is_refused(
    tmp_path, small_trained_models
):
    # Calibrated on the digits scaled by 50, a factory ResNet20 without an input
    # normalisation agreed with Keras on 9% of them, and the export passed.
    models_by_batch_norm, (train_images, _) = small_trained_models
    model = models_by_batch_norm[True]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "does not look like the inputs the model was trained on, as its first "
            f"BatchNormalization layer {model.layers[1].name!r} describes them: in the "
            "median channel, its standard deviation is "
        )
        + r"4\d\.\d and",
    ):
        export_tflite(
            model, tmp_path / "model.tflite", "int8", representative_data=train_images[:200] * 50
        )
    assert os.listdir(tmp_path) == []
    export._check_representative(model, train_images[:200])


def test_int8_export_whose_top1_agreement_collapses_raises(tmp_path, small_trained_models):
    models_by_batch_norm, (train_images, test_images) = small_trained_models
    # Nothing in the model tells how its inputs were spread: the check falls to the file.
    with pytest.raises(
        RuntimeError,
        match=r"The int8 export agrees with the Keras model on "
        r"the top class of only 2\d\.\d% of the \d+ of 297 examples "
        r"\(verification_data\) whose top class Keras decides, fewer than 50%",
    ):
        export_tflite(
            models_by_batch_norm[False],
            tmp_path / "model.tflite",
            "int8",
            representative_data=train_images[:200] * 0.02,
            verification_data=test_images,
        )
    assert os.listdir(tmp_path) == []


def test_float32_mismatch_raises_and_writes_nothing(tmp_path, monkeypatch):
    def broken_verify(*args):
        return export.Verification(
            examples=8, data="random", max_abs_diff=0.5, max_rel_diff=0.5, top1_agreement=0.5
        )

    monkeypatch.setattr(export, "_verify", broken_verify)
    model = _small_model()
    # Sums of 3 * 3 * 16 products, 8 * 8 pixels, 32 products and 10 classes,
    # and 4 roundings in each of the 5 layers.
    tolerance = 2 * (3 * 3 * 16 + 8 * 8 + 32 + 10 + 5 * 4) * 2**-24
    assert float32_tolerance(model) == tolerance
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"differs from the Keras model by 0.5 (relative), more than float32 rounding "
            f"can make it differ ({tolerance:.3g}"
        ),
    ):
        export_tflite(model, tmp_path / "model.tflite")
    assert os.listdir(tmp_path) == []


def test_export_of_a_model_with_nan_outputs_fails_and_writes_nothing(tmp_path):
    model = _small_model()
    classifier = model.layers[-1]
    kernel, bias = classifier.get_weights()
    classifier.set_weights([kernel, np.full_like(bias, np.nan)])  # as after a diverged run
    images = np.random.default_rng(0).random((8, 8, 8, 16), np.float32)
    with pytest.raises(RuntimeError, match=r"NaN or infinite: not written to .*model\.tflite"):
        export_tflite(model, tmp_path / "model.tflite", "int8", representative_data=images)
    assert os.listdir(tmp_path) == []


def _fully_convolutional_model(padding):
    """A classifier of images of any size: a multigrid layer, global pooling, a softmax."""
    inputs = keras.Input((None, None, 3))
    x = keras_mgconv.MultigridConv2D(16, 3, padding=padding, group_size=8)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_a_model_of_any_input_size_exports_for_the_size_of_its_data(tmp_path, padding):
    # Before: TypeError "unsupported operand type(s) for *: 'int' and 'NoneType'"
    # (the global pooling's pixels); without it, "valid" failed in XNNPACK, the
    # file being converted for 1x1 inputs.
    model = _fully_convolutional_model(padding)
    images = np.random.default_rng(0).random((4, 12, 10, 3), np.float32)
    report = export_tflite(model, tmp_path / "data.tflite", verification_data=images)
    assert report.input_shape == (1, 12, 10, 3)
    assert report.keras_input_shape == (None, None, None, 3)
    assert "converted for inputs of shape (12, 10, 3); the Keras model takes (None, None, 3)" in (
        str(report)
    )
    assert report.verification.examples == 4
    assert report.verification.max_rel_diff <= float32_tolerance(model, (12, 10, 3))
    # Or for a size of the user's choosing, verified on random inputs of it.
    sized = export_tflite(model, tmp_path / "sized.tflite", input_shape=(9, 9, 3))
    assert sized.input_shape == (1, 9, 9, 3) and sized.verification.data == "random"
    assert sized.verification.top1_agreement == 1.0


@pytest.mark.parametrize(
    "arguments,message",
    [
        (
            {},
            r"`model` takes inputs of any size \(None, None, 3\), and a LiteRT file is converted "
            r"for one: pass input_shape=\(height, width, channels\), or `verification_data` or "
            r"`representative_data` of the size to export for \(in the CLI: --image-size or "
            r"--dataset\)\. Received: input_shape=None\.",
        ),
        (
            {"input_shape": (9, 9, 4)},
            r"matching \(None, None, 3\)\. Received: input_shape=\(9, 9, 4\)\.",
        ),
        (
            {"input_shape": (9, 9, 3), "verification_data": np.zeros((2, 12, 12, 3), np.float32)},
            r"`verification_data` must hold inputs of the shape the model is exported for, "
            r"\(9, 9, 3\)\. "
            r"Received: verification_data of shape \(2, 12, 12, 3\)\.",
        ),
    ],
)
def test_a_model_of_any_input_size_without_a_size_is_refused(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        export_tflite(_fully_convolutional_model("same"), tmp_path / "model.tflite", **arguments)
    assert os.listdir(tmp_path) == []


def test_a_mixed_float16_model_exports_from_a_float32_copy(tmp_path):
    # Before: about 50 lines of MLIR errors, then a ValueError blaming the layers
    # for Flex ops (Conv2D, Sub, ... on float16 tensors).
    keras.mixed_precision.set_global_policy("mixed_float16")
    inputs = keras.Input((8, 8, 16))
    x = keras_mgconv.MultigridConv2D(16, 3, padding="same", group_size=8)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax", dtype="float32")(x))
    keras.mixed_precision.set_global_policy("float32")
    images = np.random.default_rng(0).random((8, 8, 8, 16), np.float32)
    for mode in ("float32", "int8"):
        report = export_tflite(
            model,
            tmp_path / f"{mode}.tflite",
            None if mode == "float32" else mode,
            representative_data=images,
        )
        assert report.builtin_only, report.op_counts
        assert report.converted_from == "mixed_float16"
        assert "converted from a float32 copy (same weights) of the mixed_float16 model" in str(
            report
        )
    # Checked against the float32 copy, within float32 rounding; and against
    # the mixed model itself, within its float16 rounding.
    assert report.verification.top1_agreement >= 0.75
    float32 = _run_tflite(tmp_path / "float32.tflite", images)
    np.testing.assert_allclose(float32, model.predict(images, verbose=0), atol=2e-3)
    # The user's model is left as it was.
    assert model.layers[1].compute_dtype == "float16"


def test_pointwise_layers_export_as_their_matrix_where_it_runs_faster(tmp_path):
    # An expansion 16 -> 512, whose matrix has 8,192 multiply-adds per pixel
    # against its cycle's 20,288, and a stride-2 projection 512 -> 64, whose
    # matrix has 32,768 against 2,368: XNNPACK runs the cycle's small grouped
    # convolutions (groups of 8) at about an eighth of the matrix's rate, so
    # "auto" exports the first as its matrix and keeps the second's cycle.
    inputs = keras.Input((4, 4, 16))
    x = keras_mgconv.MultigridConv2D(512, 1, group_size=8, name="expand")(inputs)
    x = keras.layers.ReLU()(x)
    outputs = keras_mgconv.MultigridConv2D(
        64, 1, strides=2, use_bias=False, group_size=8, name="project"
    )(x)
    model = keras.Model(inputs, outputs)
    images = np.random.default_rng(0).random((4, 4, 4, 16), np.float32)
    reports = {
        pointwise: export_tflite(
            model, tmp_path / f"{pointwise}.tflite", verification_data=images, pointwise=pointwise
        )
        for pointwise in export.POINTWISE
    }
    cycle = {name: len(model.get_layer(name).convolutions) for name in ("expand", "project")}
    assert reports["cycle"].op_counts["CONV_2D"] == sum(cycle.values())
    assert reports["dense"].op_counts == {"CONV_2D": 2}
    assert reports["auto"].op_counts["CONV_2D"] == 1 + cycle["project"]
    assert {name: report.dense_pointwise_layers for name, report in reports.items()} == {
        "auto": 1,
        "dense": 2,
        "cycle": 0,
    }
    assert "1 1x1 multigrid layers exported as their cycle's matrix" in str(reports["auto"])
    expected = model.predict(images, verbose=0)
    for report in reports.values():
        np.testing.assert_allclose(
            _run_tflite(report.path, images),
            expected,
            rtol=0,
            atol=float32_tolerance(model) * np.abs(expected).max(),
        )
    # In int8, where XNNPACK's narrow-group kernels are slower still, both are.
    int8 = export_tflite(model, tmp_path / "int8.tflite", "int8", representative_data=images)
    assert int8.dense_pointwise_layers == 2 and int8.op_counts["CONV_2D"] == 2
    # Nested in a model of the user's, the same layer is exported as its matrix.
    nested = keras.Sequential([keras.Input((4, 4, 16)), model])
    report = export_tflite(nested, tmp_path / "nested.tflite", verification_data=images)
    assert report.dense_pointwise_layers == 1
    assert isinstance(model.get_layer("expand"), keras_mgconv.MultigridConv2D)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """`_small_model` exported to a .tflite file."""
    path = tmp_path_factory.mktemp("small_export") / "model.tflite"
    export_tflite(_small_model(), path)
    return path


@pytest.mark.parametrize(
    "arguments,message",
    [
        (
            {"xnnpack": "yes"},
            r"`xnnpack` must be True, False or a sequence of them, e\.g\. "
            r"\(True, False\)\. Received: xnnpack='yes'\.",
        ),
        (
            {"threads": 2.5},
            r"`threads` must be a positive integer or a sequence of them\. "
            r"Received: threads=2\.5\.",
        ),
        (
            {"path": "model.keras"},
            r"`path` must be a \.tflite file .*Received: path='.*model\.keras'\.",
        ),
        (
            {"path": "damaged.tflite"},
            r"`path` is not a readable LiteRT model \(.*\)\. "
            r"Received: path='.*damaged\.tflite'\.",
        ),
    ],
)
def test_measure_latency_refuses_bad_arguments(small_export, arguments, message):
    # xnnpack="yes" was measured as three runs with XNNPACK on; threads=2.5
    # raised a TypeError; a .keras file gave "The model is not a valid
    # Flatbuffer buffer", naming neither the file nor .tflite.
    directory = small_export.parent
    (directory / "model.keras").write_bytes(b"PK")
    (directory / "damaged.tflite").write_bytes(small_export.read_bytes()[:100])
    arguments = {"path": small_export.name, **arguments}
    arguments["path"] = directory / arguments["path"]
    with pytest.raises(ValueError, match=message):
        measure_latency(**arguments, repeats=1, warmup=0)


def test_benchmark_of_a_keras_file_names_the_file_and_tflite(tmp_path, capsys):
    from keras_mgconv import cli

    model = tmp_path / "best.keras"
    _small_model().save(model)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["benchmark", str(model)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"keras-mgconv benchmark: error: `path` must be a .tflite file (a LiteRT model, as "
        f"`export_tflite` or `keras-mgconv export` writes). Received: path='{model}'.\n"
    )


def test_export_command_shows_no_converter_lines(tmp_path):
    """`keras-mgconv export` prints its report, and TensorFlow's lines only where they matter.

    Run as a user runs it, with TensorFlow's info and warning lines asked for
    (TF_CPP_MIN_LOG_LEVEL=0): before, about 20 converter lines, LiteRT's
    "Created TensorFlow Lite XNNPACK delegate", and tf.data's warning that
    the command's `.take(1)` read its cached pipeline only in part.
    """
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x)).save(
        tmp_path / "model.keras"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_mgconv.cli",
            "export",
            str(tmp_path / "model.keras"),
            "--quantization",
            "int8",
            "--dataset",
            "digits",
            "--samples",
            "50",
        ],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "int8 (input float32, output float32)" in result.stdout
    for line in (
        "tf_tfl_flatbuffer_helpers",
        "Reading SavedModel",
        "fully_quantize",
        "flatbuffer_export",
        "XNNPACK delegate",
        "cache_dataset_ops",
        "did not fully read the dataset",
    ):
        assert line not in result.stdout + result.stderr, result.stderr[-3000:]
