"""MultigridConv2D: a convolution whose weights grow linearly with the width."""

from keras_mgconv._keras import keras
from keras_mgconv.layers import _arguments
from keras_mgconv.layers._ops import ops
from keras_mgconv.layers.channel_transfer import ChannelProlongation, ChannelRestriction
from keras_mgconv.layers.grouped_conv import GroupedConv2D

# The largest 1 x 1 layer (input channels x filters) that trains through its
# cycle's dense matrix rather than through the cycle (see `MultigridConv2D.call`).
_DENSE_POINTWISE_MAX_WEIGHTS = 2**19


def level_widths(filters, group_size=16, coarsest_channels=None):
    """The channel widths of a multigrid hierarchy, finest first.

    Level 0 has `filters` channels and each level half of the previous one; the
    hierarchy stops at the first level of at most `coarsest_channels` channels.
    Every level above the coarsest is smoothed and restricted in groups of
    `group_size`, so it must be a multiple of `group_size`.

    Args:
        filters: the finest width.
        group_size: the channels per group, an even int.
        coarsest_channels: the widest allowed coarsest level; defaults to
            `group_size`.

    Returns:
        Tuple of ints, e.g. `(256, 128, 64, 32, 16)` for 256 filters and group
        size 16; `(filters,)` when `filters <= coarsest_channels`.

    Raises:
        ValueError: for non-positive arguments, an odd `group_size`, a
            `coarsest_channels` above `filters`, or a level above the coarsest
            that is not a multiple of `group_size`.
    """
    _arguments.positive_int("filters", filters)
    _arguments.group_size(group_size)
    if coarsest_channels is None:
        coarsest_channels = group_size
    _arguments.positive_int("coarsest_channels", coarsest_channels)
    if coarsest_channels > filters:
        raise ValueError(
            "The coarsest level cannot be wider than the layer: "
            f"`coarsest_channels` (default: `group_size`) must be at most "
            f"`filters`. Received: coarsest_channels={coarsest_channels}, "
            f"group_size={group_size}, filters={filters}."
        )
    widths = [filters]
    while widths[-1] > coarsest_channels:
        if widths[-1] % group_size:
            raise ValueError(
                f"Every level above the coarsest must be a multiple of "
                f"`group_size`, so that all its channels are coupled; the widths "
                f"{widths} stop at {widths[-1]}, which is not. Use `filters` "
                f"divisible by {group_size * 2 ** (len(widths) - 1)}, another "
                f"`group_size`, or `coarsest_channels` >= {widths[-1]}. "
                f"Received: filters={filters}, "
                f"group_size={group_size}, coarsest_channels={coarsest_channels}."
            )
        widths.append(widths[-1] // 2)
    return tuple(widths)


def _refuse_dilation_and_groups(kwargs):
    """Takes Conv2D's `dilation_rate` and `groups` out of `kwargs`: at 1 they change nothing.

    Other values are refused with what to do instead, where Keras would only
    call them unrecognized.
    """
    dilation_rate = kwargs.pop("dilation_rate", 1)
    if dilation_rate not in (1, (1, 1), [1, 1]):
        raise ValueError(
            "MultigridConv2D does not support dilated convolutions: its levels "
            "convolve with `kernel_size` undilated. Use keras.layers.Conv2D for a "
            f"dilated layer. Received: dilation_rate={dilation_rate!r}."
        )
    groups = kwargs.pop("groups", 1)
    if groups != 1:
        raise ValueError(
            "MultigridConv2D chooses its groups itself: pass `group_size` (channels "
            "per group of its grouped convolutions, default 16), not `groups`. "
            f"Received: groups={groups!r}."
        )


def connector_groups(input_channels, filters, group_size):
    """The groups of a connector from `input_channels` to `filters` channels.

    The most groups that divide both widths while giving each group at least
    `group_size` input channels (1, a full convolution, where `input_channels
    <= group_size`).
    """
    groups = max(1, input_channels // group_size)
    while input_channels % groups or filters % groups:
        groups -= 1
    return groups


def _copy(keras_object):
    """A new initializer, regularizer or constraint with `keras_object`'s config, or None.

    From the config rather than through Keras' serialization, which imports
    TensorFlow on every backend where it is installed.
    """
    return (
        None if keras_object is None else type(keras_object).from_config(keras_object.get_config())
    )


def _build_sublayer(layer, input_shape):
    """Builds `layer` with its weights named under its own name (see `ops.name_scope`)."""
    with ops.name_scope(layer.name):
        layer.build(input_shape)


@keras.saving.register_keras_serializable(package="keras_mgconv")
class MultigridConv2D(keras.layers.Layer):
    """Multigrid-in-channels 2D convolution, a drop-in for `Conv2D`.

    A `Conv2D` from C to C channels has `k*k*C*C` weights. This layer couples
    every output channel with every input channel too, but through a V-cycle
    over a hierarchy of channel widths (`levels`: C, C/2, ..., at most
    `coarsest_channels`), so its weights grow linearly with C (Eliasof et al.,
    "Multigrid-in-Channels Neural Network Architectures"):

    ```
    x_0     = connector(inputs)                 # only if width/stride/size change
    x_{l+1} = R_l(x_l)                          # ChannelRestriction, l = 0..L-1
    y_L     = S_L(x_L)                          # full k x k conv, coarsest level
    z_l     = x_l + P_l(y_{l+1} - x_{l+1})      # ChannelProlongation: correction
    y_l     = z_l + S_l(z_l)                    # grouped k x k smoothing, computed
                                                # as one conv with kernel S_l + I
    outputs = activation(y_0 + bias)
    ```

    `S_l` (l < L) is a grouped convolution with `group_size` channels per group;
    the connector, present when the input width differs from `filters`, when
    `strides > 1`, or when `padding="valid"` shrinks the image, is a k x k
    grouped convolution with the most groups G that divide both widths while
    giving each group at least `group_size` input channels (G = C_in /
    group_size where that divides `filters`; full where C_in <= group_size).
    A layer with `filters <= coarsest_channels` is a single full convolution.

    Weights (kernel size k = kh * kw, s = group_size, widths C_0..C_L = `levels`):

    ```
    sum_{l<L} (k * C_l * s  +  C_l * s)  +  k * C_L**2  +  connector  +  bias
    connector = k * C_in * filters / G   (G its groups),  bias = filters
    ```

    e.g. 79,104 kernel weights for C=256, k=3x3, s=16 against 589,824 for
    `Conv2D`; doubling C roughly doubles them.

    Args:
        filters: int, the output channels.
        kernel_size: int or pair of ints.
        strides: int or pair of ints.
        padding: `"valid"` or `"same"`, as in `Conv2D` (output sizes are the same).
        data_format: only `"channels_last"` is supported; `"channels_first"`
            raises at construction.
        activation: activation applied to the output, or None.
        use_bias: whether to add one bias per output channel.
        kernel_initializer, kernel_regularizer, kernel_constraint: applied to
            every k x k kernel (connector, smoothers, coarsest level).
        bias_initializer, bias_regularizer, bias_constraint: for the bias.
        group_size: even int, channels per group (default 16).
        coarsest_channels: int, the widest allowed coarsest level, where one full
            convolution couples all channels (default: `group_size`).
        implementation: `"auto"`, `"grouped"` or `"split"`, how grouped
            convolutions run; see `keras_mgconv.layers.grouped_conv.grouped_conv2d`.
        **kwargs: base layer arguments (`name`, `dtype`, `activity_regularizer`, ...).

    Input shape:
        4D tensor `(batch, height, width, channels)`.

    Output shape:
        4D tensor `(batch, new_height, new_width, filters)`, as `Conv2D`'s.

    Raises:
        ValueError: at construction, for non-positive `filters` or
            `group_size`, an odd `group_size`, `coarsest_channels > filters`,
            widths not halvable in multiples of `group_size` down to
            `coarsest_channels`, unknown `padding`, channels-first data, or
            strides and kernel sizes that are not positive; at build, for
            inputs smaller than a `padding="valid"` kernel.

    Example:

    >>> x = np.random.rand(2, 16, 16, 64).astype("float32")
    >>> layer = keras_mgconv.MultigridConv2D(64, 3, padding="same", group_size=16)
    >>> tuple(layer(x).shape), layer.levels
    ((2, 16, 16, 64), (64, 32, 16))
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        group_size=16,
        coarsest_channels=None,
        implementation="auto",
        **kwargs,
    ):
        _refuse_dilation_and_groups(kwargs)
        super().__init__(**kwargs)
        self.filters = _arguments.positive_int("filters", filters)
        self.kernel_size = _arguments.pair("kernel_size", kernel_size)
        self.strides = _arguments.pair("strides", strides)
        self.padding = _arguments.padding_mode(padding)
        self.data_format = _arguments.channels_last(data_format)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.group_size = _arguments.group_size(group_size)
        self.coarsest_channels = (
            None
            if coarsest_channels is None
            else _arguments.positive_int("coarsest_channels", coarsest_channels)
        )
        self._levels = level_widths(self.filters, self.group_size, self.coarsest_channels)
        self.implementation = _arguments.implementation_mode(implementation)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    @property
    def levels(self):
        """The channel widths of the hierarchy, finest first, e.g. (64, 32, 16)."""
        return self._levels

    @property
    def convolutions(self):
        """The V-cycle's convolution layers, after `build`: the connector (if
        any), restrictions, prolongations, smoothers and the coarsest level."""
        connector = [] if self.connector is None else [self.connector]
        return (*connector, *self.restrictions, *self.prolongations, *self.smoothers, self.coarsest)

    def get_prunable_weights(self):
        """The kernels of all `convolutions`, for tensorflow-model-optimization's pruning."""
        return [convolution.kernel for convolution in self.convolutions]

    def _conv(self, name, filters, groups, strides=(1, 1), padding="same", residual=False):
        return GroupedConv2D(
            filters,
            self.kernel_size,
            groups=groups,
            strides=strides,
            padding=padding,
            use_bias=False,
            kernel_initializer=_copy(self.kernel_initializer),
            kernel_regularizer=_copy(self.kernel_regularizer),
            kernel_constraint=_copy(self.kernel_constraint),
            implementation=self.implementation,
            residual=residual,
            dtype=self.dtype_policy,
            name=name,
        )

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        channels = _arguments.input_channels(self, input_shape)
        # An input smaller than a "valid" kernel fails here, not as an empty output.
        self.compute_output_shape(input_shape)
        coarsest_width = self._levels[-1]
        self.connector = None
        self.restrictions = []
        self.prolongations = []
        self.smoothers = []
        if len(self._levels) == 1:
            self.coarsest = self._conv("coarsest", coarsest_width, 1, self.strides, self.padding)
            _build_sublayer(self.coarsest, input_shape)
        else:
            changes_shape = (
                channels != self.filters
                or self.strides != (1, 1)
                or (self.padding == "valid" and self.kernel_size != (1, 1))
            )
            if changes_shape:
                self.connector = self._conv(
                    "connector",
                    self.filters,
                    connector_groups(channels, self.filters, self.group_size),
                    self.strides,
                    self.padding,
                )
                _build_sublayer(self.connector, input_shape)
            for level, width in enumerate(self._levels[:-1]):
                shape = (None, None, None, width)
                coarse_shape = (None, None, None, width // 2)
                restriction = ChannelRestriction(
                    self.group_size,
                    implementation=self.implementation,
                    dtype=self.dtype_policy,
                    name=f"restriction_{level}",
                )
                prolongation = ChannelProlongation(
                    self.group_size,
                    implementation=self.implementation,
                    dtype=self.dtype_policy,
                    name=f"prolongation_{level}",
                )
                smoother = self._conv(
                    f"smoother_{level}", width, width // self.group_size, residual=True
                )
                _build_sublayer(restriction, shape)
                _build_sublayer(prolongation, coarse_shape)
                _build_sublayer(smoother, shape)
                self.restrictions.append(restriction)
                self.prolongations.append(prolongation)
                self.smoothers.append(smoother)
            self.coarsest = self._conv("coarsest", coarsest_width, 1)
            _build_sublayer(self.coarsest, (None, None, None, coarsest_width))
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.filters,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        # Measured on a 2-core x86 CPU (benchmarks/train_speed.py): the dense
        # matrix trains 1.3-4x faster than the cycle up to 512 x 512 channels,
        # 1.2x slower at 1024 x 1024.
        self._dense_pointwise_training = (
            self.kernel_size == (1, 1)
            and bool(self.restrictions)
            and channels * self.filters <= _DENSE_POINTWISE_MAX_WEIGHTS
        )
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: channels})
        self.built = True

    def _v_cycle(self, inputs, training=None):
        fine = [inputs if self.connector is None else self.connector(inputs)]
        for restriction in self.restrictions:
            fine.append(restriction(fine[-1]))
        if not self.smoothers:
            return self.coarsest(fine[-1])
        # The correction y_L - x_L, as one convolution with kernel S_L - I: a
        # subtraction fewer, forward and backward, and in exported graphs.
        correction = self.coarsest.convolve(fine[-1], training, identity=-1.0)
        for level in reversed(range(len(self.smoothers))):
            outputs = self.smoothers[level](fine[level] + self.prolongations[level](correction))
            if level:
                correction = outputs - fine[level]
        return outputs

    def _pointwise_kernel(self, input_channels):
        """The 1 x 1 kernel of the whole cycle of a 1 x 1 layer, `(1, 1, C_in, filters)`.

        With 1 x 1 kernels every step of the cycle maps each pixel on its own and
        linearly, so the cycle is one matrix: its rows are the cycle applied to
        the unit vectors, here a batch of one-pixel images.
        """
        unit_vectors = ops.reshape(
            ops.eye(input_channels, dtype=self.compute_dtype),
            (input_channels, 1, 1, input_channels),
        )
        return ops.reshape(self._v_cycle(unit_vectors), (1, 1, input_channels, self.filters))

    def call(self, inputs, training=None):
        if training and self._dense_pointwise_training:
            # Training a 1 x 1 layer through the cycle makes a dozen memory-bound
            # passes over the activations, forward and backward; one dense
            # convolution with the cycle's matrix computes the same outputs
            # faster. Inference keeps the cycle, so that exported models keep
            # the small grouped kernels.
            outputs = ops.conv(
                inputs, self._pointwise_kernel(inputs.shape[-1]), self.strides, self.padding
            )
        else:
            outputs = self._v_cycle(inputs, training)
        if self.bias is not None:
            outputs = ops.bias_add(outputs, ops.cast(self.bias, self.compute_dtype))
        return self.activation(outputs)

    def compute_output_shape(self, input_shape):
        return _arguments.conv_output_shape(
            self, input_shape, self.filters, self.kernel_size, self.strides, self.padding
        )

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "data_format": self.data_format,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": serialize(self.kernel_initializer),
            "bias_initializer": serialize(self.bias_initializer),
            "kernel_regularizer": serialize(self.kernel_regularizer),
            "bias_regularizer": serialize(self.bias_regularizer),
            "kernel_constraint": serialize(self.kernel_constraint),
            "bias_constraint": serialize(self.bias_constraint),
            "group_size": self.group_size,
            "coarsest_channels": self.coarsest_channels,
            "implementation": self.implementation,
        }
