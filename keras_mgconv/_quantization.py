"""keras_mgconv's quantize scheme for tfmot: tfmot's default 8-bit one, plus our layers.

Imports tensorflow_model_optimization, which sets TF_USE_LEGACY_KERAS=1 in the
process environment: only `keras_mgconv.optimization` imports this module, and
only once it has checked that the process runs tf_keras.
"""

import math

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import (
    QuantizeLayer,
)

from keras_mgconv._keras import keras
from keras_mgconv.layers import (
    ChannelProlongation,
    ChannelRestriction,
    ChannelZeroPadding,
    GroupedConv2D,
)
from keras_mgconv.layers.grouped_conv import GroupedConvBase

quantize = tfmot.quantization.keras
transforms = quantize.graph_transformations.transforms


def _output_quantizer():
    """tfmot's 8-bit activation quantizer: asymmetric, range from a moving average."""
    return quantize.quantizers.MovingAverageQuantizer(
        num_bits=8, per_axis=False, symmetric=False, narrow_range=False
    )


class OutputQuantizeConfig(quantize.QuantizeConfig):
    """Quantizes a weightless layer's output, or (quantize_output=False) nothing.

    Nothing suits layers that only move values, whose output TFLite keeps in
    their input's scale (`ChannelZeroPadding`'s PAD).
    """

    def __init__(self, quantize_output=True):
        self.quantize_output = quantize_output

    def get_weights_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [_output_quantizer()] if self.quantize_output else []

    def get_config(self):
        return {"quantize_output": self.quantize_output}


class GroupedConvQuantizeConfig(OutputQuantizeConfig):
    """Quantizes a grouped convolution as tfmot's 8-bit scheme does `Conv2D`.

    The kernel symmetrically per output channel (the last axis, as TFLite's
    per-channel CONV_2D), the output (after the activation) with a moving-average
    range. For `GroupedConv2D`, `ChannelRestriction` and `ChannelProlongation`
    once `unroll_multigrid` has made residual layers plain, so that the kernel
    quantized is the kernel applied.

    Args:
        quantize_output: False where the output flows into a layer that the
            TFLite converter folds into the convolution (BatchNormalization),
            which quantizes in its place.
    """

    def get_weights_and_quantizers(self, layer):
        return [
            (
                layer.kernel,
                quantize.quantizers.LastValueQuantizer(
                    num_bits=8, per_axis=True, symmetric=True, narrow_range=True
                ),
            )
        ]

    def set_quantize_weights(self, layer, quantize_weights):
        (layer.kernel,) = quantize_weights


class MultigridQuantizeRegistry(quantize.default_8bit.Default8BitQuantizeRegistry):
    """tfmot's 8-bit registry, plus the layers of unrolled multigrid models.

    And `Multiply` and `Rescaling`, which tfmot's registry lacks: the
    MobileNetV3 factories' squeeze-and-excitation gates and hard-swish are
    made of them under tf_keras, as is their input preprocessing. Their
    outputs are quantized, as tfmot does `Add`'s: TFLite computes them as
    int8 MUL and ADD.
    """

    def _own_config(self, layer):
        if isinstance(layer, GroupedConvBase):
            return GroupedConvQuantizeConfig()
        if isinstance(
            layer,
            (
                keras.layers.Subtract,
                keras.layers.Normalization,
                keras.layers.Multiply,
                keras.layers.Rescaling,
            ),
        ):
            return OutputQuantizeConfig()
        if isinstance(layer, ChannelZeroPadding):
            return OutputQuantizeConfig(quantize_output=False)
        return None

    def supports(self, layer):
        return self._own_config(layer) is not None or super().supports(layer)

    def get_quantize_config(self, layer):
        return self._own_config(layer) or super().get_quantize_config(layer)


class GroupedConvBatchNormQuantize(transforms.Transform):
    """No fake quantization between a GroupedConv2D and the BatchNormalization after it.

    tfmot's `Conv2DBatchNormQuantize` for our convolution: the TFLite converter
    folds the normalisation into the convolution, so the range to learn is the
    normalisation's output.
    """

    def pattern(self):
        return transforms.LayerPattern(
            "BatchNormalization",
            inputs=[
                transforms.LayerPattern(
                    "keras_mgconv>GroupedConv2D", config={"activation": "linear"}
                )
            ],
        )

    def replacement(self, match_layer):
        match_layer.input_layers[0].metadata["quantize_config"] = GroupedConvQuantizeConfig(
            quantize_output=False
        )
        match_layer.metadata["quantize_config"] = OutputQuantizeConfig()
        return match_layer


class ProlongationBatchNormQuantize(GroupedConvBatchNormQuantize):
    """`GroupedConvBatchNormQuantize` for a ChannelProlongation and the batch norm after it.

    The block design's coarse-grid correction, `BN(P(y_c - x_c))`: tfmot
    quantizes no BatchNormalization that follows another layer than its own
    convolutions.
    """

    def pattern(self):
        return transforms.LayerPattern(
            "BatchNormalization",
            inputs=[transforms.LayerPattern("keras_mgconv>ChannelProlongation")],
        )


class MultigridQuantizeLayoutTransform(quantize.default_8bit.Default8BitQuantizeLayoutTransform):
    """tfmot's 8-bit layout transforms, then the two batch-norm foldings above."""

    def apply(self, model, layer_quantize_map):
        model, layer_quantize_map = super().apply(model, layer_quantize_map)
        return quantize.graph_transformations.model_transformer.ModelTransformer(
            model,
            [GroupedConvBatchNormQuantize(), ProlongationBatchNormQuantize()],
            set(layer_quantize_map),
            layer_quantize_map,
        ).transform()


class MultigridQuantizeScheme(quantize.QuantizeScheme):
    """tfmot's default 8-bit scheme, extended to keras_mgconv's layers."""

    def get_layout_transformer(self):
        return MultigridQuantizeLayoutTransform()

    def get_quantize_registry(self):
        return MultigridQuantizeRegistry()


def _quantized_tensors(qat_model):
    """Where `qat_model` fake-quantizes activations, as (range variables, layer name, pre).

    The name is that of the layer whose output (pre False) or pre-activation
    (pre True: before a softmax, sigmoid, tanh or gelu) is quantized, in the
    model that `quantize_apply` wrapped; tfmot keeps the names inside its
    wrappers. tfmot has no public API for these variables.
    """
    inbound = {
        entry["name"]: entry["inbound_nodes"][0][0][0]
        for entry in qat_model.get_config()["layers"]
        if entry["inbound_nodes"]
    }
    for layer in qat_model.layers:
        if isinstance(layer, quantize.QuantizeWrapper):
            if layer._output_quantizers:
                yield layer._output_quantizer_vars, layer.layer.name, False
            for activation in layer._quantize_activations:
                if activation._should_pre_quantize():
                    yield activation._pre_activation_vars, layer.layer.name, True
                if activation._should_post_quantize():
                    yield activation._post_activation_vars, layer.layer.name, False
        elif isinstance(layer, QuantizeLayer) and layer.quantizer is not None:
            yield layer.quantizer_vars, inbound[layer.name], False


def _pre_activation(layer):
    """`layer`'s output before its activation, from a linear copy of it."""
    linear = type(layer).from_config(
        {**layer.get_config(), "activation": "linear", "name": f"{layer.name}_pre_activation"}
    )
    outputs = linear(layer.input)
    linear.set_weights(layer.get_weights())
    return outputs


def calibrate(qat_model, float_model, batches):
    """Starts the quantization ranges of `qat_model` where `float_model`'s values lie.

    tfmot starts every activation range at [-6, 6] and moves it towards each
    training batch's range by a moving average with decay 0.999: after a few
    hundred fine-tuning steps the ranges are still near [-6, 6], and the small
    values of the V-cycle's corrections are lost in steps of 0.05. Here each
    range starts as the average, over `batches`, of the batch's minimum and
    maximum (widened to hold 0), of the tensor in `float_model`, the model that
    `quantize_apply` wrapped: the value the moving average tends to.

    Args:
        qat_model: the model `quantize_apply` made of `float_model`.
        float_model: the model it quantized, e.g. `unroll_multigrid`'s.
        batches: iterable of input batches, or of (inputs, labels, ...) tuples.

    Raises:
        ValueError: where `batches` is empty, or one of them gives a tensor a
            NaN or infinite range.
    """
    quantized = list(_quantized_tensors(qat_model))
    tensors = sorted({(name, pre) for _, name, pre in quantized})
    layers = [float_model.get_layer(name) for name, _ in tensors]
    probe = keras.Model(
        float_model.inputs,
        [
            _pre_activation(layer) if pre else layer.output
            for layer, (_, pre) in zip(layers, tensors)
        ],
    )
    totals = np.zeros((len(tensors), 2))
    count = 0
    input_shape = tuple(float_model.inputs[0].shape[1:])
    for batch in batches:
        inputs = batch[0] if isinstance(batch, tuple) else batch
        shape = tuple(getattr(inputs, "shape", ()))
        if len(shape) != len(input_shape) + 1 or any(
            size not in (None, actual) for size, actual in zip(input_shape, shape[1:])
        ):
            raise ValueError(
                f"`calibration_data` must give batches of the model's inputs, of shape "
                f"(batch, {', '.join(map(str, input_shape))}): its batch {count} has shape "
                f"{shape}. Pass an array of inputs, or an iterable of batches of them. "
                f"Received: calibration_data of type {type(batches).__name__}."
            )
        values = probe(inputs, training=False)
        ranges = [
            (min(float(tf.reduce_min(value)), 0.0), max(float(tf.reduce_max(value)), 0.0))
            for value in values
        ]
        for (name, _), (low, high) in zip(tensors, ranges):
            # NaN or infinite ranges would quantize every value to NaN.
            if not math.isfinite(low) or not math.isfinite(high):
                raise ValueError(
                    f"`calibration_data` must give finite activations: its batch {count} "
                    f"gives layer {name!r} the range [{low}, {high}] (NaN or infinite inputs, "
                    f"or inputs too large for float32). Received: calibration_data="
                    f"{batches!r:.200}"
                )
        totals += ranges
        count += 1
    if not count:
        raise ValueError(
            f"`calibration_data` must hold at least one batch. "
            f"Received: calibration_data={batches!r}."
        )
    ranges = dict(zip(tensors, totals / count))
    for variables, name, pre in quantized:
        low, high = ranges[name, pre]
        variables["min_var"].assign(low)
        variables["max_var"].assign(high)
    # The kernels' ranges too, as the first training step would set them: tfmot
    # also starts those at [-6, 6], which rounds most weights to 0 until then.
    for layer in qat_model.layers:
        for weight, quantizer, variables in getattr(layer, "_weight_vars", []):
            quantizer(weight, True, weights=variables)


# tfmot writes the layers inside its wrappers in the legacy format, by bare class
# name, without the package they are registered under: HDF5 files need them here.
CUSTOM_OBJECTS = {
    "GroupedConvQuantizeConfig": GroupedConvQuantizeConfig,
    "OutputQuantizeConfig": OutputQuantizeConfig,
    **{
        layer.__name__: layer
        for layer in (GroupedConv2D, ChannelRestriction, ChannelProlongation, ChannelZeroPadding)
    },
}
