"""Counting the multiply-adds of a built Keras model.

A convolution (standard, grouped or depthwise) or a dense layer does one
multiply-add per kernel weight at every output position. A MultigridConv2D runs
all its convolutions, connector included, at its output resolution, so the same
rule holds with the kernel weights of all its sublayers. Biases, normalisation,
activations, pooling and additions are not counted (the usual convention).
"""

import math

from keras_mgconv._keras import keras
from keras_mgconv.layers import MultigridConv2D
from keras_mgconv.layers.grouped_conv import GroupedConvBase

_COUNTED = (
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.Dense,
    GroupedConvBase,  # GroupedConv2D, ChannelRestriction, ChannelProlongation
    MultigridConv2D,
)


def multiply_adds_per_position(layer):
    """Multiply-adds of a counted layer at one output position: its kernel weights.

    A MultigridConv2D's are those of all its convolutions. Frozen layers
    (`trainable=False`) compute as much as the others.
    """
    return sum(math.prod(weight.shape) for weight in layer.weights if "kernel" in weight.name)


def count_multiply_adds(model):
    """Multiply-adds of one forward pass of a built functional model, per example.

    Counts Conv2D, DepthwiseConv2D, Dense, GroupedConv2D, ChannelRestriction,
    ChannelProlongation and MultigridConv2D layers (the latter with everything
    inside it), also inside nested models.

    Args:
        model: a built functional or Sequential `keras.Model`.

    Returns:
        int.

    Raises:
        ValueError: if a counted layer's output has unknown spatial size
            (build the model with a fixed `input_shape`).

    Example:

    >>> inputs = keras.Input((8, 8, 3))
    >>> model = keras.Model(inputs, keras.layers.Conv2D(4, 3, padding="same")(inputs))
    >>> count_multiply_adds(model)  # 8 * 8 positions * (3 * 3 * 3 * 4) weights
    6912
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_multiply_adds(layer)
        elif isinstance(layer, _COUNTED):
            output_shape = tuple(layer.output.shape)
            if any(size is None for size in output_shape[1:]):
                raise ValueError(
                    f"Layer {layer.name!r} has output shape {output_shape}: build "
                    f"the model with a fixed input_shape to count multiply-adds."
                )
            total += math.prod(output_shape[1:-1]) * multiply_adds_per_position(layer)
    return total
