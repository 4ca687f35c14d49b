"""Channel transfer operators between levels of the channel hierarchy.

Restriction halves the channels, prolongation doubles them. Both are learned
1x1 grouped convolutions whose groups have `group_size` channels on the fine
side, so their weights grow linearly with the width (`C * group_size / 2` each).
"""

from keras_mgconv._keras import keras
from keras_mgconv.layers import _arguments
from keras_mgconv.layers.grouped_conv import GroupedConvBase


class _ChannelTransfer(GroupedConvBase):
    """A bias-free 1x1 grouped convolution initialised to group averaging.

    The default initializer sets every weight to 1 / (inputs per group), so at
    initialisation each output channel is the mean of its group's inputs.
    """

    def __init__(
        self,
        group_size=16,
        kernel_initializer=None,
        kernel_regularizer=None,
        kernel_constraint=None,
        implementation="auto",
        **kwargs,
    ):
        self.group_size = _arguments.group_size(group_size)
        self._default_initializer = kernel_initializer is None
        super().__init__(
            kernel_size=1,
            use_bias=False,
            kernel_initializer=kernel_initializer or "zeros",
            kernel_regularizer=kernel_regularizer,
            kernel_constraint=kernel_constraint,
            implementation=implementation,
            **kwargs,
        )

    def build(self, input_shape):
        if self._default_initializer:
            channels = _arguments.input_channels(self, input_shape)
            inputs_per_group = channels // self._groups(channels)
            self.kernel_initializer = keras.initializers.Constant(1.0 / inputs_per_group)
        super().build(input_shape)

    def get_config(self):
        config = {
            **super().get_config(),
            "group_size": self.group_size,
            "implementation": self.implementation,
            **self._weights_config(),
        }
        if self._default_initializer:
            config["kernel_initializer"] = None
        return config


@keras.saving.register_keras_serializable(package="keras_mgconv")
class ChannelRestriction(_ChannelTransfer):
    """Restricts C channels to C/2: the fine-to-coarse channel transfer.

    A learned 1x1 grouped convolution without bias, with `C / group_size` groups:
    each group maps `group_size` fine channels to `group_size / 2` coarse ones.
    It is initialised to the group average (every weight `1 / group_size`), so
    at initialisation every coarse channel of a group is the mean of the group's
    fine channels. Weights: `C * group_size / 2`.

    Args:
        group_size: even int, the fine channels per group (default 16).
        kernel_initializer: None (group average) or any Keras initializer.
        kernel_regularizer, kernel_constraint: as in `Conv2D`.
        implementation: `"auto"`, `"grouped"` or `"split"`; see
            `keras_mgconv.layers.grouped_conv.grouped_conv2d`.
        **kwargs: base layer arguments.

    Input shape:
        4D tensor `(batch, height, width, C)`, C a multiple of `group_size`.

    Output shape:
        4D tensor `(batch, height, width, C // 2)`.

    Raises:
        ValueError: `group_size` not a positive even int, or (at build time) C
            not a multiple of `group_size`.

    Example:

    >>> x = np.ones((1, 4, 4, 32), "float32")
    >>> tuple(keras_mgconv.ChannelRestriction(group_size=8)(x).shape)
    (1, 4, 4, 16)
    """

    def _output_channels(self, input_channels):
        return input_channels // 2

    def _groups(self, input_channels):
        if input_channels % self.group_size:
            raise ValueError(
                f"Layer {self.name!r}: the input channels of a restriction must "
                f"be a multiple of `group_size`. Received: input channels="
                f"{input_channels}, group_size={self.group_size}."
            )
        return input_channels // self.group_size


@keras.saving.register_keras_serializable(package="keras_mgconv")
class ChannelProlongation(_ChannelTransfer):
    """Prolongates C/2 channels to C: the coarse-to-fine channel transfer.

    The transpose structure of `ChannelRestriction`: a learned 1x1 grouped
    convolution without bias, with `C / group_size` groups, each mapping
    `group_size / 2` coarse channels to `group_size` fine ones. It is
    initialised to the average of the group's coarse channels (every weight
    `2 / group_size`), so a group of equal coarse channels is broadcast
    unchanged to its fine channels, and prolongation after restriction is, at
    initialisation, the projection onto group means. Weights: `C * group_size / 2`.

    Args:
        group_size: even int, the *fine* channels per group (default 16).
        kernel_initializer: None (group average) or any Keras initializer.
        kernel_regularizer, kernel_constraint: as in `Conv2D`.
        implementation: `"auto"`, `"grouped"` or `"split"`.
        **kwargs: base layer arguments.

    Input shape:
        4D tensor `(batch, height, width, C // 2)`, a multiple of `group_size / 2`.

    Output shape:
        4D tensor `(batch, height, width, C)`.

    Raises:
        ValueError: `group_size` not a positive even int, or (at build time)
            input channels not a multiple of `group_size / 2`.

    Example:

    >>> x = np.ones((1, 4, 4, 16), "float32")
    >>> tuple(keras_mgconv.ChannelProlongation(group_size=8)(x).shape)
    (1, 4, 4, 32)
    """

    def _output_channels(self, input_channels):
        return input_channels * 2

    def _groups(self, input_channels):
        if input_channels % (self.group_size // 2):
            raise ValueError(
                f"Layer {self.name!r}: the input channels of a prolongation must "
                f"be a multiple of `group_size / 2`. Received: input channels="
                f"{input_channels}, group_size={self.group_size}."
            )
        return 2 * input_channels // self.group_size
