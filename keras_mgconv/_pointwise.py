"""Exporting a 1 x 1 MultigridConv2D as one convolution with its cycle's matrix.

With 1 x 1 kernels the whole V-cycle maps each pixel linearly, so a layer is
one `(C_in, filters)` matrix (`MultigridConv2D._pointwise_kernel`). Which of
the two computes faster depends on the widths: XNNPACK runs the cycle's small
grouped convolutions, whose groups are `group_size` channels deep, at about
`group_size / 64` of a dense 1 x 1 convolution's multiply-adds per second, so
the matrix wins where it costs fewer than `64 / group_size` times the cycle's
multiply-adds (MobileNetV2's expansions, 6x wider than their inputs) and the
cycle wins beyond (its projections, the wide ResNet50 layers). In int8 the
matrix won on every layer measured, by 5-33x: XNNPACK's int8 kernels for
narrow groups run slower than its float32 ones, its dense int8 kernels many
times faster.
"""

from keras_mgconv._keras import keras
from keras_mgconv.complexity import multiply_adds_per_position
from keras_mgconv.layers import MultigridConv2D

POINTWISE = ("auto", "dense", "cycle")

# A dense 1 x 1 convolution's multiply-adds per second over a cycle's is about
# this over the group size: under XNNPACK, float32, 1 thread, 6.5-11.3 (median
# 8.8) at group size 8 and 2.7-5.6 (median 3.5) at 16, for six layer shapes
# from 96 -> 576 to 2048 -> 512 channels (benchmarks/pointwise_export.py); the
# rule picks the faster export for all twelve. In int8 the same factor was
# 20-550 (at most 51.7 multiply-adds of the matrix per one of the cycle in
# these layers): int8 exports every 1 x 1 layer as its matrix.
_SLOWDOWN_TIMES_GROUP_SIZE = 64


def exports_dense(layer, pointwise, quantization=None):
    """Whether `layer` is exported as one dense 1 x 1 convolution under `pointwise`.

    Only 1 x 1 MultigridConv2D layers with a cycle (more than one level) are:
    under "dense" all of them, under "cycle" none, and under "auto" all of
    them in an "int8" export, else those whose matrix costs at most
    `64 / group_size` times the cycle's multiply-adds.
    """
    if not (
        isinstance(layer, MultigridConv2D) and layer.kernel_size == (1, 1) and layer.restrictions
    ):
        return False
    if pointwise != "auto" or quantization == "int8":
        return pointwise != "cycle"
    dense = layer.input_spec.axes[-1] * layer.filters
    return dense * layer.group_size <= _SLOWDOWN_TIMES_GROUP_SIZE * multiply_adds_per_position(
        layer
    )


def fold_pointwise(model, pointwise, quantization=None):
    """`model` with the 1 x 1 layers that `exports_dense` picks as `Conv2D`s, or `model`.

    The other layers are `model`'s own (shared, with their weights); each
    replaced layer becomes a `Conv2D` of the same name, strides, padding,
    activation and bias whose kernel is the layer's cycle matrix: the same
    function, computed in one pass over the activations.

    Returns:
        `(folded_model, number_of_layers_replaced)`.
    """
    chosen = {
        id(layer)
        for layer in model._flatten_layers(include_self=False)
        if exports_dense(layer, pointwise, quantization)
    }
    if not chosen:
        return model, 0
    weights = {}

    def clone(layer):
        if id(layer) not in chosen:
            return layer
        conv = keras.layers.Conv2D(
            layer.filters,
            1,
            strides=layer.strides,
            padding=layer.padding,
            activation=layer.activation,
            use_bias=layer.use_bias,
            dtype=layer.dtype_policy,
            name=layer.name,
        )
        kernel = layer._pointwise_kernel(layer.input_spec.axes[-1])
        weights[conv] = [kernel] + ([layer.bias] if layer.use_bias else [])
        return conv

    folded = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for conv, values in weights.items():
        conv.set_weights([keras.ops.convert_to_numpy(value) for value in values])
    return folded, len(weights)
