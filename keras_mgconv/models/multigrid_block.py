"""The authors' block design: a whole residual block as one multigrid V-cycle.

`MultigridConv2D` (the layer design) replaces each convolution by a linear
V-cycle. The code released with Eliasof et al.'s paper applies the cycle to a
whole residual block instead, with nonlinear smoothing: every level above the
coarsest is smoothed by a residual unit of grouped convolutions, batch norm and
ReLU, the coarsest level by a dense one. With C_0 > C_1 > ... > C_L the level
widths (`keras_mgconv.layers.level_widths`):

```
block(x):  x = ReLU(BN(connector(x)))         only if the width or stride changes
           return V(x, 0)
V(x_l, l): x_c = R_l(x_l)                     ChannelRestriction, C_l -> C_l/2
           y_c = V(x_c, l + 1), or unit_L(x_c) at the coarsest level (dense)
           z   = x_l + BN(P_l(y_c - x_c))     ChannelProlongation, C_l/2 -> C_l
           return unit_l(z)                   grouped, C_l / group_size groups
unit(z):   ReLU(z + BN(conv_n(...ReLU(BN(conv_1(z))))))
```

The connector is a 3x3 grouped convolution whose groups see `group_size` input
channels each, as `MultigridConv2D`'s. Smoothing is post-smoothing only, and
no skip connection goes around the whole cycle: the coarse-grid corrections and
the units' own skips carry the signal. Every convolution is followed by batch
norm and has no bias.

Basic blocks smooth with two 3x3 convolutions. Bottleneck blocks carry
`4 * C_l` channels at level l (`filters` is the bottleneck width, as in
ResNet50) and smooth with a bottleneck unit, 1x1 to C_l, 3x3, 1x1 back to
`4 * C_l`, all three grouped in C_l / group_size groups (so the 3x3 groups have
`group_size` channels); the transfers group `4 * group_size` fine channels.

The block is made of registered layers only (`GroupedConv2D`,
`ChannelRestriction`, `ChannelProlongation`, `BatchNormalization`,
`Activation`, `Add`, `Subtract`), so models built of it save, load, export to
TFLite and go through tensorflow-model-optimization as any functional model.
Layer names are `{name}_connector_conv`, `{name}_level{l}_restrict`,
`{name}_level{l}_prolong`, `{name}_level{l}_1_conv`, ..., and the block's
output is the layer `{name}_out`.
"""

import math
import numbers

from keras_mgconv._keras import keras
from keras_mgconv.layers import (
    ChannelProlongation,
    ChannelRestriction,
    GroupedConv2D,
    _arguments,
    level_widths,
)
from keras_mgconv.layers.multigrid_conv import connector_groups
from keras_mgconv.models import common


def _multigrid_block(
    x,
    filters,
    strides,
    group_size,
    coarsest_channels,
    batch_norm_momentum,
    batch_norm_epsilon,
    expansion,
    name,
    zero_init_residual,
):
    strides = _arguments.pair("strides", strides)
    common.batch_norm_momentum(batch_norm_momentum)
    if (
        isinstance(batch_norm_epsilon, bool)
        or not isinstance(batch_norm_epsilon, numbers.Real)
        or not 0 < batch_norm_epsilon < math.inf
    ):
        raise ValueError(
            "Invalid value for argument `batch_norm_epsilon`. Expected a finite number > 0. "
            f"Received: batch_norm_epsilon={batch_norm_epsilon!r}."
        )
    levels = level_widths(filters, group_size, coarsest_channels)
    if len(levels) == 1:
        raise ValueError(
            "A multigrid block needs at least two levels: `filters` must be a "
            "multiple of `group_size` above `coarsest_channels` (default: "
            "`group_size`). Build a standard residual block for narrower widths. "
            f"Received: filters={filters}, group_size={group_size}, "
            f"coarsest_channels={coarsest_channels}."
        )
    input_channels = x.shape[-1]
    if len(x.shape) != 4 or input_channels is None:
        raise ValueError(
            "A multigrid block takes 4D inputs (batch, height, width, channels) "
            f"with known channels. Received: x.shape={tuple(x.shape)}."
        )

    def batch_norm(tensor, layer_name, zero_start=False):
        return keras.layers.BatchNormalization(
            momentum=batch_norm_momentum,
            epsilon=batch_norm_epsilon,
            gamma_initializer="zeros" if zero_start else "ones",
            name=layer_name,
        )(tensor)

    def conv_bn(
        tensor, conv_filters, kernel_size, groups, prefix, conv_strides=1, zero_start=False
    ):
        tensor = GroupedConv2D(
            conv_filters,
            kernel_size,
            groups=groups,
            strides=conv_strides,
            padding="same",
            use_bias=False,
            name=f"{prefix}_conv",
        )(tensor)
        return batch_norm(tensor, f"{prefix}_bn", zero_start)

    def relu(tensor, layer_name):
        return keras.layers.Activation("relu", name=layer_name)(tensor)

    def residual_unit(z, width, groups, prefix, output_name, zero_start=False):
        convolutions = (
            [(width, 3), (width, 3)]
            if expansion == 1
            else [(width, 1), (width, 3), (expansion * width, 1)]
        )
        y = z
        for index, (unit_filters, kernel_size) in enumerate(convolutions, start=1):
            if index > 1:
                y = relu(y, f"{prefix}_{index - 1}_relu")
            y = conv_bn(
                y,
                unit_filters,
                kernel_size,
                groups,
                f"{prefix}_{index}",
                zero_start=zero_start and index == len(convolutions),
            )
        y = keras.layers.Add(name=f"{prefix}_add")([z, y])
        return relu(y, output_name)

    def v_cycle(fine, level):
        prefix = f"{name}_level{level}"
        width = levels[level]
        if level == len(levels) - 1:
            return residual_unit(fine, width, 1, prefix, f"{prefix}_out")
        transfer_group_size = expansion * group_size
        coarse = ChannelRestriction(transfer_group_size, name=f"{prefix}_restrict")(fine)
        solved = v_cycle(coarse, level + 1)
        difference = keras.layers.Subtract(name=f"{prefix}_difference")([solved, coarse])
        correction = ChannelProlongation(transfer_group_size, name=f"{prefix}_prolong")(difference)
        # With `zero_init_residual`, the two branches that add into the
        # block's stream, the correction and the finest unit's convolutions,
        # start at zero scale, so that the block starts as ReLU of its input.
        # The coarse levels start at scale 1: a coarse unit started as the
        # identity would send up a difference of exactly zero, and a zero
        # scale on both sides of it is a saddle the gradient never leaves.
        zero_start = bool(zero_init_residual) and level == 0
        correction = batch_norm(correction, f"{prefix}_prolong_bn", zero_start)
        corrected = keras.layers.Add(name=f"{prefix}_correct")([fine, correction])
        return residual_unit(
            corrected,
            width,
            width // group_size,
            prefix,
            f"{name}_out" if level == 0 else f"{prefix}_out",
            zero_start,
        )

    if strides != (1, 1) or input_channels != expansion * filters:
        groups = connector_groups(input_channels, expansion * filters, group_size)
        x = conv_bn(x, expansion * filters, 3, groups, f"{name}_connector", strides)
        x = relu(x, f"{name}_connector_relu")
    return v_cycle(x, 0)


def multigrid_basic_block(
    x,
    filters,
    strides=1,
    group_size=16,
    coarsest_channels=None,
    batch_norm_momentum=0.99,
    batch_norm_epsilon=1e-3,
    name="multigrid_block",
    zero_init_residual=True,
):
    """A residual basic block as one V-cycle: the authors' block design.

    Levels C_0 = `filters`, C_0/2, ..., down to at most `coarsest_channels`.
    Each level above the coarsest is smoothed by a grouped basic block
    (`ReLU(z + BN(conv(ReLU(BN(conv(z))))))`, 3x3 convolutions in groups of
    `group_size`), the coarsest by a dense one; see the module docstring for
    the cycle. A connector (3x3 grouped convolution, batch norm, ReLU) changes
    the width and applies `strides` first where needed. Kernel weights, with
    s = `group_size`:

    ```
    sum_{l<L} 19 * s * C_l  +  18 * C_L**2  +  connector
    ```

    (per level: two 3x3 grouped convolutions, 9 * s * C_l each, and the two
    transfers, s * C_l / 2 each), linear in `filters` where a basic block's
    two 3x3 convolutions have 18 * C**2.

    Args:
        x: 4D channels-last Keras tensor with known channels.
        filters: the output channels; a multiple of `group_size` above
            `coarsest_channels`.
        strides: int or pair of ints, applied by the connector.
        group_size: even int, the channels per group of the smoothers and the
            transfers.
        coarsest_channels: the widest allowed coarsest level (default
            `group_size`).
        batch_norm_momentum, batch_norm_epsilon: of every BatchNormalization.
        name: the prefix of every layer name; unique in the model.
        zero_init_residual: if True (default), the BatchNormalization
            after the finest prolongation and the finest unit's last one
            start at zero scale, so that the block starts as `ReLU` of its
            input (after the connector), as Goyal et al.'s zero-initialised
            residual blocks do; the coarse levels start at scale 1. False
            starts every scale at 1.

    Returns:
        The block's output tensor, `(batch, height / strides, width / strides,
        filters)`.

    Raises:
        ValueError: for `filters`, `group_size` or `coarsest_channels` that
            give fewer than two levels or levels above the coarsest that are
            not multiples of `group_size` (see `level_widths`), non-positive
            `strides`, a `batch_norm_momentum` outside [0, 1), a
            `batch_norm_epsilon` that is not a finite number > 0, or inputs
            without known channels.

    Example:

    >>> inputs = keras.Input((8, 8, 16))
    >>> outputs = keras_mgconv.models.multigrid_basic_block(
    ...     inputs, 32, strides=2, group_size=8, name="block")
    >>> tuple(outputs.shape)
    (None, 4, 4, 32)
    >>> model = keras.Model(inputs, outputs)
    >>> [layer.name for layer in model.layers if "restrict" in layer.name]
    ['block_level0_restrict', 'block_level1_restrict']
    """
    return _multigrid_block(
        x,
        filters,
        strides,
        group_size,
        coarsest_channels,
        batch_norm_momentum,
        batch_norm_epsilon,
        1,
        name,
        zero_init_residual,
    )


def multigrid_bottleneck_block(
    x,
    filters,
    strides=1,
    group_size=16,
    coarsest_channels=None,
    batch_norm_momentum=0.99,
    batch_norm_epsilon=1e-3,
    name="multigrid_block",
    zero_init_residual=True,
):
    """A bottleneck block as one V-cycle: the block design for ResNet50.

    As `multigrid_basic_block`, with `4 * filters` output channels: level l
    carries `4 * C_l` channels (C_l the levels of `filters`) and is smoothed
    by a bottleneck unit, `ReLU(z + BN(1x1(ReLU(BN(3x3(ReLU(BN(1x1(z)))))))))`
    from `4 * C_l` to C_l and back, the three convolutions grouped in
    C_l / `group_size` groups (dense at the coarsest level). The restriction
    and prolongation group `4 * group_size` fine channels.

    Args:
        x: 4D channels-last Keras tensor with known channels.
        filters: the bottleneck width; the block outputs `4 * filters`
            channels. A multiple of `group_size` above `coarsest_channels`.
        strides, group_size, coarsest_channels, batch_norm_momentum, batch_norm_epsilon, name:
            as in `multigrid_basic_block`.
        zero_init_residual: as in `multigrid_basic_block`.

    Returns:
        The block's output tensor, `(batch, height / strides, width / strides,
        4 * filters)`.

    Raises:
        ValueError: as `multigrid_basic_block`.

    Example:

    >>> inputs = keras.Input((8, 8, 64))
    >>> outputs = keras_mgconv.models.multigrid_bottleneck_block(
    ...     inputs, 32, group_size=8, name="block")
    >>> tuple(outputs.shape)
    (None, 8, 8, 128)
    """
    return _multigrid_block(
        x,
        filters,
        strides,
        group_size,
        coarsest_channels,
        batch_norm_momentum,
        batch_norm_epsilon,
        4,
        name,
        zero_init_residual,
    )
