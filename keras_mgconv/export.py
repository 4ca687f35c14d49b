"""TensorFlow Lite (LiteRT) export: conversion, verification against Keras, latency.

    from keras_mgconv import export
    report = export.export_tflite(model, "model.tflite", quantization="int8",
                                  representative_data=images)
    print(report)
    for row in export.measure_latency("model.tflite"):
        print(row)

A grouped convolution becomes one builtin CONV_2D whose filter has C_in / G
input channels. XNNPACK, the delegate LiteRT applies by default on CPU, runs it
fast; without XNNPACK it falls to TFLite's reference kernel, about 4x slower than
a full convolution of the same width (DESIGN.md, section 3). For runtimes
without XNNPACK, `lowering="split"` exports every grouped convolution as SPLIT,
one CONV_2D per group and CONCATENATION instead: the same function, run by the
optimized kernels every runtime has.

A 1 x 1 MultigridConv2D is one matrix. Where that matrix costs less than the
cycle's small grouped convolutions take, it is exported as one CONV_2D with it
(`pointwise="auto"`, see keras_mgconv._pointwise): MobileNetV2's 6x expansions.
In int8, neighbouring groups of fewer than 16 filters are merged until they
have 16, with zeros between them (`min_group_filters`, see
`keras_mgconv.layers.grouped_conv.merge_groups`): the same function, which
XNNPACK's int8 kernels run faster in fewer groups.
"""

import collections
import dataclasses
import math
import numbers
import os
import re
import tempfile
import time

import numpy as np
import tensorflow as tf
from ai_edge_litert import interpreter as litert
from ai_edge_litert.tools import flatbuffer_utils

# tf.lite does not export the error its converter raises.
from tensorflow.lite.python.convert_phase import ConverterError

from keras_mgconv import _pointwise, _tensorflow_logs
from keras_mgconv._files import atomic_write
from keras_mgconv._keras import USE_LEGACY_KERAS, keras
from keras_mgconv.layers import MultigridConv2D, _arguments
from keras_mgconv.layers.grouped_conv import (
    GroupedConvBase,
    resolve_implementation,
    traced_implementation,
)

QUANTIZATIONS = (None, "float16", "dynamic_range", "int8")
LOWERINGS = ("grouped", "split")
POINTWISE = _pointwise.POINTWISE

# XNNPACK's int8 convolutions on x86 take about as long for a group of 4 or 8
# filters as for one of 16 (benchmarks/grouped_kernels.py). Merged to 16
# filters, a 3x3 grouped convolution of groups of 8 ran 1.2-1.5x faster
# (AVX-512 with VNNI) or 2x (AMX), and ResNet20 and ResNet56 at group size 8
# 1.2x and 1.5x (AVX-512; benchmarks/tflite_latency.py); merging further was
# slower there. In float32 the same merge gained 0-6% on AMD Zen 4 and 16-20%
# on Zen 5 (the ResNets at group size 8), for 1.7x the file size; XNNPACK's
# float32 kernels for ARM are 8 channels wide (4x8 and 6x8 tiles), a group of
# 8's width: "auto" keeps float32 groups as trained.
_INT8_MIN_GROUP_FILTERS = 16

# Float32's unit roundoff: one rounding changes a value by at most this, relatively.
_UNIT_ROUNDOFF = 2.0**-24
# Roundings of the elementwise work a layer may add to its sums (normalisation:
# a subtraction, a scaling and a shift, and the scale itself; a bias; an activation).
_ELEMENTWISE_ROUNDINGS = 4

# An int8 file that disagrees with Keras on the top class of most inputs is
# broken, not rounded: its ranges were calibrated on data unlike them. Measured
# (a small CNN trained on the digits, verified on its test images): calibrated
# on the training images 99-100%; on them scaled by 50, 85%; by 0.02, 24-26%.
_MIN_INT8_TOP1_AGREEMENT = 0.5

# The agreement is judged on the inputs whose top class leads its runner-up by
# at least this fraction of the largest Keras output: about 2.5 steps of an
# int8 output (1/255 of its range each), which rounding alone cannot undo. An
# untrained network's near-equal outputs swap classes under any rounding.
_DECIDED_MARGIN = 0.01

# Verification inputs when no data is given.
_RANDOM_EXAMPLES = 8

# int8 calibration images whose standard deviation differs from the training
# data's by more than this factor, or whose mean is more than this many training
# standard deviations from the training mean, are refused (`_check_representative`).
_SPREAD_FACTOR = 2
_MEAN_DEVIATIONS = 1


@dataclasses.dataclass(frozen=True)
class Verification:
    """How an exported model's outputs compare with the Keras model's.

    Attributes:
        examples: number of inputs compared, each run at batch size 1.
        data: where they came from: "verification_data",
            "representative_data" or "random" (uniform in [0, 1)).
        max_abs_diff: largest absolute difference of an output value.
        max_rel_diff: `max_abs_diff` divided by the largest absolute Keras
            output value.
        top1_agreement: fraction of inputs whose largest output (the top-1
            class) is the same in both.
        decided_examples: the inputs whose top class leads its runner-up in
            the Keras model by at least 1% of its largest output, which
            rounding cannot swap.
        decided_top1_agreement: `top1_agreement` on those inputs (1.0 where
            there are none).
    """

    examples: int
    data: str
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float
    decided_examples: int = 0
    decided_top1_agreement: float = 1.0


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What `export_tflite` wrote and how it compares with the Keras model.

    Attributes:
        path: the `.tflite` file.
        quantization: "float32", "float16", "dynamic_range" or "int8".
        lowering: "grouped" or "split".
        size_bytes: file size.
        pointwise: "auto", "dense" or "cycle", as passed to `export_tflite`.
        dense_pointwise_layers: the 1 x 1 MultigridConv2D layers exported as
            one CONV_2D with their cycle's matrix.
        min_group_filters: the fewest filters a group of the file's grouped
            convolutions has where groups were merged (1: groups as trained).
        input_dtype, output_dtype: the model's input and output types, e.g.
            "float32" or "int8".
        op_counts: dict of op name (TFLite builtin names such as "CONV_2D";
            the custom code, e.g. "FlexCumprod", for other ops) to how often it
            occurs, most frequent first.
        builtin_only: whether every op is a TFLite builtin, so that any LiteRT
            runtime runs the model without the Flex (TF Select) delegate.
        verification: a `Verification`, or None where the model has ops
            ai_edge_litert cannot run (Flex ops).
        input_shape: the input shape the file was converted for, batch
            size (1) first.
        keras_input_shape: the Keras model's input shape, None where it takes
            any size.
        converted_from: "float32" where the model computes in float32;
            otherwise the dtype policy it computes in (e.g. "mixed_float16"):
            the file was converted from a float32 copy of it (same weights),
            which the verification compares with.
    """

    path: str
    quantization: str
    lowering: str
    size_bytes: int
    input_dtype: str
    output_dtype: str
    op_counts: dict
    builtin_only: bool
    verification: Verification | None
    input_shape: tuple = ()
    keras_input_shape: tuple = ()
    converted_from: str = "float32"
    pointwise: str = "auto"
    dense_pointwise_layers: int = 0
    min_group_filters: int = 1

    def to_dict(self):
        """The report as a dict of plain values, for JSON."""
        return dataclasses.asdict(self)

    def __str__(self):
        ops = ", ".join(f"{name} {count}" for name, count in self.op_counts.items())
        kind = "all TFLite builtins" if self.builtin_only else "NOT all TFLite builtins"
        lines = [
            f"{self.path}: {self.size_bytes:,} bytes, {self.quantization} "
            f"(input {self.input_dtype}, output {self.output_dtype}), "
            f"{self.lowering} lowering",
            f"ops ({sum(self.op_counts.values())}, {kind}): {ops}",
        ]
        if self.dense_pointwise_layers:
            lines.append(
                f"{self.dense_pointwise_layers} 1x1 multigrid layers exported as "
                f"their cycle's matrix, one CONV_2D each (pointwise={self.pointwise!r})"
            )
        if self.min_group_filters > 1:
            # What the export did to any narrow groups, also where a model has none.
            # A group cannot outgrow its layer: `merge_groups` joins all of a
            # narrower layer's groups into one, and joins whole groups, so a
            # merged group may pass the minimum.
            n = self.min_group_filters
            lines.append(
                f"grouped convolutions with groups of fewer than {n} filters "
                f"merged up to {n} (at least {n} filters a group; layers of fewer "
                f"than {n} filters into one group, a full convolution), "
                f"the same function"
            )
        if None in self.keras_input_shape[1:]:
            lines.append(
                f"converted for inputs of shape {tuple(self.input_shape[1:])}; "
                f"the Keras model takes {tuple(self.keras_input_shape[1:])}"
            )
        if self.converted_from != "float32":
            lines.append(
                f"converted from a float32 copy (same weights) of the {self.converted_from} model"
            )
        check = self.verification
        if check is None:
            lines.append("not verified: ai_edge_litert cannot run Flex ops")
        else:
            lines.append(
                f"verified against Keras with ai_edge_litert on {check.examples} "
                f"examples ({check.data}): top-1 agreement {check.top1_agreement:.2%}, "
                f"max abs diff {check.max_abs_diff:.3g}, "
                f"max rel diff {check.max_rel_diff:.3g}"
            )
        return "\n".join(lines)


def _check_path(path):
    if not isinstance(path, (str, os.PathLike)) or not str(path).endswith(".tflite"):
        raise ValueError(f"`path` must be a file name ending in .tflite. Received: path={path!r}.")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(
            f"`path` must be in an existing, writable directory; {directory} is not one. "
            f"Received: path={path!r}."
        )
    if os.path.isdir(path):
        raise ValueError(f"`path` is a directory. Received: path={path!r}.")
    return os.fspath(path)


def _check_model(model):
    inputs = getattr(model, "inputs", None) if isinstance(model, keras.Model) else None
    if not inputs or len(inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"`model` must be a built functional or Sequential `keras.Model` with one "
            f"input and one output. Received: model={model!r}."
        )


def _images(name, data, input_shape):
    """Stacks an array, or an iterable of image batches or (images, labels) batches."""
    if isinstance(data, (np.ndarray, tf.Tensor)):
        data = [data]
    try:
        batches = [
            np.asarray(batch[0] if isinstance(batch, (tuple, list)) else batch, np.float32)
            for batch in data
        ]
        images = np.concatenate(batches) if batches else np.zeros((0,), np.float32)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be an array of images, or an iterable (e.g. a tf.data.Dataset) "
            f"of image batches or of (images, labels) batches. "
            f"Received: {name}={data!r}."
        ) from None
    if (
        len(images) == 0
        or images.ndim != len(input_shape)
        or any(
            size not in (None, actual) for size, actual in zip(input_shape[1:], images.shape[1:])
        )
    ):
        raise ValueError(
            f"`{name}` must hold at least one image of the model's input shape "
            f"{tuple(input_shape[1:])}. Received: {name} of shape {images.shape}."
        )
    not_finite = int(np.sum(~np.isfinite(images)))
    if not_finite:
        # int8 calibration on them gives NaN ranges, and verification on them
        # compares NaN with NaN.
        raise ValueError(
            f"`{name}` must hold finite values; {not_finite} of its {images.size} "
            f"are NaN or infinite. Received: {name} of shape {images.shape}."
        )
    return images


def _training_statistics(model, images):
    """What `model` records of its training inputs, and the same figures of `images`.

    From its input Normalization layer, where it has one: the images
    themselves. Otherwise from its first BatchNormalization layer whose moving
    statistics have left their initial values (zero mean, unit variance): the
    inputs of that layer, computed from the images.

    Returns:
        (source, mean, variance, values, every_channel): what describes the
        training inputs, their mean and variance per channel, the images' values
        (or the layer inputs they give) one row per position, and whether each
        channel is judged (the input's) or the median one (a layer's: a channel
        that training left constant has no spread to compare); None where the
        model records nothing.
    """
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if layers and isinstance(layers[0], keras.layers.Normalization):
        values = images.astype(np.float64).reshape(-1, images.shape[-1])
        return "its input normalisation", layers[0].mean, layers[0].variance, values, True
    for layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            mean, variance = (
                np.asarray(weight.numpy(), np.float64)
                for weight in (layer.moving_mean, layer.moving_variance)
            )
            if np.all(mean == 0) and np.all(variance == 1):
                return None  # Never trained: it records nothing.
            probe = keras.Model(model.inputs[0], _input_in(model, layer))
            values = np.concatenate(
                [
                    np.asarray(
                        probe(images[start : start + 64], training=False), np.float64
                    ).reshape(-1, mean.size)
                    for start in range(0, len(images), 64)
                ]
            )
            return (
                f"its first BatchNormalization layer {layer.name!r}",
                mean,
                variance,
                values,
                False,
            )
    return None


def _check_representative(model, images):
    """Refuses calibration images unlike the inputs `model` records of its training.

    int8 calibration takes every activation's range from these images. Images
    of another spread or place make ranges that clip the real inputs, or
    spend the 256 levels on values they never take, and the export is checked
    on the same images, so it may agree with Keras there. Measured (ResNet20
    trained on the digits, 200 calibration images, top-1 agreement with Keras
    on the test images): the training images 99.5%; scaled by 3, 97.5%; by
    10, 51.5%; by 0.3, 34%; by 0.01, zeros, 1e30 * ones or scaled by 1000,
    11.5-12%, as chance; on their own images every one agreed 96.5-100%.
    The bounds accept the training images (and the test images: standard
    deviation 0.996, mean -0.001) and refuse all the others, the images scaled
    by 3 included.

    The model's input Normalization layer describes the training inputs; a
    model without one is judged by the inputs of its first trained
    BatchNormalization layer (`_training_statistics`): calibrated on the
    digits scaled by 50, ResNet20 without an input normalisation agreed with
    Keras on 9% of them. A model that records neither is not checked.
    """
    statistics = _training_statistics(model, images)
    if statistics is None:
        return
    source, mean, variance, values, every_channel = statistics
    mean, variance = (np.asarray(value, np.float64).reshape(-1) for value in (mean, variance))
    normalized = (values - mean) / np.maximum(np.sqrt(variance), keras.backend.epsilon())
    spread, place = normalized.std(axis=0), normalized.mean(axis=0)
    if not every_channel:
        spread, place = np.median(spread, keepdims=True), np.median(np.abs(place), keepdims=True)
    unlike = ~(
        (1 / _SPREAD_FACTOR <= spread)
        & (spread <= _SPREAD_FACTOR)
        & (np.abs(place) <= _MEAN_DEVIATIONS)
    )
    if unlike.any():
        channel = int(np.argmax(unlike))
        where = f"in channel {channel}" if every_channel else "in the median channel"
        raise ValueError(
            f"`representative_data` does not look like the inputs the model was trained "
            f"on, as {source} describes them: {where}, its "
            f"standard deviation is {spread[channel]:.3g} and its mean "
            f"{place[channel]:+.3g} training standard deviations from the training mean "
            f"(typical inputs: within a factor {_SPREAD_FACTOR:g} of 1, and within "
            f"{_MEAN_DEVIATIONS:g}). int8 ranges calibrated on them would not fit real "
            f"inputs: pass a few hundred typical inputs, as the model takes them. "
            f"Received: representative_data of shape {images.shape}."
        )


def _layers(model):
    """Every layer of `model`, those of nested models included."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer)


def _compute_policies(model):
    """The dtype policies other than float32 that `model`'s layers compute in."""
    return sorted(
        {layer.dtype_policy.name for layer in _layers(model) if layer.compute_dtype != "float32"}
    )


def _export_copy(model, lowering):
    """`model` as it is converted: in float32, its grouped convolutions computed the `lowering` way.

    How a layer computes its grouped convolutions is a constructor argument
    (`implementation`), and so is its dtype policy: a model whose layers
    would compute otherwise (or in float16: mixed precision, whose float16
    convolutions TFLite has no builtin kernels for) is rebuilt from its config
    with those arguments replaced, and given the same weights.
    """
    grouped = (MultigridConv2D, GroupedConvBase)

    def differs(layer):
        return layer.compute_dtype != "float32" or (
            isinstance(layer, grouped)
            and (lowering != resolve_implementation(layer.implementation, layer.compute_dtype))
        )

    if not any(differs(layer) for layer in _layers(model)):
        return model

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, grouped):
            config["implementation"] = lowering
        if layer.compute_dtype != "float32":
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    rebuilt = keras.models.clone_model(model, clone_function=clone, recursive=True)
    # Through a weights file, not set_weights: loading also restores state that
    # layers derive from their variables (an adapted Normalization's mean).
    with tempfile.TemporaryDirectory() as directory:
        weights = os.path.join(directory, "model.weights.h5")
        model.save_weights(weights)
        rebuilt.load_weights(weights)
    return rebuilt


def _input_shape_argument(input_shape, model_shape):
    """`input_shape` (without the batch size) as a tuple that fits `model_shape`, or raises."""
    try:
        shape = tuple(input_shape)
        valid = all(
            isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size > 0
            for size in shape
        )
    except TypeError:
        valid = False
    if (
        not valid
        or len(shape) != len(model_shape)
        or any(size not in (None, actual) for size, actual in zip(model_shape, shape))
    ):
        raise ValueError(
            f"`input_shape` must be the shape of one input, without the batch size, that "
            f"the model takes: positive integers matching {model_shape}. "
            f"Received: input_shape={input_shape!r}."
        )
    return tuple(int(size) for size in shape)


def _export_input_shape(model, input_shape, arrays):
    """The input shape (without the batch size) that `model` is converted for.

    A LiteRT file is converted for one input size, where its delegates plan
    their work (XNNPACK could not run a file converted for the placeholder
    size of 1 with "valid" convolutions). A model that takes any size is
    exported for `input_shape`, else for the size of the data given, which it
    is then verified on.
    """
    model_shape = tuple(model.inputs[0].shape[1:])
    if input_shape is not None:
        shape = _input_shape_argument(input_shape, model_shape)
    elif None not in model_shape:
        shape = model_shape
    elif arrays:
        shape = next(iter(arrays.values())).shape[1:]
    else:
        raise ValueError(
            f"`model` takes inputs of any size {model_shape}, and a LiteRT file is "
            f"converted for one: pass input_shape=(height, width, channels), or "
            f"`verification_data` or `representative_data` of the size to export for "
            f"(in the CLI: --image-size or --dataset). Received: input_shape=None."
        )
    for name, images in arrays.items():
        if images.shape[1:] != shape:
            raise ValueError(
                f"`{name}` must hold inputs of the shape the model is exported for, "
                f"{shape}. Received: {name} of shape {images.shape}."
            )
    return shape


def _fixed_size(model, shape):
    """`model` on an input of `shape`, sharing its layers and weights."""
    if tuple(model.inputs[0].shape[1:]) == shape:
        return model
    inputs = keras.Input(shape, dtype=model.inputs[0].dtype)
    return keras.Model(inputs, model(inputs), name=model.name)


# What the converter and LiteRT print bare to descriptor 2, besides their
# absl-formatted info and warning records.
_BARE_CHATTER = ("fully_quantize: ", "INFO: Created TensorFlow Lite XNNPACK delegate")


def _converter_chatter(record):
    """The converter's and LiteRT's own log lines: their info and warning records.

    About 20 lines a conversion ("Reading SavedModel", "Ignored output_format",
    "fully_quantize: 0, ...") and LiteRT's "Created TensorFlow Lite XNNPACK
    delegate", logged from C++, which no Python setting silences once
    TensorFlow has started. Errors, and everything else written meanwhile,
    are kept (`_tensorflow_logs.hidden`).
    """
    # absl's header and info and warning records, as TensorFlow logs at start-up.
    return _tensorflow_logs.startup_line(record) or record.startswith(_BARE_CHATTER)


def _converter_settings(quantization, representative_images, integer_io, allow_flex_ops):
    """Keyword arguments of `model.export(format="litert")`: tf.lite.TFLiteConverter settings."""
    ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS_INT8
        if quantization == "int8"
        else tf.lite.OpsSet.TFLITE_BUILTINS
    ]
    if allow_flex_ops:
        ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
    settings = {"target_spec": {"supported_ops": ops}}
    if quantization is None:
        return settings
    settings["optimizations"] = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        settings["target_spec"]["supported_types"] = [tf.float16]
    elif quantization == "int8":
        settings["representative_dataset"] = lambda: (
            [image[None]] for image in representative_images
        )
        io_type = tf.int8 if integer_io else tf.float32
        settings["inference_input_type"] = settings["inference_output_type"] = io_type
    return settings


def _inspect(content):
    """Reads a converted model's op counts, builtin-ness and input and output types."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    counts = collections.Counter()
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            custom_code = model.operatorCodes[op.opcodeIndex].customCode
            counts[
                custom_code.decode()
                if custom_code
                else flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)
            ] += 1
    main = model.subgraphs[0]
    input_dtype, output_dtype = (
        flatbuffer_utils.type_to_name(main.tensors[tensors[0]].type).lower()
        for tensors in (main.inputs, main.outputs)
    )
    return {
        "op_counts": dict(counts.most_common()),
        # Flex and other custom ops are named by a custom code; builtins are not.
        "builtin_only": not any(code.customCode for code in model.operatorCodes),
        "input_dtype": input_dtype,
        "output_dtype": output_dtype,
    }


def _interpreter(model_path, threads=None, xnnpack=True):
    resolver = (
        litert.OpResolverType.AUTO
        if xnnpack
        else litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    with _tensorflow_logs.hidden(_converter_chatter):
        interpreter = litert.Interpreter(
            model_path=model_path, num_threads=threads, experimental_op_resolver_type=resolver
        )
        interpreter.allocate_tensors()
    return interpreter


def _quantize(values, details):
    """Float values as an integer tensor of `details`' type, where it is one."""
    if not np.issubdtype(details["dtype"], np.integer):
        return values.astype(details["dtype"])
    scale, zero_point = details["quantization"]
    limits = np.iinfo(details["dtype"])
    return np.clip(np.round(values / scale + zero_point), limits.min, limits.max).astype(
        details["dtype"]
    )


def _dequantize(values, details):
    if not np.issubdtype(details["dtype"], np.integer):
        return values.astype(np.float32)
    scale, zero_point = details["quantization"]
    return (values.astype(np.float32) - zero_point) * scale


def predict_tflite(path, images):
    """The outputs of a `.tflite` model on `images`, run one at a time with `ai_edge_litert`.

    Inputs are quantized and outputs dequantized with the file's scales and
    zero points where they are integers (`integer_io`).

    Args:
        path: a `.tflite` file with one input and one output.
        images: an array of inputs, batch first, of the file's input shape.

    Returns:
        A float32 NumPy array of the outputs, one row an input.

    Example:

    >>> from keras_mgconv.export import export_tflite, predict_tflite
    >>> inputs = keras.Input((8, 8, 3))
    >>> model = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    >>> _ = export_tflite(model, tmp_dir + "/conv.tflite")
    >>> x = np.random.rand(5, 8, 8, 3).astype("float32")
    >>> bool(np.allclose(predict_tflite(tmp_dir + "/conv.tflite", x), model(x), atol=1e-5))
    True
    """
    interpreter = _interpreter(os.fspath(path))
    input_details = interpreter.get_input_details()[0]
    output_details = interpreter.get_output_details()[0]
    outputs = []
    for image in np.asarray(images, np.float32):
        interpreter.set_tensor(input_details["index"], _quantize(image[None], input_details))
        interpreter.invoke()
        outputs.append(
            _dequantize(interpreter.get_tensor(output_details["index"]), output_details)[0]
        )
    return np.stack(outputs)


def _verify(model_path, model, images, data):
    outputs = predict_tflite(model_path, images)
    # Called eagerly, not through `predict`: tracing a predict function for
    # every model exported takes longer than running a few batches. The batch is
    # packed as the model's input (a list of one where the model was built so);
    # a Sequential model loaded from a file has no input until it is called.
    try:
        structure = model.input
    except AttributeError:
        structure = None
    expected = np.concatenate(
        [
            np.asarray(
                model(
                    images[start : start + 64]
                    if structure is None
                    else tf.nest.pack_sequence_as(structure, [images[start : start + 64]]),
                    training=False,
                )
            )
            for start in range(0, len(images), 64)
        ]
    )
    max_abs_diff = float(np.max(np.abs(outputs - expected)))
    largest = float(np.max(np.abs(expected))) or 1.0
    top1 = [np.argmax(values.reshape(len(images), -1), axis=-1) for values in (outputs, expected)]
    agrees = top1[0] == top1[1]
    ranked = np.sort(expected.reshape(len(images), -1), axis=-1)
    decided = (
        ranked[:, -1] - ranked[:, -2] >= _DECIDED_MARGIN * largest
        if ranked.shape[-1] > 1
        else np.zeros(len(images), bool)
    )
    return Verification(
        examples=len(images),
        data=data,
        max_abs_diff=max_abs_diff,
        max_rel_diff=max_abs_diff / largest,
        top1_agreement=float(np.mean(agrees)),
        decided_examples=int(np.sum(decided)),
        decided_top1_agreement=float(np.mean(agrees[decided])) if decided.any() else 1.0,
    )


def _input_in(model, layer):
    """The input of `layer`'s call in `model`'s graph.

    Not `layer.input`, which for a nested model is its own Input, whatever it
    is called on. A built Sequential model keeps its graph in a functional
    model of its own.
    """
    graph = model._functional if isinstance(model, keras.Sequential) else model
    for nodes in graph._nodes_by_depth.values():
        for node in nodes:
            if node.operation is layer and node.input_tensors:
                return node.input_tensors[0]
    return layer.input


def _shape_at(model, tensor, input_shape):
    """The shape of `tensor`, of `model`'s graph, where the model's input has `input_shape`."""
    if None not in tuple(tensor.shape)[1:] or input_shape is None:
        return tuple(tensor.shape)
    probe = keras.Model(model.inputs, tensor)
    return tuple(probe(keras.Input(input_shape, dtype=model.inputs[0].dtype)).shape)


def _summed_terms(model, input_shape=None):
    """A bound on the terms that an output's sums take one after another, in `model`.

    Every convolution's and dense layer's products per output (for a
    MultigridConv2D, of all its convolutions, and 3 additions per level), every
    average pooling's pixels, every softmax's classes, and each layer's
    elementwise roundings, over all the layers, on the path or not. Nested
    models are counted through. `input_shape` (without the batch size) sizes
    the average poolings of a model that takes inputs of any size.
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            nested_shape = _shape_at(model, _input_in(model, layer), input_shape)[1:]
            total += _summed_terms(layer, nested_shape)
            continue
        if isinstance(layer, keras.layers.InputLayer):
            continue
        total += _ELEMENTWISE_ROUNDINGS
        if isinstance(layer, MultigridConv2D):
            total += 3 * len(layer.smoothers) + sum(
                math.prod(convolution.kernel.shape[:-1]) for convolution in layer.convolutions
            )
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            total += math.prod(layer.kernel.shape[:2])
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense, GroupedConvBase)):
            total += math.prod(layer.kernel.shape[:-1])
        elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
            pixels = _shape_at(model, _input_in(model, layer), input_shape)[1:-1]
            if None in pixels:
                raise ValueError(
                    f"`model` takes inputs of any size {tuple(model.inputs[0].shape[1:])}, "
                    f"and its sums depend on the size: pass input_shape=(height, width, "
                    f"channels). Received: input_shape=None."
                )
            total += math.prod(pixels)
        elif isinstance(layer, keras.layers.AveragePooling2D):
            total += math.prod(layer.pool_size)
        if (
            isinstance(layer, keras.layers.Softmax)
            or getattr(getattr(layer, "activation", None), "__name__", None) == "softmax"
        ):
            total += layer.output.shape[-1]
    return total


def float32_tolerance(model, input_shape=None):
    """The largest relative difference a float32 export of `model` may have from it.

    A float32 runtime computes the model's sums in other orders than Keras
    (other kernels, blocking, vectorisation, thread counts). A sum of K terms,
    in any order, is within K u of the exact sum times the magnitude of its
    terms, u = 2**-24 being float32's unit roundoff; through a network the
    lengths of the sums on an output's path add up. Rounding errors of random
    sign add up to about sqrt(K) u times the terms' magnitude, and terms of
    random sign to about 1 / sqrt(K) of it, so that a sum rounds by about K u
    times its own size; taking the activations at the outputs' scale (batch
    normalisation keeps them there) each of Keras and the export is within
    K u of the exact outputs, relative to the largest output, and the two within
    2 K u. K counts the products per output of every convolution and dense
    layer, the pixels of every average pooling, the classes of every softmax
    and a few roundings per layer, over all of `model`'s layers: on the order
    of 10^3-10^4 for a CIFAR ResNet, 10^4-10^5 for an ImageNet one, so
    2 K u is 10^-4-10^-2. An export that computes another function (a layer
    lost or mistranslated) differs by the size of the outputs.

    Args:
        model: a built `keras.Model`.
        input_shape: for a model that takes inputs of any size, the input
            shape (without the batch size) it is exported for: the sums of
            its global average poolings depend on it.

    Returns:
        float: `2 * K * 2**-24`.

    Raises:
        ValueError: for a model with global average pooling that takes inputs
            of any size, without `input_shape`.

    Example:

    >>> from keras_mgconv.export import float32_tolerance
    >>> inputs = keras.Input((8, 8, 16))
    >>> model = keras.Model(inputs, keras.layers.Conv2D(32, 3)(inputs))
    >>> float32_tolerance(model) == 2 * (3 * 3 * 16 + 4) * 2**-24
    True
    """
    if input_shape is not None:
        input_shape = _input_shape_argument(input_shape, tuple(model.inputs[0].shape[1:]))
    return 2 * _summed_terms(model, input_shape) * _UNIT_ROUNDOFF


def _min_group_filters(value, quantization, lowering):
    """`export_tflite`'s `min_group_filters` as an int, "auto" resolved; raises for others."""
    if value == "auto":
        return _INT8_MIN_GROUP_FILTERS if quantization == "int8" and lowering == "grouped" else 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(
            f"`min_group_filters` must be 'auto' or a positive int (the fewest filters "
            f"per group after merging; 1 keeps the groups as trained). "
            f"Received: min_group_filters={value!r}."
        )
    return int(value)


def _convert(model, path, settings, name, lowering, min_group_filters):
    """Writes `model` converted with `settings` to `path`, or says which ops TFLite lacks."""
    failed = False

    def hidden(record):
        # A failed conversion raises what it logged: its diagnostics go too.
        return failed or _converter_chatter(record)

    try:
        with traced_implementation(lowering, min_group_filters), _tensorflow_logs.hidden(hidden):
            try:
                model.export(path, format="litert", verbose=False, **settings)
            except ConverterError:
                failed = True
                raise
    except ConverterError as error:
        flex_ops = re.search(r"TF Select ops: (.*)", str(error))
        if flex_ops is None:
            raise
        raise ValueError(
            f"`model` needs TensorFlow ops that TFLite has no builtin for "
            f"({flex_ops.group(1)}). Replace the layers that use them, or pass "
            f"allow_flex_ops=True to export them through the Flex delegate, which the "
            f"runtime must then include. Received: model={name!r}."
        ) from None


def export_tflite(
    model,
    path,
    quantization=None,
    representative_data=None,
    verification_data=None,
    integer_io=False,
    lowering="grouped",
    allow_flex_ops=False,
    input_shape=None,
    pointwise="auto",
    min_group_filters="auto",
):
    """Exports a Keras model to a `.tflite` file and checks it against the model.

    Converts through `model.export(format="litert")` (Keras' route for Keras
    3 models), allowing only TFLite builtin ops unless `allow_flex_ops`, runs
    the result with `ai_edge_litert` on sample inputs, one at a time, and
    compares the outputs with the Keras model's. The file is written to a
    temporary name next to `path` and renamed when everything has succeeded:
    a failed export leaves nothing at `path`. The converter's own log lines
    are not shown.

    A model that takes inputs of any size (`keras.Input((None, None, 3))`,
    fully convolutional) is converted for one: `input_shape`, else the size
    of `verification_data` or `representative_data`. A model that computes in
    float16 (a `mixed_float16` policy: TFLite has no float16 convolution
    kernels) is converted from a float32 copy with the same weights, which is
    what the file then computes, in every `quantization`.

    Args:
        model: a built functional or Sequential `keras.Model` with one input
            and one output.
        path: the file to write; must end in ".tflite", in an existing
            directory. An existing file is replaced.
        quantization: None (float32), "float16" (float16 weights),
            "dynamic_range" (int8 weights, activations quantized on the fly)
            or "int8" (full integer: weights and activations, calibrated on
            `representative_data`).
        representative_data: model inputs to calibrate "int8" on (a few
            hundred typical ones): an array, or an iterable such as a
            `tf.data.Dataset` of batches of images or of (images, labels).
            Also the verification inputs when `verification_data` is None.
        verification_data: inputs to verify on, in the same forms; default
            `representative_data`, else 8 random inputs uniform in [0, 1).
        integer_io: with "int8", make the file's input and output int8
            instead of float32 (verification quantizes the inputs and
            dequantizes the outputs with the file's scales and zero points).
        lowering: "grouped" (one CONV_2D per grouped convolution: fastest under
            XNNPACK) or "split" (SPLIT, a CONV_2D per group, CONCATENATION: for
            runtimes without XNNPACK). Both compute the same function.
        allow_flex_ops: let the model use TensorFlow ops through the Flex (TF
            Select) delegate where TFLite has no builtin. Such files need a
            runtime linked with that delegate, and are not verified.
        input_shape: for a model that takes inputs of any size, the input
            shape to convert it for, without the batch size, e.g. (224, 224, 3).
            Default: the data's, or the model's own where it has one.
        pointwise: how 1 x 1 MultigridConv2D layers are exported: "auto" (as
            one CONV_2D with the cycle's matrix where that matrix has at most
            `64 / group_size` times the cycle's multiply-adds, the factor by
            which XNNPACK runs it faster, and always in "int8", where the
            matrix was 5-33x faster; as the cycle elsewhere), "dense" (all as
            matrices: a file as large as the baseline's) or "cycle" (none: the
            smallest file).
            All three compute the same function.
        min_group_filters: "auto" or an int: grouped convolutions whose groups
            have fewer filters than this are exported with neighbouring groups
            merged (block-diagonal kernels, zeros between the groups) until they
            have as many: the same function with more multiply-adds, which
            XNNPACK's int8 kernels on x86 run faster (benchmarks/grouped_kernels.py).
            "auto": 16 in "int8" with the "grouped" lowering, else 1 (groups as
            trained). The file grows by the zeros.

    Returns:
        An `ExportReport`.

    Raises:
        ValueError: before anything is written, for a bad argument: `path` not
            ending in ".tflite" or not in a writable directory, an unknown
            `quantization`, `lowering` or `pointwise`, a `min_group_filters`
            neither "auto" nor a positive int, "int8" without
            `representative_data` or with `representative_data` unlike the
            inputs that the model's input Normalization layer, or else its
            first trained BatchNormalization layer, describes, data of the
            wrong shape or with NaN or infinite values, a model that takes
            inputs of any size with neither `input_shape` nor data, or a
            `model` that needs Flex ops without `allow_flex_ops`.
        RuntimeError: under tf_keras (TF_USE_LEGACY_KERAS=1); an export
            whose outputs, or the Keras model's, are NaN
            or infinite on the verification inputs, or a float32 export whose
            outputs differ from Keras' by more than rounding can make them
            differ (relative: `float32_tolerance(model)`), or an "int8" export
            whose top class agrees with Keras' on fewer than half the
            verification inputs; nothing is written.

    Example:

    >>> from keras_mgconv.export import export_tflite, float32_tolerance
    >>> inputs = keras.Input((8, 8, 16))
    >>> outputs = keras_mgconv.MultigridConv2D(32, 3, group_size=8)(inputs)
    >>> model = keras.Model(inputs, outputs)
    >>> report = export_tflite(model, tmp_dir + "/layer.tflite")
    >>> report.builtin_only, report.verification.max_rel_diff <= float32_tolerance(model)
    (True, True)
    >>> report.op_counts["CONV_2D"]  # connector, 2 + 2 transfers, 2 smoothers, coarsest
    8
    """
    if USE_LEGACY_KERAS:
        raise RuntimeError(
            "keras_mgconv.export.export_tflite needs Keras 3: it converts through "
            "`model.export(format='litert')`, which tf_keras lacks. Under tf_keras, export a "
            "quantization-aware model with keras_mgconv.optimization.export_int8, or convert "
            "with keras_mgconv.optimization.tflite_converter(model). "
            f"Received: Keras {keras.__version__}, TF_USE_LEGACY_KERAS=1."
        )
    _check_model(model)
    path = _check_path(path)
    _arguments.choice("quantization", quantization, QUANTIZATIONS)
    _arguments.choice("lowering", lowering, LOWERINGS)
    _arguments.choice("pointwise", pointwise, POINTWISE)
    min_group_filters = _min_group_filters(min_group_filters, quantization, lowering)
    if integer_io and quantization != "int8":
        raise ValueError(
            f"`integer_io` needs quantization='int8': only fully quantized models have "
            f"integer inputs and outputs. Received: integer_io={integer_io!r}, "
            f"quantization={quantization!r}."
        )
    model_shape = model.inputs[0].shape
    arrays = {}
    if representative_data is not None:
        arrays["representative_data"] = _images(
            "representative_data", representative_data, model_shape
        )
    if quantization == "int8" and representative_data is None:
        raise ValueError(
            "quantization='int8' calibrates the activations' ranges on "
            "`representative_data` (in the CLI: `--dataset`): pass a few hundred typical "
            "inputs. Received: representative_data=None."
        )
    if verification_data is not None:
        arrays["verification_data"] = _images("verification_data", verification_data, model_shape)
    shape = _export_input_shape(model, input_shape, arrays)
    if quantization == "int8":
        _check_representative(model, arrays["representative_data"])
    if arrays:
        source = "verification_data" if "verification_data" in arrays else "representative_data"
        images = arrays[source]
    else:
        images = np.random.default_rng(0).random((_RANDOM_EXAMPLES, *shape), np.float32)
        source = "random"
    settings = _converter_settings(
        quantization, arrays.get("representative_data"), integer_io, allow_flex_ops
    )
    policies = _compute_policies(model)
    copy = _export_copy(model, lowering)
    folded, dense_pointwise_layers = _pointwise.fold_pointwise(copy, pointwise, quantization)
    exported = _fixed_size(folded, shape)
    # What the file computes: the model, or its float32 copy.
    reference = copy if policies else model
    tolerance = float32_tolerance(_fixed_size(reference, shape))
    report = None

    def write(temporary):
        nonlocal report
        _convert(exported, temporary, settings, model.name, lowering, min_group_filters)
        with open(temporary, "rb") as file:
            contents = _inspect(file.read())
        # ai_edge_litert has no Flex delegate: such a model cannot be run here.
        verification = (
            _verify(temporary, reference, images, source) if contents["builtin_only"] else None
        )
        report = ExportReport(
            path=path,
            quantization=quantization or "float32",
            lowering=lowering,
            size_bytes=os.path.getsize(temporary),
            verification=verification,
            input_shape=(1, *shape),
            keras_input_shape=tuple(model_shape),
            converted_from="/".join(policies) or "float32",
            pointwise=pointwise,
            dense_pointwise_layers=dense_pointwise_layers,
            min_group_filters=min_group_filters,
            **contents,
        )
        if verification is not None and not np.isfinite(verification.max_abs_diff):
            raise RuntimeError(
                f"The export could not be verified: its outputs or the Keras model's "
                f"on {verification.examples} examples ({verification.data}) are NaN or "
                f"infinite: not written to {path}."
            )
        if (
            quantization is None
            and verification is not None
            and verification.max_rel_diff > tolerance
        ):
            raise RuntimeError(
                f"The float32 export differs from the Keras model by "
                f"{report.verification.max_rel_diff:.3g} (relative), more than float32 "
                f"rounding can make it differ ({tolerance:.3g}, see "
                f"`keras_mgconv.export.float32_tolerance`): not written to {path}."
            )
        if (
            quantization == "int8"
            and verification is not None
            and verification.decided_top1_agreement < _MIN_INT8_TOP1_AGREEMENT
        ):
            raise RuntimeError(
                f"The int8 export agrees with the Keras model on the top class of only "
                f"{verification.decided_top1_agreement:.1%} of the "
                f"{verification.decided_examples} of {verification.examples} examples "
                f"({verification.data}) whose top class Keras decides, fewer than "
                f"{_MIN_INT8_TOP1_AGREEMENT:.0%}: its "
                f"activation ranges, calibrated on `representative_data`, do not fit "
                f"them. Calibrate on a few hundred typical inputs, as the model takes "
                f"them: not written to {path}."
            )

    atomic_write(path, write)
    return report


def measure_latency(path, threads=(1, 2), xnnpack=(True, False), repeats=50, warmup=5):
    """Times single invokes of a `.tflite` model with `ai_edge_litert`.

    For every combination of thread count and XNNPACK on or off, creates an
    interpreter, feeds one random input of the model's input shape (batch 1 as
    converted) and times `repeats` invokes after `warmup` untimed ones.
    XNNPACK off means `OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`: the
    builtin kernels only, as on a runtime built without XNNPACK.

    Args:
        path: a `.tflite` file.
        threads: a thread count, or a sequence of thread counts, to measure.
        xnnpack: True (LiteRT's default), False, or a sequence of them: which
            to measure.
        repeats: timed invokes per combination.
        warmup: untimed invokes first (XNNPACK packs weights on the first).

    Returns:
        A list of dicts with "threads", "xnnpack", "median_ms" and "p90_ms",
        one per combination.

    Raises:
        ValueError: for a missing file or one that is not a LiteRT model,
            thread counts that are not positive integers, `xnnpack` values
            that are not booleans, non-positive repeats, or a negative warmup.

    Example:

    >>> from keras_mgconv.export import export_tflite, measure_latency
    >>> inputs = keras.Input((8, 8, 3))
    >>> model = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    >>> _ = export_tflite(model, tmp_dir + "/conv.tflite")
    >>> rows = measure_latency(tmp_dir + "/conv.tflite", threads=(1,), repeats=3)
    >>> [(row["threads"], row["xnnpack"]) for row in rows]
    [(1, True), (1, False)]
    """
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ValueError(f"`path` must be an existing .tflite file. Received: path={path!r}.")
    if not str(path).endswith(".tflite"):
        raise ValueError(
            f"`path` must be a .tflite file (a LiteRT model, as `export_tflite` or "
            f"`keras-mgconv export` writes). Received: path={os.fspath(path)!r}."
        )
    if isinstance(threads, (int, np.integer)):
        threads = (threads,)
    try:
        threads = [_arguments.positive_int("threads", count) for count in threads]
    except (TypeError, ValueError):
        raise ValueError(
            f"`threads` must be a positive integer or a sequence of them. "
            f"Received: threads={threads!r}."
        ) from None
    # A string is a sequence too, of characters that are all true.
    settings = (
        (xnnpack,)
        if isinstance(xnnpack, (bool, np.bool_))
        else tuple(xnnpack)
        if hasattr(xnnpack, "__iter__") and not isinstance(xnnpack, (str, bytes))
        else ()
    )
    if not settings or not all(isinstance(value, (bool, np.bool_)) for value in settings):
        raise ValueError(
            f"`xnnpack` must be True, False or a sequence of them, e.g. "
            f"(True, False). Received: xnnpack={xnnpack!r}."
        )
    repeats = _arguments.positive_int("repeats", repeats)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"`warmup` must be an integer >= 0. Received: warmup={warmup!r}.")
    try:
        _interpreter(os.fspath(path), 1, False)
    except ValueError as error:
        raise ValueError(
            f"`path` is not a readable LiteRT model ({_first_line(error)}). "
            f"Received: path={os.fspath(path)!r}."
        ) from None
    rows = []
    for count in threads:
        for use_xnnpack in settings:
            interpreter = _interpreter(os.fspath(path), count, use_xnnpack)
            details = interpreter.get_input_details()[0]
            values = np.random.default_rng(0).random(details["shape"], np.float32)
            interpreter.set_tensor(details["index"], _quantize(values, details))
            for _ in range(warmup):
                interpreter.invoke()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                interpreter.invoke()
                times.append(time.perf_counter() - start)
            rows.append(
                {
                    "threads": count,
                    "xnnpack": bool(use_xnnpack),
                    "median_ms": 1000 * float(np.median(times)),
                    "p90_ms": 1000 * float(np.percentile(times, 90)),
                }
            )
    return rows


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def format_latency(rows):
    """`measure_latency`'s rows as a text table, one line a row."""
    lines = [f"{'threads':>7}  {'XNNPACK':>7}  {'median ms':>9}  {'p90 ms':>9}"]
    lines += [
        f"{row['threads']:>7}  {'on' if row['xnnpack'] else 'off':>7}  "
        f"{row['median_ms']:>9.3f}  {row['p90_ms']:>9.3f}"
        for row in rows
    ]
    return "\n".join(lines)
