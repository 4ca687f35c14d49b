"""keras_mgconv's quantize scheme for tfmot: tfmot's default 8-bit one, plus our layers.

Imports tensorflow_model_optimization, which sets TF_USE_LEGACY_KERAS=1 in the
process environment: only `keras_mgconv.optimization` imports this module, and
only once it has checked that the process runs tf_keras.
"""

import tensorflow_model_optimization as tfmot

from keras_mgconv._keras import keras
from keras_mgconv.layers import ChannelProlongation, ChannelRestriction, GroupedConv2D
from keras_mgconv.layers.grouped_conv import GroupedConvBase
from keras_mgconv.models.resnet import ChannelZeroPadding

quantize = tfmot.quantization.keras
transforms = quantize.graph_transformations.transforms


def _output_quantizer():
    """tfmot's 8-bit activation quantizer: asymmetric, range from a moving average."""
    return quantize.quantizers.MovingAverageQuantizer(
        num_bits=8, per_axis=False, symmetric=False, narrow_range=False)


class GroupedConvQuantizeConfig(quantize.QuantizeConfig):
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

    def __init__(self, quantize_output=True):
        self.quantize_output = quantize_output

    def get_weights_and_quantizers(self, layer):
        return [(layer.kernel, quantize.quantizers.LastValueQuantizer(
            num_bits=8, per_axis=True, symmetric=True, narrow_range=True))]

    def set_quantize_weights(self, layer, quantize_weights):
        (layer.kernel,) = quantize_weights

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [_output_quantizer()] if self.quantize_output else []

    def get_config(self):
        return {"quantize_output": self.quantize_output}


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


class MultigridQuantizeRegistry(quantize.default_8bit.Default8BitQuantizeRegistry):
    """tfmot's 8-bit registry, plus the layers of unrolled multigrid models."""

    def _own_config(self, layer):
        if isinstance(layer, GroupedConvBase):
            return GroupedConvQuantizeConfig()
        if isinstance(layer, (keras.layers.Subtract, keras.layers.Normalization)):
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
            inputs=[transforms.LayerPattern(
                "keras_mgconv>GroupedConv2D", config={"activation": "linear"})])

    def replacement(self, match_layer):
        match_layer.input_layers[0].metadata["quantize_config"] = (
            GroupedConvQuantizeConfig(quantize_output=False))
        match_layer.metadata["quantize_config"] = OutputQuantizeConfig()
        return match_layer


class MultigridQuantizeLayoutTransform(
        quantize.default_8bit.Default8BitQuantizeLayoutTransform):
    """tfmot's 8-bit layout transforms, then `GroupedConvBatchNormQuantize`."""

    def apply(self, model, layer_quantize_map):
        model, layer_quantize_map = super().apply(model, layer_quantize_map)
        return quantize.graph_transformations.model_transformer.ModelTransformer(
            model, [GroupedConvBatchNormQuantize()], set(layer_quantize_map),
            layer_quantize_map).transform()


class MultigridQuantizeScheme(quantize.QuantizeScheme):
    """tfmot's default 8-bit scheme, extended to keras_mgconv's layers."""

    def get_layout_transformer(self):
        return MultigridQuantizeLayoutTransform()

    def get_quantize_registry(self):
        return MultigridQuantizeRegistry()


# tfmot writes the layers inside its wrappers in the legacy format, by bare class
# name, without the package they are registered under: HDF5 files need them here.
CUSTOM_OBJECTS = {
    "GroupedConvQuantizeConfig": GroupedConvQuantizeConfig,
    "OutputQuantizeConfig": OutputQuantizeConfig,
    **{layer.__name__: layer for layer in (
        GroupedConv2D, ChannelRestriction, ChannelProlongation, ChannelZeroPadding)},
}
