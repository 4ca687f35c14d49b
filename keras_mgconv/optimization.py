"""Quantization-aware training and pruning of multigrid models with tfmot.

tensorflow-model-optimization (tfmot) runs only on Keras 2, the `tf_keras`
package. Install the extra and select it before TensorFlow is imported:

    pip install "keras-mgconv[optimization]"
    TF_USE_LEGACY_KERAS=1 python train.py

Quantization-aware training, then a full-integer TFLite model:

    from keras_mgconv import optimization
    qat_model = optimization.quantize_model(model)
    qat_model.compile(...); qat_model.fit(...)
    converter = tf.lite.TFLiteConverter.from_keras_model(qat_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    tflite_bytes = converter.convert()

Pruning, with tfmot's schedules and callback:

    pruned = optimization.prune_low_magnitude(
        model, tfmot.sparsity.keras.ConstantSparsity(0.5, 0, frequency=10))
    pruned.compile(...)
    pruned.fit(..., callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    plain = tfmot.sparsity.keras.strip_pruning(pruned)

The layers also work with tfmot directly: they declare `get_prunable_weights()`,
so `tfmot.sparsity.keras.prune_low_magnitude(model)` prunes their kernels. tfmot
is imported inside the functions here, never when keras_mgconv is: importing it
sets TF_USE_LEGACY_KERAS=1 in the process environment.
"""

import importlib

from keras_mgconv import _keras
from keras_mgconv._keras import keras
from keras_mgconv.layers import GroupedConv2D, MultigridConv2D
from keras_mgconv.layers.grouped_conv import identity_kernel

# Configuration keys of a MultigridConv2D that belong to its output, and so go
# to the last convolution of its unrolled V-cycle.
_OUTPUT_KEYS = ("use_bias", "activation", "bias_initializer", "bias_regularizer",
                "bias_constraint")

_SWITCH = (
    "tensorflow-model-optimization runs only on Keras 2 (tf_keras). Install it "
    "with `pip install \"keras-mgconv[optimization]\"` and set "
    "TF_USE_LEGACY_KERAS=1 before TensorFlow is imported, e.g. "
    "`TF_USE_LEGACY_KERAS=1 python train.py`.")


def _require_tf_keras(function):
    """Raises unless the process runs tf_keras.

    The one place outside `_keras` that asks which Keras is in use: under Keras
    3, tfmot fails deep inside with errors that do not name the cause.
    """
    if not _keras.USE_LEGACY_KERAS:
        raise RuntimeError(
            f"keras_mgconv.optimization.{function} needs Keras 2: {_SWITCH} "
            f"Received: Keras {keras.__version__}, TF_USE_LEGACY_KERAS unset or "
            f"not 1.")


def _tfmot(function):
    """tensorflow_model_optimization, imported on first use."""
    _require_tf_keras(function)
    try:
        return importlib.import_module("tensorflow_model_optimization")
    except ImportError as error:
        raise RuntimeError(
            f"keras_mgconv.optimization.{function} needs "
            f"tensorflow-model-optimization: {_SWITCH} Received: {error}.") from error


def _private(function, module):
    """keras_mgconv's `_quantization` or `_pruning`: they subclass tfmot's classes."""
    _tfmot(function)
    return importlib.import_module(f"keras_mgconv.{module}")


def _functional(model):
    """`model` as a functional model, the form that can be rewired."""
    if isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, model.outputs, name=model.name)
    if not isinstance(model, keras.Model) or not model._is_graph_network:
        raise ValueError(
            "Expected a functional or Sequential keras.Model built on a "
            f"keras.Input. Received: model={model!r}.")
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
            convolution, name, activity_regularizer=layer.activity_regularizer,
            **{key: config[key] for key in _OUTPUT_KEYS})
        return add(new_layer, weights + ([layer.bias.numpy()] if layer.use_bias else []),
                   inputs)

    def merge(merge_layer, suffix, inputs):
        return add(merge_layer(name=f"{name}_{suffix}", dtype=layer.dtype_policy), [], inputs)

    fine = [source if layer.connector is None
            else copy(layer.connector, "connector", [source])]
    for level, restriction in enumerate(layer.restrictions):
        fine.append(copy(restriction, f"restriction_{level}", [fine[-1]]))
    if not layer.smoothers:
        copy_output(layer.coarsest, fine)
        return nodes
    outputs = copy(layer.coarsest, "coarsest", [fine[-1]])
    for level in reversed(range(len(layer.smoothers))):
        difference = merge(keras.layers.Subtract, f"difference_{level}",
                           [outputs, fine[level + 1]])
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
    """
    _require_tf_keras("unroll_multigrid")
    model = _functional(model)
    config = model.get_config()
    layers, weights = [], {}
    for entry in config["layers"]:
        layer = model.get_layer(entry["name"])
        if isinstance(layer, MultigridConv2D) or (
                isinstance(layer, GroupedConv2D) and layer.residual):
            if len(entry["inbound_nodes"]) != 1:
                raise ValueError(
                    f"Layer {layer.name!r} is called {len(entry['inbound_nodes'])} "
                    f"times in the model; unrolling needs each multigrid or residual "
                    f"layer called once. Received: model={model.name!r}.")
            (source,) = entry["inbound_nodes"][0]
            for new_layer, inbound, new_weights in _unrolled(layer, source):
                layers.append({**keras.layers.serialize(new_layer),
                               "name": new_layer.name, "inbound_nodes": [inbound]})
                weights[new_layer.name] = new_weights
            continue
        if isinstance(layer, keras.layers.Normalization) and layer.input_mean is None:
            # tfmot's graph transformer copies weights with `batch_set_value`,
            # which skips the `finalize_state` that turns an adapted
            # Normalization's variables into the constants it computes with;
            # in the config the statistics survive every clone.
            entry["config"].update(mean=layer.adapt_mean.numpy().tolist(),
                                   variance=layer.adapt_variance.numpy().tolist())
            weights[layer.name] = []
        else:
            weights[layer.name] = layer.get_weights()
        layers.append(entry)
    unrolled = keras.Model.from_config({**config, "layers": layers})
    for layer in unrolled.layers:
        layer.set_weights(weights[layer.name])
    return unrolled


def quantize_model(model):
    """A quantization-aware training model of a (multigrid) model, with tfmot.

    `tfmot.quantization.keras.quantize_apply` of the `unroll_multigrid`ed model
    with keras_mgconv's quantize scheme: tfmot's default 8-bit scheme (what
    `tfmot.quantization.keras.quantize_model` applies) that also quantizes
    `GroupedConv2D`, `ChannelRestriction` and `ChannelProlongation` (kernel per
    output channel, symmetric; output with a moving-average range, as tfmot
    does `Conv2D`), `keras.layers.Subtract` and `keras.layers.Normalization`
    (output), passes `ChannelZeroPadding` through, and leaves no fake
    quantization between a `GroupedConv2D` and the `BatchNormalization` after
    it, so that the TFLite converter folds the two. Fine-tune the result
    (`compile`, `fit`), then convert it with `tf.lite.TFLiteConverter` and
    `optimizations=[tf.lite.Optimize.DEFAULT]` to a model whose weights and
    activations are int8.

    Args:
        model: a functional or Sequential `keras.Model` (tf_keras), trained or not.

    Returns:
        A new, uncompiled `keras.Model`; save and load it under `quantize_scope()`.

    Raises:
        RuntimeError: under Keras 3, without tensorflow-model-optimization, or
            (tfmot's, naming it) for a layer that neither tfmot nor keras_mgconv
            can quantize.
        ValueError: for a subclassed model.
    """
    tfmot = _tfmot("quantize_model")
    quantization = _private("quantize_model", "_quantization")
    annotated = tfmot.quantization.keras.quantize_annotate_model(unroll_multigrid(model))
    with quantize_scope():
        return tfmot.quantization.keras.quantize_apply(
            annotated, scheme=quantization.MultigridQuantizeScheme())


def quantize_scope():
    """tfmot's `quantize_scope` with keras_mgconv's quantize configs in it.

    Example:

        qat_model.save("qat.keras")
        with optimization.quantize_scope():
            loaded = keras.models.load_model("qat.keras")

    Raises:
        RuntimeError: under Keras 3 or without tensorflow-model-optimization.
    """
    tfmot = _tfmot("quantize_scope")
    return tfmot.quantization.keras.quantize_scope(
        _private("quantize_scope", "_quantization").CUSTOM_OBJECTS)


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
        ValueError: for a subclassed model.
    """
    tfmot = _tfmot("prune_low_magnitude")
    pruning = _private("prune_low_magnitude", "_pruning")

    def wrap(layer):
        if structured:
            if pruning.can_prune_groups(layer):
                return pruning.GroupPruneLowMagnitude(layer, pruning_schedule)
        elif pruning.can_prune(layer):
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule)
        return layer

    return keras.models.clone_model(_functional(model), clone_function=wrap)


def prune_scope():
    """tfmot's `prune_scope` with keras_mgconv's structured pruning wrapper in it.

    Raises:
        RuntimeError: under Keras 3 or without tensorflow-model-optimization.
    """
    _tfmot("prune_scope")
    return keras.utils.custom_object_scope(
        _private("prune_scope", "_pruning").CUSTOM_OBJECTS)
