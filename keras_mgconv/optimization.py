"""Quantization-aware training and pruning of multigrid models with tfmot.

tensorflow-model-optimization (tfmot) runs only on Keras 2, the `tf_keras`
package. Install the extra and select it before TensorFlow is imported:

    pip install "keras-mgconv[optimization]"
    TF_USE_LEGACY_KERAS=1 python train.py

Quantization-aware training of a model that `keras-mgconv train` (or any
Keras 3 script) saved, then a TFLite model whose weights and activations are
int8 (the command line does the same: `keras-mgconv quantize MODEL.keras`):

    from keras_mgconv import optimization
    model = optimization.load_model("runs/ResNet20-multigrid-digits/best.keras")
    qat_model = optimization.quantize_model(model, calibration_data=train.take(8))
    qat_model.compile(...); qat_model.fit(...)
    report = optimization.export_int8(qat_model, "model.int8.tflite",
                                      verification_data=test_images)

Pruning, with tfmot's schedules and callback:

    pruned = optimization.prune_low_magnitude(
        model, tfmot.sparsity.keras.ConstantSparsity(0.5, 0, frequency=10))
    pruned.compile(...)
    pruned.fit(..., callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    plain = tfmot.sparsity.keras.strip_pruning(pruned)

The layers also work with tfmot directly: they declare `get_prunable_weights()`,
so `tfmot.sparsity.keras.prune_low_magnitude(model)` prunes their kernels. tfmot
is imported inside the functions here, never when keras_mgconv is: importing it
sets TF_USE_LEGACY_KERAS=1 in the process environment. Under Keras 3 every
function here raises a RuntimeError that says how to switch.
"""

import importlib
import os
import zipfile

import numpy as np
import tensorflow as tf

from keras_mgconv import _keras, _tensorflow_logs, export
from keras_mgconv._files import atomic_write
from keras_mgconv._keras import keras
from keras_mgconv.layers import GroupedConv2D, MultigridConv2D
from keras_mgconv.layers.grouped_conv import identity_kernel, traced_implementation

# Configuration keys of a MultigridConv2D that belong to its output, and so go
# to the last convolution of its unrolled V-cycle.
_OUTPUT_KEYS = ("use_bias", "activation", "bias_initializer", "bias_regularizer", "bias_constraint")

# Inputs a calibration batch takes from an array: `predict`'s default batch size.
_CALIBRATION_BATCH = 32

_SWITCH = (
    "tensorflow-model-optimization runs only on Keras 2 (tf_keras). Install it "
    'with `pip install "keras-mgconv[optimization]"` and set '
    "TF_USE_LEGACY_KERAS=1 before TensorFlow is imported, e.g. "
    "`TF_USE_LEGACY_KERAS=1 python train.py`."
)


def _require_tf_keras(function):
    """Raises unless the process runs tf_keras.

    The one place outside `_keras` that asks which Keras is in use: under Keras
    3, tfmot fails deep inside with errors that do not name the cause.
    """
    if not _keras.USE_LEGACY_KERAS:
        raise RuntimeError(
            f"keras_mgconv.optimization.{function} needs Keras 2: {_SWITCH} "
            f"Received: Keras {keras.__version__}, TF_USE_LEGACY_KERAS unset or "
            f"not 1."
        )


def _tfmot(function):
    """tensorflow_model_optimization, imported on first use."""
    _require_tf_keras(function)
    try:
        return importlib.import_module("tensorflow_model_optimization")
    except ImportError as error:
        raise RuntimeError(
            f"keras_mgconv.optimization.{function} needs "
            f"tensorflow-model-optimization: {_SWITCH} Received: {error}."
        ) from error


def _private(function, module):
    """keras_mgconv's `_quantization` or `_pruning`: they subclass tfmot's classes."""
    _tfmot(function)
    return importlib.import_module(f"keras_mgconv.{module}")


def load_model(path):
    """Loads a `.keras` file into tf_keras, also one that Keras 3 wrote.

    `keras-mgconv train` and Keras 3 scripts write `.keras` files that
    tf_keras' own `load_model` cannot read (`Unrecognized keyword arguments:
    ['batch_shape']`): their config and weights are laid out otherwise. This
    reads them: the configuration translated to tf_keras' (inbound nodes,
    the InputLayer's shape, dtype policies, and options tf_keras lacks where
    they are unset), every layer's variables found by the layer names that the
    Keras 3 weights file keeps, and an adapted Normalization's statistics
    restored. Files tf_keras wrote load with its `load_model`.

    Args:
        path: a `.keras` file.

    Returns:
        The tf_keras model, with the file's weights. A model Keras 3 wrote is
        not compiled: compile it for fine-tuning.

    Raises:
        RuntimeError: under Keras 3, which reads the file itself.
        ValueError: for a path that is not an existing `.keras` file, or a
            model that tf_keras cannot hold (the message says which layer or
            option).

    Example:

        # TF_USE_LEGACY_KERAS=1, after `keras-mgconv train`:
        model = optimization.load_model("runs/ResNet20-multigrid-digits/best.keras")
        qat_model = optimization.quantize_model(model, calibration_data=images)
    """
    _require_tf_keras("load_model")
    if (
        not isinstance(path, (str, os.PathLike))
        or not os.path.isfile(path)
        or not str(path).endswith(".keras")
    ):
        raise ValueError(f"`path` must be an existing .keras file. Received: path={path!r}.")
    keras3_files = importlib.import_module("keras_mgconv._keras3_files")
    try:
        written_by_keras_3 = keras3_files.written_by_keras_3(path)
    except (zipfile.BadZipFile, KeyError, ValueError) as error:
        raise ValueError(
            f"{path} is not a readable Keras model ({type(error).__name__}: {error}): it "
            f"is truncated, damaged or was not saved by Keras. Received: path={path!r}."
        ) from None
    if not written_by_keras_3:
        return keras.models.load_model(path)
    try:
        return keras3_files.load(path)
    except keras3_files.UnreadableFile as error:
        raise ValueError(
            f"{path}, written by Keras 3, cannot be read into tf_keras: {error}. "
            f"Received: path={path!r}."
        ) from None


def _functional(model):
    """`model` as a functional model, the form that can be rewired."""
    if isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, model.outputs, name=model.name)
    if not isinstance(model, keras.Model) or not model._is_graph_network:
        raise ValueError(
            "Expected a functional or Sequential keras.Model built on a "
            f"keras.Input. Received: model={model!r}."
        )
    return model


def _copy(layer, name, **changes):
    """A new layer like `layer`, named `name`, with config `changes`; and its weights.

    A residual convolution becomes a plain one with the identity in its
    kernel: the same function, and a kernel that quantizers see whole.
    """
    weights = layer.get_weights()
    if layer.residual:
        weights[0] = weights[0] + identity_kernel(weights[0].shape)
        changes["residual"] = False
    return type(layer).from_config({**layer.get_config(), "name": name, **changes}), weights


def _unrolled(layer, source):
    """What `layer` becomes: (layer, inbound tensors, weights) in call order.

    `source` is the layer's inbound tensor in the model config. The last layer
    takes `layer`'s name, so the layers that consume it stay as they are.
    """
    if isinstance(layer, GroupedConv2D):
        new_layer, weights = _copy(layer, layer.name)
        return [(new_layer, [source], weights)]
    name = layer.name
    nodes = []

    def add(new_layer, weights, inputs):
        nodes.append((new_layer, inputs, weights))
        return [new_layer.name, 0, 0, {}]

    def copy(convolution, suffix, inputs):
        return add(*_copy(convolution, f"{name}_{suffix}"), inputs)

    def copy_output(convolution, inputs):
        config = layer.get_config()
        new_layer, weights = _copy(
            convolution,
            name,
            activity_regularizer=layer.activity_regularizer,
            **{key: config[key] for key in _OUTPUT_KEYS},
        )
        return add(new_layer, weights + ([layer.bias.numpy()] if layer.use_bias else []), inputs)

    def merge(merge_layer, suffix, inputs):
        return add(merge_layer(name=f"{name}_{suffix}", dtype=layer.dtype_policy), [], inputs)

    fine = [source if layer.connector is None else copy(layer.connector, "connector", [source])]
    for level, restriction in enumerate(layer.restrictions):
        fine.append(copy(restriction, f"restriction_{level}", [fine[-1]]))
    if not layer.smoothers:
        copy_output(layer.coarsest, fine)
        return nodes
    outputs = copy(layer.coarsest, "coarsest", [fine[-1]])
    for level in reversed(range(len(layer.smoothers))):
        difference = merge(keras.layers.Subtract, f"difference_{level}", [outputs, fine[level + 1]])
        correction = copy(layer.prolongations[level], f"prolongation_{level}", [difference])
        corrected = merge(keras.layers.Add, f"corrected_{level}", [fine[level], correction])
        if level:
            outputs = copy(layer.smoothers[level], f"smoother_{level}", [corrected])
        else:
            copy_output(layer.smoothers[0], [corrected])
    return nodes


def unroll_multigrid(model):
    """The same network with every MultigridConv2D spelt out as top-level layers.

    Each `MultigridConv2D` named `name` becomes the layers of its V-cycle:
    `name_connector`, `name_restriction_<l>`, `name_coarsest`,
    `keras.layers.Subtract` `name_difference_<l>`, `name_prolongation_<l>`,
    `keras.layers.Add` `name_corrected_<l>` and `name_smoother_<l>`, the last
    smoother (or the coarsest level of a one-level layer) taking the layer's
    name, bias and activation. Residual `GroupedConv2D`s, the smoothers
    included, become plain ones with the identity added to their kernel, and
    an adapted `Normalization` holds its statistics in its config. Every
    intermediate tensor is then the output of a layer, where
    quantization-aware training can put its fake quantization, and every
    kernel is the one the convolution applies. The function and the weights
    are unchanged; the model is a new one.

    Args:
        model: a functional or Sequential `keras.Model` (tf_keras).

    Returns:
        A functional `keras.Model` with the same inputs, outputs and name.

    Raises:
        RuntimeError: under Keras 3.
        ValueError: for a subclassed model, or a multigrid layer called more
            than once in it.

    Example:

    >>> model = keras.Sequential([keras.Input((8, 8, 16)), keras_mgconv.MultigridConv2D(
    ...     32, 3, padding="same", group_size=8, name="multigrid")])
    >>> unrolled = optimization.unroll_multigrid(model)
    >>> [layer.name for layer in unrolled.layers[1:]]
    ['multigrid_connector', 'multigrid_restriction_0', 'multigrid_restriction_1',
     'multigrid_coarsest', 'multigrid_difference_1', 'multigrid_prolongation_1',
     'multigrid_corrected_1', 'multigrid_smoother_1', 'multigrid_difference_0',
     'multigrid_prolongation_0', 'multigrid_corrected_0', 'multigrid']
    >>> x = np.random.rand(2, 8, 8, 16).astype("float32")
    >>> bool(np.allclose(unrolled(x), model(x), atol=1e-5))
    True
    """
    _require_tf_keras("unroll_multigrid")
    model = _functional(model)
    config = model.get_config()
    layers, weights = [], {}
    for entry in config["layers"]:
        layer = model.get_layer(entry["name"])
        if isinstance(layer, MultigridConv2D) or (
            isinstance(layer, GroupedConv2D) and layer.residual
        ):
            if len(entry["inbound_nodes"]) != 1:
                raise ValueError(
                    f"Layer {layer.name!r} is called {len(entry['inbound_nodes'])} "
                    f"times in the model; unrolling needs each multigrid or residual "
                    f"layer called once. Received: model={model.name!r}."
                )
            (source,) = entry["inbound_nodes"][0]
            for new_layer, inbound, new_weights in _unrolled(layer, source):
                layers.append(
                    {
                        **keras.layers.serialize(new_layer),
                        "name": new_layer.name,
                        "inbound_nodes": [inbound],
                    }
                )
                weights[new_layer.name] = new_weights
            continue
        if isinstance(layer, keras.layers.Normalization) and layer.input_mean is None:
            # tfmot's graph transformer copies weights with `batch_set_value`,
            # which skips the `finalize_state` that turns an adapted
            # Normalization's variables into the constants it computes with;
            # in the config the statistics survive every clone.
            entry["config"].update(
                mean=layer.adapt_mean.numpy().tolist(),
                variance=layer.adapt_variance.numpy().tolist(),
            )
            weights[layer.name] = []
        else:
            weights[layer.name] = layer.get_weights()
        layers.append(entry)
    unrolled = keras.Model.from_config({**config, "layers": layers})
    for layer in unrolled.layers:
        layer.set_weights(weights[layer.name])
    return unrolled


def quantize_model(model, calibration_data=None):
    """A quantization-aware training model of a (multigrid) model, with tfmot.

    `tfmot.quantization.keras.quantize_apply` of the `unroll_multigrid`ed model
    with keras_mgconv's quantize scheme: tfmot's default 8-bit scheme (what
    `tfmot.quantization.keras.quantize_model` applies) that also quantizes
    `GroupedConv2D`, `ChannelRestriction` and `ChannelProlongation` (kernel per
    output channel, symmetric; output with a moving-average range, as tfmot
    does `Conv2D`), `keras.layers.Subtract`, `Normalization`, `Multiply` and
    `Rescaling` (output; the last two make the MobileNetV3 factories'
    hard-swish and squeeze-and-excitation under tf_keras, which tfmot's
    registry refuses: "Layer ... Rescaling ... is not supported"), passes
    `ChannelZeroPadding` through, and leaves no fake
    quantization between a `GroupedConv2D` and the `BatchNormalization` after
    it, so that the TFLite converter folds the two. Fine-tune the result
    (`compile`, `fit`), then convert it (`tflite_converter`) with
    `optimizations=[tf.lite.Optimize.DEFAULT]` to a model whose weights and
    activations are int8.

    tfmot starts every activation range at [-6, 6] and moves it towards the
    training batches' ranges by a moving average with decay 0.999, which takes
    thousands of steps to forget the start. Short fine-tuning runs on small
    datasets (the embedded digits: 23 steps an epoch) end with ranges still
    near [-6, 6], too coarse for the V-cycle's small corrections (a 3-point
    loss for a multigrid ResNet20 after 3 epochs). `calibration_data` starts
    each range where the model's values lie instead: the average over its
    batches of each tensor's batch minimum and maximum.

    Args:
        model: a functional or Sequential `keras.Model` (tf_keras), trained or not.
        calibration_data: None, or training inputs to start the activation
            ranges from: an array of inputs (batched by 32, as `predict`
            does), or a few batches of them, as a `tf.data.Dataset` or other
            iterable of input batches or of (inputs, labels) tuples, e.g.
            `train.take(8)`.

    Returns:
        A new, uncompiled `keras.Model`; save and load it under `quantize_scope()`.

    Raises:
        RuntimeError: under Keras 3, without tensorflow-model-optimization, or
            (tfmot's, naming it) for a layer that neither tfmot nor keras_mgconv
            can quantize.
        ValueError: for a subclassed model, or `calibration_data` that is
            empty, holds batches that are not of the model's input shape, or
            gives NaN or infinite activations.

    Example:

    >>> model = keras.Sequential([keras.Input((8, 8, 16)), keras_mgconv.MultigridConv2D(
    ...     32, 3, padding="same", group_size=8, name="multigrid")])
    >>> qat_model = optimization.quantize_model(model)
    >>> type(qat_model.layers[1]).__name__
    'QuantizeLayer'
    >>> [layer.name for layer in qat_model.layers[2:5]]
    ['quant_multigrid_connector', 'quant_multigrid_restriction_0',
     'quant_multigrid_restriction_1']

    Until fine-tuning has moved tfmot's initial ranges, [-6, 6] for every
    tensor, the QAT model computes little of the model's function;
    calibrated, it starts close to it:

    >>> x = 100 * np.random.rand(4, 8, 8, 16).astype("float32")
    >>> def relative_error(qat_model):
    ...     return float(np.max(np.abs(qat_model(x) - model(x))) / np.max(np.abs(model(x))))
    >>> relative_error(qat_model) > 0.5
    True
    >>> calibrated = optimization.quantize_model(model, calibration_data=[x])
    >>> relative_error(calibrated) < 0.05
    True
    """
    tfmot = _tfmot("quantize_model")
    quantization = _private("quantize_model", "_quantization")
    if isinstance(calibration_data, (np.ndarray, tf.Tensor)):
        # An array is many inputs, not batches of them (as iterating it would give).
        shape = tuple(calibration_data.shape)
        input_shape = tuple(_functional(model).inputs[0].shape[1:])
        if (
            len(shape) != len(input_shape) + 1
            or not shape[0]
            or any(size not in (None, actual) for size, actual in zip(input_shape, shape[1:]))
        ):
            raise ValueError(
                f"`calibration_data` must be an array of the model's inputs, of shape "
                f"(inputs, {', '.join(map(str, input_shape))}). "
                f"Received: calibration_data of shape {shape}."
            )
        calibration_data = [
            calibration_data[start : start + _CALIBRATION_BATCH]
            for start in range(0, shape[0], _CALIBRATION_BATCH)
        ]
    unrolled = unroll_multigrid(model)
    annotated = tfmot.quantization.keras.quantize_annotate_model(unrolled)
    with quantize_scope():
        qat_model = tfmot.quantization.keras.quantize_apply(
            annotated, scheme=quantization.MultigridQuantizeScheme()
        )
    if calibration_data is not None:
        quantization.calibrate(qat_model, unrolled, calibration_data)
    return qat_model


def quantize_scope():
    """tfmot's `quantize_scope` with keras_mgconv's quantize configs in it.

    tfmot's wrappers cannot be reloaded from `.keras` files: save QAT models
    as HDF5 (`.h5`) or as a SavedModel.

    Raises:
        RuntimeError: under Keras 3 or without tensorflow-model-optimization.

    Example:

    >>> model = keras.Sequential([keras.Input((8, 8, 16)), keras_mgconv.MultigridConv2D(
    ...     32, 3, padding="same", group_size=8)])
    >>> qat_model = optimization.quantize_model(model)
    >>> qat_model.save(tmp_dir + "/qat.h5")
    >>> with optimization.quantize_scope():
    ...     loaded = keras.models.load_model(tmp_dir + "/qat.h5")
    >>> x = np.random.rand(2, 8, 8, 16).astype("float32")
    >>> bool(np.array_equal(loaded(x), qat_model(x)))
    True
    """
    tfmot = _tfmot("quantize_scope")
    return tfmot.quantization.keras.quantize_scope(
        _private("quantize_scope", "_quantization").CUSTOM_OBJECTS
    )


def tflite_converter(model):
    """A `tf.lite.TFLiteConverter` for a tf_keras model, built without a SavedModel of it.

    `tf.lite.TFLiteConverter.from_keras_model` converts the same function, but
    first saves `model` as a tf_keras SavedModel, which traces the call of
    every layer, and of tfmot's quantize wrappers many times over: for a
    quantization-aware multigrid ResNet8 that takes 25-40 s on a 2-core CPU
    (a ResNet20: over a minute). This converter holds only the model's
    inference function and the variables it reads, and converts the same
    ResNet8 in 6-7 s to a file of the same size and the same outputs. Set its
    options (`optimizations`, ...) as usual. (`keras_mgconv.export` converts
    through Keras 3's `model.export(format="litert")`, which tf_keras lacks;
    its `measure_latency` times the file written here.)

    Args:
        model: a built tf_keras `keras.Model`, e.g. from `quantize_model` or
            `tfmot.sparsity.keras.strip_pruning`.

    Returns:
        A `tf.lite.TFLiteConverter` of the model in inference mode, with the
        model's input shapes (batch size free).

    Raises:
        RuntimeError: under Keras 3, where `keras_mgconv.export.export_tflite`
            is the route.
        ValueError: for a model that is not a built tf_keras `keras.Model`.

    Example:

    >>> import tensorflow as tf
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 16)), keras_mgconv.MultigridConv2D(32, 3, group_size=8)])
    >>> converter = optimization.tflite_converter(optimization.quantize_model(model))
    >>> converter.optimizations = [tf.lite.Optimize.DEFAULT]
    >>> from ai_edge_litert.interpreter import Interpreter
    >>> interpreter = Interpreter(model_content=converter.convert())
    >>> sorted({op["op_name"] for op in interpreter._get_ops_details()})
    ['ADD', 'CONV_2D', 'DEQUANTIZE', 'QUANTIZE', 'SUB']
    """
    _require_tf_keras("tflite_converter")
    if not isinstance(model, keras.Model) or not model.built or not model.inputs:
        raise ValueError(
            "`model` must be a built model with known inputs, e.g. functional or "
            f"Sequential with an Input. Received: model={model!r}."
        )
    function = tf.function(lambda *inputs: model(list(inputs), training=False))
    variables = tf.Module()
    variables.model_variables = model.variables
    # One grouped CONV_2D per grouped convolution, also where TensorFlow trains
    # them split: the per-group SPLIT and CONCATENATION of a quantized graph do
    # not convert ("'tfl.transpose' op has mismatched quantized axes").
    with traced_implementation("grouped"):
        concrete = function.get_concrete_function(
            *[tf.TensorSpec(tensor.shape, tensor.dtype) for tensor in model.inputs]
        )
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete], variables)


def export_int8(qat_model, path, verification_data=None):
    """Converts a quantization-aware model to an int8 `.tflite` file and checks it.

    `tflite_converter(qat_model)` with `optimizations=[tf.lite.Optimize.DEFAULT]`:
    weights and activations in int8, with the ranges the fine-tuning learned,
    input and output in float32. The file is run with `ai_edge_litert` on
    `verification_data`, one input at a time, and compared with `qat_model`,
    as `keras_mgconv.export.export_tflite` does for Keras 3 models. It is
    written to a temporary name next to `path` and renamed once converted and
    verified: a failed export leaves nothing at `path`. The converter's own
    log lines are not shown.

    Args:
        qat_model: a model from `quantize_model`, fine-tuned.
        path: the file to write; must end in ".tflite", in an existing
            directory. An existing file is replaced.
        verification_data: inputs to verify on: an array, or an iterable such
            as a `tf.data.Dataset` of batches of inputs or of (inputs, labels);
            default 8 random inputs uniform in [0, 1).

    Returns:
        A `keras_mgconv.export.ExportReport`, quantization "int8".

    Raises:
        RuntimeError: under Keras 3, or for outputs that are NaN or infinite
            on the verification inputs (nothing is written).
        ValueError: before anything is written, for a `path` not ending in
            ".tflite" or not in a writable directory, or data of the wrong
            shape or with NaN or infinite values.

    Example:

    >>> model = keras.Sequential([keras.Input((8, 8, 16)), keras_mgconv.MultigridConv2D(
    ...     32, 3, padding="same", group_size=8)])
    >>> x = np.random.rand(16, 8, 8, 16).astype("float32")
    >>> qat_model = optimization.quantize_model(model, calibration_data=x)
    >>> report = optimization.export_int8(qat_model, tmp_dir + "/qat.tflite",
    ...                                   verification_data=x)
    >>> report.quantization, report.builtin_only, report.op_counts["CONV_2D"]
    ('int8', True, 8)
    """
    _require_tf_keras("export_int8")
    path = export._check_path(path)
    export._check_model(qat_model)
    model_shape = qat_model.inputs[0].shape
    if verification_data is not None:
        images = export._images("verification_data", verification_data, model_shape)
        source = "verification_data"
    else:
        images = np.random.default_rng(0).random(
            (8, *(size or 1 for size in model_shape[1:])), np.float32
        )
        source = "random"
    converter = tflite_converter(qat_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    report = None

    def write(temporary):
        nonlocal report
        with _tensorflow_logs.hidden(export._converter_chatter):
            content = converter.convert()
        with open(temporary, "wb") as file:
            file.write(content)
        verification = export._verify(temporary, qat_model, images, source)
        report = export.ExportReport(
            path=path,
            quantization="int8",
            lowering="grouped",
            size_bytes=len(content),
            # QAT wraps each layer as it is: 1 x 1 cycles stay cycles.
            pointwise="cycle",
            verification=verification,
            input_shape=(1, *images.shape[1:]),
            keras_input_shape=tuple(model_shape),
            **export._inspect(content),
        )
        if not np.isfinite(verification.max_abs_diff):
            raise RuntimeError(
                f"The export could not be verified: its outputs or the QAT model's on "
                f"{verification.examples} examples ({source}) are NaN or infinite: not "
                f"written to {path}."
            )

    atomic_write(path, write)
    return report


def prune_low_magnitude(model, pruning_schedule, structured=False):
    """`model` with its kernels wrapped for magnitude pruning by tfmot.

    Unstructured (the default), every layer tfmot can prune is wrapped with
    `tfmot.sparsity.keras.prune_low_magnitude` (keras_mgconv's layers declare
    their kernels; layers tfmot cannot prune, e.g. `Normalization`, stay as
    they are), and each kernel loses its smallest weights. Structured, the
    `MultigridConv2D` layers and residual `GroupedConv2D` layers are wrapped,
    and the grouped kernels whose groups can go without silencing a channel
    lose whole groups, the `(kh, kw, C_in / G, C_out / G)` blocks with the
    smallest mean magnitude: with G groups and sparsity s, all but the
    `max(1, round(G * (1 - s)))` largest. Those are the smoothers (and
    residual convolutions), which then pass the channels of a zeroed group
    through, and the transfers: a zeroed prolongation group leaves its channels
    uncorrected, a zeroed restriction group gives the coarsest level fewer
    channels. What remains is a grouped convolution with fewer groups. The
    connector keeps its weights: its zeroed groups would output zeros, on which
    a following BatchNormalization learns a moving variance near 0 and then
    blows up at inference. So do the coarsest level (one group) and all other
    layers.

    Train with `tfmot.sparsity.keras.UpdatePruningStep()` among the callbacks;
    `tfmot.sparsity.keras.strip_pruning` then gives the plain model. Note that
    tfmot's schedules update the masks every `frequency` steps (default 100)
    from `begin_step` on, so a short run needs a small `frequency`. As with
    tfmot, the wrappers hold `model`'s own layers: pruning changes `model`'s
    weights too.

    Args:
        model: a functional or Sequential `keras.Model` (tf_keras).
        pruning_schedule: a `tfmot.sparsity.keras.PruningSchedule`, e.g.
            `PolynomialDecay(0.0, 0.5, begin_step=0, end_step=1000)`.
        structured: prune whole groups (True) or single weights (False).

    Returns:
        A new functional `keras.Model`; save and load it under `prune_scope()`.

    Raises:
        RuntimeError: under Keras 3 or without tensorflow-model-optimization.
        ValueError: for a subclassed model, a `pruning_schedule` that is not
            a tfmot `PruningSchedule`, a `structured` that is not a bool, or
            `structured=True` for a model without a layer whose groups it
            prunes (the block design).

    Example:

    >>> import tensorflow_model_optimization as tfmot
    >>> model = keras.Sequential([keras.Input((8, 8, 16)), keras_mgconv.MultigridConv2D(
    ...     32, 3, padding="same", group_size=8)])
    >>> pruned = optimization.prune_low_magnitude(
    ...     model, tfmot.sparsity.keras.ConstantSparsity(0.5, 0, frequency=1),
    ...     structured=True)
    >>> pruned.compile("adam", "mse")
    >>> x = np.random.rand(4, 8, 8, 16).astype("float32")
    >>> _ = pruned.fit(x, x[..., :1].repeat(32, -1), verbose=0,
    ...                callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    >>> plain = tfmot.sparsity.keras.strip_pruning(pruned)
    >>> smoother = plain.layers[1].smoothers[0]  # 32 channels in 4 groups
    >>> kernel = smoother.kernel.numpy().reshape(-1, 4, 8)  # (weights, group, output)
    >>> zero = kernel == 0
    >>> int(zero.all(axis=(0, 2)).sum()), int(zero.any(axis=(0, 2)).sum())  # whole, any
    (2, 2)
    """
    tfmot = _tfmot("prune_low_magnitude")
    pruning = _private("prune_low_magnitude", "_pruning")
    # Both would be accepted here and fail inside `fit`, far from the call.
    if not isinstance(pruning_schedule, tfmot.sparsity.keras.PruningSchedule):
        raise ValueError(
            f"`pruning_schedule` must be a tfmot.sparsity.keras.PruningSchedule, e.g. "
            f"ConstantSparsity(0.5, 0) or PolynomialDecay(0.0, 0.5, 0, 1000). "
            f"Received: pruning_schedule={pruning_schedule!r}."
        )
    if not isinstance(structured, (bool, np.bool_)):
        raise ValueError(
            f"`structured` must be True or False. Received: structured={structured!r}."
        )

    def wrap(layer):
        if structured:
            if pruning.can_prune_groups(layer):
                return pruning.GroupPruneLowMagnitude(layer, pruning_schedule)
        elif pruning.can_prune(layer):
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule)
        return layer

    model = _functional(model)
    if structured and not any(pruning.can_prune_groups(layer) for layer in model.layers):
        # Wrapping nothing would look like pruning and prune nothing.
        raise ValueError(
            "Structured pruning prunes the groups of MultigridConv2D layers and residual "
            "GroupedConv2D layers, whose channels keep a path when a group goes, and "
            f"model {model.name!r} has none. The block design's grouped convolutions "
            "feed a BatchNormalization each, whose moving variance would fall to 0 on a "
            "zeroed group and blow up at inference: prune it with structured=False. "
            "Received: structured=True."
        )
    return keras.models.clone_model(model, clone_function=wrap)


def prune_scope():
    """tfmot's `prune_scope` with keras_mgconv's structured pruning wrapper in it.

    Needed to load a model saved with its pruning wrappers, e.g. to resume
    pruning; `tfmot.sparsity.keras.strip_pruning` gives a model that loads
    without it. Save such models as `.keras` files (or SavedModels), not
    HDF5: tfmot gives the masks of all kernels of a wrapped layer one name,
    and HDF5 cannot hold a multigrid layer's several masks under it.

    Raises:
        RuntimeError: under Keras 3 or without tensorflow-model-optimization.

    Example:

    >>> import tensorflow_model_optimization as tfmot
    >>> model = keras.Sequential([keras.Input((8, 8, 16)), keras_mgconv.MultigridConv2D(
    ...     32, 3, padding="same", group_size=8)])
    >>> pruned = optimization.prune_low_magnitude(
    ...     model, tfmot.sparsity.keras.ConstantSparsity(0.5, 0), structured=True)
    >>> pruned.save(tmp_dir + "/pruned.keras")
    >>> with optimization.prune_scope():
    ...     loaded = keras.models.load_model(tmp_dir + "/pruned.keras")
    >>> type(loaded.layers[1]).__name__
    'GroupPruneLowMagnitude'
    """
    _tfmot("prune_scope")
    return keras.utils.custom_object_scope(_private("prune_scope", "_pruning").CUSTOM_OBJECTS)
