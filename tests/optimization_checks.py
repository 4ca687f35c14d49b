"""QAT and pruning of a multigrid ResNet under tf_keras; prints one JSON report.

Run by test_optimization.py in a subprocess with TF_USE_LEGACY_KERAS=1, so that
the test process keeps Keras 3. Everything trains on the embedded digits: a
multigrid CIFAR ResNet8 (group size 8: V-cycles of 2, 3 and 4 levels), then
its QAT model, exported to int8 TFLite, and a 50% pruned copy, each fine-tuned
with Adam and a cosine decay, as the float model was. The network and the runs
are as small as keeps the accuracy figures steady: the whole script takes
about 100 s of CPU on a 2-core machine, most of it tracing and conversion.

    TF_USE_LEGACY_KERAS=1 python tests/optimization_checks.py OUTPUT_DIR
    TF_USE_LEGACY_KERAS=1 python tests/optimization_checks.py OUTPUT_DIR FLOAT_MODEL

The second form runs only QAT, from the float model a first run saved
(OUTPUT_DIR/float.keras): test_optimization.py repeats it with oneDNN off where
the first run had it on.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import keras_mgconv
from keras_mgconv import data, models, optimization, training
from keras_mgconv._keras import keras
from keras_mgconv.layers import MultigridConv2D, _tensorflow_ops
from keras_mgconv.layers.grouped_conv import GroupedConvBase, grouped_gradient_supported

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from quantization_aware_training import tflite_accuracy  # noqa: E402

DEPTH = 8
GROUP_SIZE = 8
# Every level down to the group size (the factories keep 32 channels dense).
COARSEST_CHANNELS = 8
BATCH_SIZE = 64
FLOAT_EPOCHS = 10
# One epoch of QAT fine-tuning keeps the int8 model within a point of the float one.
QAT_EPOCHS = 1
# Pruning ramps the sparsity up over PRUNE_RAMP_EPOCHS, then fine-tunes: 1 + 2
# epochs keep the accuracy within a point of the float model's (1 + 1 fell 1.4
# to 3 points below it; the 3 + 3 this ran before took twice as long).
PRUNE_EPOCHS = 3
PRUNE_RAMP_EPOCHS = 1
SPARSITY = 0.5


def max_difference(first, second, inputs):
    return float(
        np.max(np.abs(first.predict(inputs, verbose=0) - second.predict(inputs, verbose=0)))
    )


def compile_for_training(model, learning_rate, epochs, steps_per_epoch):
    """Adam with a cosine decay of `learning_rate` to 0 over the run."""
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, epochs * steps_per_epoch)
    model.compile(
        keras.optimizers.Adam(schedule),
        keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )


def accuracy(model, test):
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    return float(model.evaluate(test, verbose=0)[1])


def check_layers(output_dir, rng):
    """Round trips and unroll_multigrid of every kind of layer; a MobileNetV2's round trip."""
    inputs = keras.Input((8, 8, 16))
    x = keras_mgconv.MultigridConv2D(32, 3, padding="same", group_size=8, activation="relu")(inputs)
    x = keras_mgconv.MultigridConv2D(32, 3, strides=2, padding="same", group_size=8)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras_mgconv.GroupedConv2D(32, 3, groups=4, padding="same", residual=True)(x)
    x = keras_mgconv.ChannelProlongation(8)(keras_mgconv.ChannelRestriction(8)(x))
    outputs = keras_mgconv.MultigridConv2D(8, 3, padding="same", group_size=8)(x)
    model = keras.Model(inputs, outputs)
    images = rng.standard_normal((4, 8, 8, 16)).astype("float32")
    report = {}
    for extension in ("h5", "keras"):
        path = f"{output_dir}/layers.{extension}"
        model.save(path)
        report[f"{extension}_difference"] = max_difference(
            model, keras.models.load_model(path), images
        )
    try:
        optimization.quantize_model(model, calibration_data=[])
    except ValueError as error:
        report["empty_calibration_error"] = str(error)
    # A finite batch, then a NaN or infinite one.
    for name, bad in (("nan", np.nan), ("inf", np.inf)):
        try:
            optimization.quantize_model(model, calibration_data=[images, np.full_like(images, bad)])
        except ValueError as error:
            report[f"{name}_calibration_error"] = str(error)
    unrolled = optimization.unroll_multigrid(model)
    report["unroll_difference"] = max_difference(model, unrolled, images)
    report["unrolled_layers"] = [type(layer).__name__ for layer in unrolled.layers]
    report["unrolled_residual"] = [
        layer.residual for layer in unrolled.layers if hasattr(layer, "residual")
    ]
    # Six multigrid layers (groups of 32), not thirty (groups of 8): the same layer kinds.
    mobilenet = models.MobileNetV2((32, 32, 3), alpha=0.35, classes=10, group_size=32)
    mobilenet.save(f"{output_dir}/mobilenet.keras")
    report["mobilenet_difference"] = max_difference(
        mobilenet,
        keras.models.load_model(f"{output_dir}/mobilenet.keras"),
        rng.random((2, 32, 32, 3)).astype("float32"),
    )
    return report


def check_keras3_file(output_dir):
    """`optimization.load_model` of the Keras 3 file test_optimization.py wrote, if it did."""
    path = f"{output_dir}/keras3/model.keras"
    if not os.path.exists(path):
        return {}
    expected = np.load(f"{output_dir}/keras3/expected.npz")
    model = optimization.load_model(path)
    report = {
        "keras3_load_difference": float(
            np.max(np.abs(model.predict(expected["inputs"], verbose=0) - expected["outputs"]))
        ),
        "keras3_layers": sorted({type(layer).__name__ for layer in model.layers}),
        "keras3_policies": sorted({layer.dtype_policy.name for layer in model.layers}),
    }
    with open(f"{output_dir}/damaged.keras", "wb") as file:
        file.write(b"not a zip archive")
    for name, bad_path in (
        ("missing", f"{output_dir}/missing.keras"),
        ("damaged", f"{output_dir}/damaged.keras"),
    ):
        try:
            optimization.load_model(bad_path)
        except ValueError as error:
            report[f"load_{name}_error"] = str(error)
    return report


def check_calibration_arrays(rng):
    """quantize_model(calibration_data=<array>) against the same array as one batch."""
    report = {}
    # With 1 channel, against the same array as one batch; with 16 (which
    # used to fail), the array alone.
    for channels, forms in ((1, ("array", "batch")), (16, ("array",))):
        model = keras.Sequential(
            [
                keras.Input((8, 8, channels)),
                keras_mgconv.MultigridConv2D(32, 3, padding="same", group_size=8),
            ]
        )
        images = 100 * rng.random((64, 8, 8, channels)).astype("float32")
        expected = model(images)
        for name, calibration in (
            (name, {"array": images, "batch": [images]}[name]) for name in forms
        ):
            try:
                qat_model = optimization.quantize_model(model, calibration_data=calibration)
            except ValueError as error:
                report[f"calibration_{name}_{channels}"] = str(error)
                continue
            report[f"calibration_{name}_{channels}"] = float(
                np.max(np.abs(qat_model(images) - expected)) / np.max(np.abs(expected))
            )
    for name, calibration in (("images", list(images)), ("array", images[..., :3])):
        try:
            optimization.quantize_model(model, calibration_data=calibration)
        except ValueError as error:
            report[f"calibration_shape_error_{name}"] = str(error)
    return report


def check_argument_errors(model):
    """The helpers' errors for arguments that used to fail later, or raw."""
    calls = {
        "schedule": lambda: optimization.prune_low_magnitude(model, "notaschedule"),
        "structured": lambda: optimization.prune_low_magnitude(
            model, tfmot.sparsity.keras.ConstantSparsity(0.5, 0), structured="yes"
        ),
        "converter": lambda: optimization.tflite_converter("x"),
    }
    report = {}
    for name, call in calls.items():
        try:
            call()
        except Exception as error:  # The test checks the type and the message.
            report[f"{name}_error"] = f"{type(error).__name__}: {error}"
    return report


def check_mobilenet_v3(rng):
    """MobileNetV3Small under tf_keras: int8 from QAT, and pruning's wrappers.

    Under tf_keras its hard-swish and squeeze-and-excitation gates are
    Multiply and Rescaling layers, which tfmot's own registry refuses. Not
    fine-tuned: tracing a training step of it takes half a minute on 2 cores,
    and the QAT and pruning steps are those the ResNet below takes. The QAT
    model, calibrated on a batch, is converted and the int8 file compared with
    it on that batch. Its residual branches start at scale 1: untrained and
    started at zero (the factories' default), a projection's folded weights
    are all zero, and the converter leaves such a convolution float (training
    moves them off zero; `export_tflite`'s int8 is the same either way).
    """
    model = models.MobileNetV3Small(
        (32, 32, 3), alpha=0.75, classes=10, group_size=32, zero_init_residual=False
    )
    images = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    qat_model = optimization.quantize_model(model, calibration_data=[images])
    converter = optimization.tflite_converter(qat_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    # The ops as converted, not as XNNPACK's partitions would hide them.
    interpreter = Interpreter(
        model_content=converter.convert(),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    outputs = []
    for image in images:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0])
    expected = qat_model(images, training=False).numpy()
    pruned = optimization.prune_low_magnitude(model, tfmot.sparsity.keras.ConstantSparsity(0.5, 0))
    return {
        "mobilenet_v3_ops": sorted({op["op_name"] for op in ops}),
        "mobilenet_v3_float_ops": sorted(
            op["op_name"]
            for op in ops
            if any(tensors[index]["dtype"] == np.float32 for index in op["outputs"])
        ),
        "mobilenet_v3_int8_ops": sorted(
            {
                op["op_name"]
                for op in ops
                if all(tensors[index]["dtype"] == np.int8 for index in op["outputs"])
            }
        ),
        "mobilenet_v3_int8_difference": float(np.max(np.abs(np.stack(outputs) - expected))),
        "mobilenet_v3_int8_top1": float(
            np.mean(np.argmax(outputs, axis=-1) == np.argmax(expected, axis=-1))
        ),
        "mobilenet_v3_pruned": sorted(
            {
                type(layer.layer).__name__
                for layer in pruned.layers
                if getattr(layer, "pruning_vars", None)
            }
        ),
        "mobilenet_v3_unwrapped": sorted(
            {type(layer).__name__ for layer in pruned.layers if not hasattr(layer, "pruning_vars")}
        ),
    }


def train_float_model(train, test, steps_per_epoch):
    """The multigrid ResNet, with the digits' normalisation, trained from scratch."""
    inputs = keras.Input(data.image_dataset_info("digits").image_shape)
    model = models.CIFARResNet(
        DEPTH,
        input_tensor=data.normalization_layer("digits")(inputs),
        classes=10,
        group_size=GROUP_SIZE,
        coarsest_channels=COARSEST_CHANNELS,
        batch_norm_momentum=training.auto_batch_norm_momentum(steps_per_epoch),
    )
    compile_for_training(model, 3e-3, FLOAT_EPOCHS, steps_per_epoch)
    model.fit(train, epochs=FLOAT_EPOCHS, verbose=0)
    return model, accuracy(model, test)


def tflite_report(tflite_model, test):
    """Test accuracy (the QAT example's `tflite_accuracy`) and what the model computes in."""
    interpreter = Interpreter(model_content=tflite_model)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    compute_ops = [op for op in ops if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    return {
        "tflite_accuracy": tflite_accuracy(tflite_model, test),
        "test_examples": len(list(test.unbatch())),
        "conv_ops": sum(op["op_name"] == "CONV_2D" for op in compute_ops),
        "float_ops": sorted(
            {
                op["op_name"]
                for op in ops
                if any(tensors[index]["dtype"] == np.float32 for index in op["outputs"])
            }
        ),
        # Input, filter and output of every convolution and the classifier.
        "compute_op_types": sorted(
            {
                tensors[index]["dtype"].__name__
                for op in compute_ops
                for index in (*op["inputs"][:2], *op["outputs"])
            }
        ),
    }


def check_quantization(model, output_dir, train, test, steps_per_epoch):
    qat_model = optimization.quantize_model(model, calibration_data=train.take(8))
    compile_for_training(qat_model, 1e-4, QAT_EPOCHS, steps_per_epoch)
    qat_model.fit(train, epochs=QAT_EPOCHS, verbose=0)
    # tfmot cannot reload its QuantizeLayer from .keras files; HDF5 works.
    qat_model.save(f"{output_dir}/qat.h5")
    with optimization.quantize_scope():
        loaded = keras.models.load_model(f"{output_dir}/qat.h5")
    images = next(iter(test))[0]
    converter = optimization.tflite_converter(qat_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    unrolled = optimization.unroll_multigrid(model)
    return {
        "unrolled_convolutions": sum(
            isinstance(layer, (keras.layers.Conv2D, GroupedConvBase)) for layer in unrolled.layers
        ),
        "qat_accuracy": accuracy(qat_model, test),
        "qat_reload_difference": max_difference(qat_model, loaded, images),
        **tflite_report(converter.convert(), test),
    }


def check_pruning(model, output_dir, train, test, steps_per_epoch):
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        0.0, SPARSITY, begin_step=0, end_step=PRUNE_RAMP_EPOCHS * steps_per_epoch, frequency=5
    )
    pruned = optimization.prune_low_magnitude(model, schedule)
    wrapped = [layer for layer in pruned.layers if hasattr(layer, "pruning_vars")]
    compile_for_training(pruned, 1e-3, PRUNE_EPOCHS, steps_per_epoch)
    pruned.fit(
        train, epochs=PRUNE_EPOCHS, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()]
    )
    kernels = [w.numpy() for layer in wrapped for w, _, _ in layer.pruning_vars]
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    stripped.save(f"{output_dir}/pruned.keras")
    reloaded = keras.models.load_model(f"{output_dir}/pruned.keras")
    return {
        "pruned_accuracy": accuracy(pruned, test),
        "stripped_accuracy": accuracy(reloaded, test),
        "sparsity": sum(int(np.sum(k == 0)) for k in kernels) / sum(k.size for k in kernels),
        "multigrid_sparsities": [
            float(np.mean(w.numpy() == 0))
            for layer in wrapped
            if isinstance(layer.layer, MultigridConv2D)
            for w, _, _ in layer.pruning_vars
        ],
        "wrapped": sorted({type(layer.layer).__name__ for layer in wrapped}),
        "stripped_layers": sorted({type(layer).__name__ for layer in reloaded.layers}),
    }


def group_counts(kernel, groups):
    """(zero groups, partly zero groups) of a grouped kernel."""
    blocks = kernel.reshape(-1, groups, kernel.shape[-1] // groups)
    zero = np.all(blocks == 0, axis=(0, 2))
    partly = np.any(blocks == 0, axis=(0, 2)) & ~zero
    return int(zero.sum()), int(partly.sum())


def check_structured_pruning(rng):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 16)),
            keras_mgconv.MultigridConv2D(64, 3, padding="same", group_size=8),
            keras_mgconv.GroupedConv2D(64, 3, groups=8, padding="same", residual=True),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )
    pruned = optimization.prune_low_magnitude(
        model, tfmot.sparsity.keras.ConstantSparsity(SPARSITY, 0, frequency=1), structured=True
    )
    pruned.compile(keras.optimizers.Adam(1e-3), "mse")
    images = rng.standard_normal((32, 8, 8, 16)).astype("float32")
    pruned.fit(
        images,
        rng.standard_normal((32, 10)).astype("float32"),
        batch_size=8,
        verbose=0,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
    )
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    convolutions = [
        conv
        for layer in stripped.layers
        for conv in getattr(layer, "convolutions", [layer])
        if hasattr(conv, "groups")
    ]
    multigrid_outputs = stripped.layers[0](images).numpy()
    return {
        "structured_wrapped": [type(layer).__name__ for layer in pruned.layers],
        "structured_groups": [
            [conv.name, conv.groups, *group_counts(conv.kernel.numpy(), conv.groups)]
            for conv in convolutions
        ],
        "structured_dense_zeros": int(np.sum(stripped.layers[-1].kernel.numpy() == 0)),
        "structured_stripped_difference": max_difference(pruned, stripped, images),
        # No channel of the pruned multigrid layer's output may be dead.
        "structured_silent_channels": int(np.sum(np.all(multigrid_outputs == 0, axis=(0, 1, 2)))),
    }


def check_structured_pruning_of_the_block_design():
    """Refused: it used to wrap none of the block design's layers, and say nothing."""
    model = models.CIFARResNet(
        DEPTH,
        input_shape=(8, 8, 1),
        group_size=GROUP_SIZE,
        coarsest_channels=COARSEST_CHANNELS,
        multigrid="block",
    )
    try:
        optimization.prune_low_magnitude(
            model, tfmot.sparsity.keras.ConstantSparsity(SPARSITY, 0), structured=True
        )
    except ValueError as error:
        return {"block_design_structured_error": str(error)}
    return {}


def check_tfmot_directly():
    """tfmot's own prune_low_magnitude takes a multigrid factory model whole."""
    model = models.CIFARResNet(
        DEPTH, input_shape=(8, 8, 1), group_size=GROUP_SIZE, coarsest_channels=COARSEST_CHANNELS
    )
    pruned = tfmot.sparsity.keras.prune_low_magnitude(
        model, tfmot.sparsity.keras.ConstantSparsity(SPARSITY, 0)
    )
    return {
        "tfmot_multigrid_kernels": sum(
            len(layer.pruning_vars)
            for layer in pruned.layers
            if isinstance(getattr(layer, "layer", None), MultigridConv2D)
        )
    }


def main(output_dir, float_model=None):
    """Every check, or with `float_model` (the path of one a full run saved) only QAT from it."""
    # The same figures on every run on this machine, not thread-order noise.
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    report = (
        {}
        if float_model
        else {
            **check_layers(output_dir, rng),
            **check_structured_pruning(rng),
            **check_structured_pruning_of_the_block_design(),
            **check_tfmot_directly(),
            **check_keras3_file(output_dir),
            **check_calibration_arrays(rng),
            **check_argument_errors(keras.models.load_model(f"{output_dir}/layers.h5")),
        }
    )
    if not float_model:
        report.update(check_mobilenet_v3(rng))
    train = data.image_pipeline("digits", "train", BATCH_SIZE, training=True, seed=0)
    test = data.image_pipeline("digits", "test", 256)
    steps_per_epoch = int(train.cardinality())
    # The float model does not depend on what the checks above drew.
    keras.utils.set_random_seed(0)
    if float_model:
        model = keras.models.load_model(float_model)
        report["float_accuracy"] = accuracy(model, test)
    else:
        model, report["float_accuracy"] = train_float_model(train, test, steps_per_epoch)
        model.save(f"{output_dir}/float.keras")
    # The QAT-only run (oneDNN off) checks the gradient path and the export.
    report.update(check_quantization(model, output_dir, train, test, steps_per_epoch))
    if not float_model:
        # Pruning changes the weights of the model it wraps: prune a fresh copy.
        report.update(
            check_pruning(
                keras.models.load_model(f"{output_dir}/float.keras"),
                output_dir,
                train,
                test,
                steps_per_epoch,
            )
        )
    report["grouped_gradient"] = grouped_gradient_supported(tf.float32)
    report["gradient_source"] = _tensorflow_ops._gradient_source(tf.float32)
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:3])
