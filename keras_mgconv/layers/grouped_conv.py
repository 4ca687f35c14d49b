"""Grouped 2D convolution that trains fast on every backend, and the layer built on it.

Keras 3's `Conv2D(groups>1)` on the TensorFlow backend runs inside an XLA
function, which on CPU makes a training step 20-45x slower than calling
`tf.nn.conv2d` with a grouped kernel directly (DESIGN.md, section 3): the
convolutions here come from `_ops`, which on TensorFlow makes that direct call
and on JAX and PyTorch calls `keras.ops.conv`. The direct call has a catch:
TensorFlow computes its gradients on CPU only through oneDNN, which
`_tensorflow_ops` reaches also where TensorFlow left it off, but not in every
dtype or build. `grouped_conv2d` therefore can also split the channels into
groups, convolve each with an ordinary convolution and concatenate: slower,
but it trains everywhere and computes exactly the same function with the same
kernel.
"""

import contextlib
import contextvars
import functools

import numpy as np

from keras_mgconv._keras import keras
from keras_mgconv.layers import _arguments
from keras_mgconv.layers._ops import ops

grouped_gradient_supported = ops.grouped_gradient_supported

# Set by `traced_implementation` while a graph is traced for export.
_TRACED_IMPLEMENTATION = contextvars.ContextVar("traced_implementation", default=None)
_TRACED_MIN_GROUP_FILTERS = contextvars.ContextVar("traced_min_group_filters", default=1)


@contextlib.contextmanager
def traced_implementation(implementation, min_group_filters=1):
    """Within this context, "auto" layers compute grouped convolutions `implementation`'s way.

    For tracing a graph that is converted, not run by TensorFlow: a TFLite
    converter only needs the forward graph, which every runtime supports as
    one grouped CONV_2D, also where TensorFlow could not train it. Layers set
    to "grouped" or "split" explicitly keep their setting.

    Args:
        implementation: `"grouped"` or `"split"`.
        min_group_filters: every traced grouped convolution has its groups
            merged until each has at least this many filters (`merge_groups`):
            the same function, in fewer, wider groups.
    """
    _arguments.implementation_mode(implementation)
    _arguments.positive_int("min_group_filters", min_group_filters)
    tokens = (
        _TRACED_IMPLEMENTATION.set(implementation),
        _TRACED_MIN_GROUP_FILTERS.set(min_group_filters),
    )
    try:
        yield
    finally:
        _TRACED_IMPLEMENTATION.reset(tokens[0])
        _TRACED_MIN_GROUP_FILTERS.reset(tokens[1])


def resolve_implementation(implementation, dtype):
    """What `grouped_conv2d` runs for `implementation` on inputs of `dtype`.

    "grouped" or "split" as given; "auto" becomes the implementation of an
    enclosing `traced_implementation` context if there is one, else the
    backend's fastest that trains in `dtype` here: "split" under JAX on CPU,
    whose XLA trains grouped convolutions slowly there; "grouped" under
    PyTorch, JAX elsewhere, and TensorFlow where it can differentiate one
    (through oneDNN on CPU, in float32 and where the CPU has it float16); else
    "split", with a one-time `RuntimeWarning` that says why and what it costs.
    """
    if implementation != "auto":
        return implementation
    return _TRACED_IMPLEMENTATION.get() or ops.auto_implementation(dtype)


def grouped_conv2d(
    inputs, kernel, groups, strides=(1, 1), padding="same", implementation="auto", training=None
):
    """Grouped 2D convolution of channels-last `inputs`.

    Input channel group `g` (channels `g*C_in/G .. (g+1)*C_in/G - 1`) is
    convolved with kernel slice `kernel[..., g*C_out/G:(g+1)*C_out/G]` and gives
    output channels `g*C_out/G .. (g+1)*C_out/G - 1`, the layout of
    `keras.layers.Conv2D(groups=G)` and of TFLite's grouped CONV_2D.

    Args:
        inputs: tensor of shape `(batch, height, width, C_in)`.
        kernel: tensor of shape `(kh, kw, C_in // groups, C_out)`.
        groups: number of groups G; `C_in` and `C_out` must be multiples of it.
        strides: pair of ints.
        padding: `"same"` or `"valid"`.
        implementation: `"grouped"` (one grouped convolution), `"split"`
            (per-group convolutions and a concatenation) or `"auto"`: see
            `resolve_implementation`.
        training: whether the call trains (a layer's `training` argument);
            TensorFlow without oneDNN may then compute differently, the same
            function faster (`_tensorflow_ops.trainable_conv`).

    Returns:
        Tensor of shape `(batch, out_height, out_width, C_out)`.
    """
    _arguments.implementation_mode(implementation)
    if _TRACED_IMPLEMENTATION.get():
        convolve = ops.conv  # Traced for a converter: not trained here.
        kernel, groups = merge_groups(kernel, groups, _TRACED_MIN_GROUP_FILTERS.get())
    else:
        convolve = functools.partial(ops.trainable_conv, training=training)
    if groups == 1 or resolve_implementation(implementation, inputs.dtype) == "grouped":
        return convolve(inputs, kernel, strides, padding)
    if ops.SPLIT_POINTWISE_AS_ONE_PRODUCT and tuple(kernel.shape[:2]) == (1, 1):
        return _grouped_pointwise(inputs, kernel, groups, strides)
    return ops.concatenate(
        [
            convolve(group_inputs, group_kernel, strides, padding)
            for group_inputs, group_kernel in zip(
                ops.split(inputs, groups), ops.split(kernel, groups)
            )
        ]
    )


def merge_groups(kernel, groups, min_group_filters):
    """The same grouped convolution in fewer groups, each with at least `min_group_filters` filters.

    Merging `m` neighbouring groups makes one group whose kernel is block
    diagonal: each original group's filters read its own input channels, with
    zeros for the others. The convolution computes the same outputs (the
    zeros add nothing) with `m` times the multiply-adds, and runs faster
    where the runtime's kernels cost as much for a narrow group as for a
    wide one: XNNPACK's int8 kernels on x86, whose time per group stays about
    the same up to 16 filters (AVX-512) or 32 and more (AMX), see
    benchmarks/grouped_kernels.py.

    Args:
        kernel: tensor of shape `(kh, kw, C_in // groups, C_out)`.
        groups: its number of groups.
        min_group_filters: the fewest filters (`C_out / groups`) a merged group
            may have; the smallest merge that reaches it is taken, all groups
            (a full convolution) where none does.

    Returns:
        `(kernel, groups)`: the merged kernel, of shape
        `(kh, kw, m * C_in // groups, C_out)`, and `groups // m`.
    """
    kh, kw, group_inputs, filters = kernel.shape
    group_filters = filters // groups
    merged = next(
        (
            m
            for m in range(1, groups + 1)
            if groups % m == 0 and m * group_filters >= min_group_filters
        ),
        groups,
    )
    if merged == 1:
        return kernel, groups
    # Axes (kh, kw, q, input, merged group, p, filter): the inputs of original
    # group q within a merged group feed only the filters of group p = q.
    blocks = ops.reshape(kernel, (kh, kw, 1, group_inputs, groups // merged, merged, group_filters))
    diagonal = blocks * ops.reshape(
        ops.eye(merged, dtype=kernel.dtype), (1, 1, merged, 1, 1, merged, 1)
    )
    return ops.reshape(diagonal, (kh, kw, merged * group_inputs, filters)), groups // merged


def _grouped_pointwise(inputs, kernel, groups, strides):
    """A grouped 1 x 1 convolution as one product batched over the groups: the same function.

    Per group, a 1 x 1 convolution multiplies every pixel's channels by a
    matrix; all groups at once are one `einsum`, where the split path makes
    a slice, a convolution and a piece of the concatenation for each group
    (see `_keras_ops.SPLIT_POINTWISE_AS_ONE_PRODUCT`). A 1 x 1 kernel reads one
    pixel a stride, which "same" and "valid" padding choose alike.
    """
    if tuple(strides) != (1, 1):
        inputs = inputs[:, :: strides[0], :: strides[1], :]
    _, height, width, channels = ops.shape(inputs)
    filters = kernel.shape[-1]
    products = ops.einsum(
        "...gi,igo->...go",
        ops.reshape(inputs, (-1, height, width, groups, channels // groups)),
        ops.reshape(kernel, (channels // groups, groups, filters // groups)),
    )
    return ops.reshape(products, (-1, height, width, filters))


def identity_kernel(kernel_shape):
    """The grouped kernel whose convolution ("same" padding) returns its input.

    Ones at the tap that "same" padding aligns with the output pixel
    (`(k - 1) // 2`, also for even k), from each channel to itself.
    """
    kh, kw, group_channels, channels = kernel_shape
    kernel = np.zeros(tuple(kernel_shape), "float32")
    output_channels = np.arange(channels)
    kernel[(kh - 1) // 2, (kw - 1) // 2, output_channels % group_channels, output_channels] = 1.0
    return kernel


class GroupedConvBase(keras.layers.Layer):
    """A layer holding one grouped convolution kernel and an optional bias.

    Subclasses say how many output channels and groups an input width gets
    (`_output_channels`, `_groups`, validating there) and what their config is.
    """

    def __init__(
        self,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        implementation="auto",
        residual=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.kernel_size = _arguments.pair("kernel_size", kernel_size)
        self.strides = _arguments.pair("strides", strides)
        self.padding = _arguments.padding_mode(padding)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.implementation = _arguments.implementation_mode(implementation)
        self.residual = bool(residual)
        if self.residual and (self.strides != (1, 1) or self.padding != "same"):
            raise ValueError(
                "A residual convolution keeps the image size: it needs "
                "strides=1 and padding='same'. Received: residual=True, "
                f"strides={self.strides}, padding={self.padding!r}."
            )
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def _output_channels(self, input_channels):
        raise NotImplementedError

    def _groups(self, input_channels):
        raise NotImplementedError

    def build(self, input_shape):
        channels = _arguments.input_channels(self, input_shape)
        # An input smaller than a "valid" kernel fails here, not as an empty output.
        self.compute_output_shape(input_shape)
        filters = self._output_channels(channels)
        self.groups = self._groups(channels)
        if self.residual and filters != channels:
            raise ValueError(
                f"Layer {self.name!r}: a residual convolution needs as many "
                f"output as input channels. Received: input channels="
                f"{channels}, output channels={filters}."
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(*self.kernel_size, channels // self.groups, filters),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(filters,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: channels})
        self.built = True

    def call(self, inputs, training=None):
        outputs = self.convolve(inputs, training, identity=1.0 if self.residual else 0.0)
        if self.bias is not None:
            outputs = ops.bias_add(outputs, ops.cast(self.bias, self.compute_dtype))
        return outputs

    def convolve(self, inputs, training=None, identity=0.0):
        """`inputs` convolved with the kernel plus `identity` times the identity, no bias.

        That is `conv(inputs) + identity * inputs` in one convolution: a pass
        over the activations fewer, forward and backward. `identity` needs as
        many output as input channels, strides 1 and "same" padding.
        """
        kernel = ops.cast(self.kernel, self.compute_dtype)
        if identity:
            # Not `+=`: under tf_keras the cast of a float32 variable to
            # float32 is the variable itself.
            kernel = kernel + ops.cast(
                identity * identity_kernel(self.kernel.shape), self.compute_dtype
            )
        return grouped_conv2d(
            inputs, kernel, self.groups, self.strides, self.padding, self.implementation, training
        )

    def compute_output_shape(self, input_shape):
        return _arguments.conv_output_shape(
            self,
            input_shape,
            self._output_channels(input_shape[-1]),
            self.kernel_size,
            self.strides,
            self.padding,
        )

    def get_prunable_weights(self):
        """The kernel: what tensorflow-model-optimization's pruning may zero.

        The residual identity is added in `call`, not stored, so a pruned
        residual convolution passes its input through.
        """
        return [self.kernel]

    def _weights_config(self):
        """The initializer/regularizer/constraint part of `get_config`."""
        serialize = keras.saving.serialize_keras_object
        return {
            "kernel_initializer": serialize(self.kernel_initializer),
            "kernel_regularizer": serialize(self.kernel_regularizer),
            "kernel_constraint": serialize(self.kernel_constraint),
        }


@keras.saving.register_keras_serializable(package="keras_mgconv")
class GroupedConv2D(GroupedConvBase):
    """2D convolution with channel groups, fast to train on CPU.

    Computes the same function as `keras.layers.Conv2D(filters, kernel_size,
    groups=groups)` with the same kernel shape, `(kh, kw, C_in // groups,
    filters)`, but through `grouped_conv2d` rather than Keras' XLA-wrapped
    grouped convolution, which trains 20-45x slower on CPU. Weights: the kernel
    has `kh * kw * C_in * filters / groups` entries, `groups` times fewer than a
    full convolution's.

    Args:
        filters: int, the number of output channels; a multiple of `groups`.
        kernel_size: int or pair of ints.
        groups: int, the number of channel groups; must divide the input
            channels and `filters`. 1 is an ordinary convolution.
        strides: int or pair of ints.
        padding: `"valid"` or `"same"` (case-insensitive).
        data_format: only `"channels_last"` (or None with Keras' image data
            format set to it) is supported.
        activation: activation applied to the output, or None.
        use_bias: whether to add a bias.
        kernel_initializer, bias_initializer: as in `Conv2D`.
        kernel_regularizer, bias_regularizer, kernel_constraint, bias_constraint: as in `Conv2D`.
        implementation: `"auto"` (default), `"grouped"` or `"split"`; see
            `grouped_conv2d`. All three compute the same outputs.
        residual: if True, returns `activation(inputs + conv(inputs) + bias)`,
            computed as one convolution whose kernel has the identity added
            (no separate addition over the activations). Needs `filters` equal
            to the input channels, strides 1 and `padding="same"`.
        **kwargs: base layer arguments (`name`, `dtype`, `activity_regularizer`, ...).

    Input shape:
        4D tensor `(batch, height, width, channels)`.

    Output shape:
        4D tensor `(batch, new_height, new_width, filters)`.

    Raises:
        ValueError: for non-positive `filters` or `groups`, `filters` not a
            multiple of `groups`, bad `padding` or `data_format`, `residual`
            with strides or "valid" padding, or (at build time) input channels
            not a multiple of `groups` or, with `residual`, not equal to `filters`.

    Example:

    >>> x = np.ones((2, 8, 8, 32), "float32")
    >>> y = keras_mgconv.GroupedConv2D(64, 3, groups=4, padding="same")(x)
    >>> tuple(y.shape)
    (2, 8, 8, 64)
    """

    def __init__(
        self,
        filters,
        kernel_size,
        groups=1,
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
        implementation="auto",
        residual=False,
        **kwargs,
    ):
        super().__init__(
            kernel_size,
            strides,
            padding,
            use_bias,
            kernel_initializer,
            bias_initializer,
            kernel_regularizer,
            bias_regularizer,
            kernel_constraint,
            bias_constraint,
            implementation,
            residual,
            **kwargs,
        )
        self.filters = _arguments.positive_int("filters", filters)
        self.groups = _arguments.positive_int("groups", groups)
        if filters % groups:
            raise ValueError(
                "The number of filters must be a multiple of the number of "
                f"groups. Received: filters={filters}, groups={groups}."
            )
        self.data_format = _arguments.channels_last(data_format)
        self.activation = keras.activations.get(activation)

    def _output_channels(self, input_channels):
        return self.filters

    def _groups(self, input_channels):
        if input_channels % self.groups:
            raise ValueError(
                f"Layer {self.name!r}: the input channels must be a multiple of "
                f"`groups`. Received: input channels={input_channels}, "
                f"groups={self.groups}."
            )
        return self.groups

    def call(self, inputs, training=None):
        return self.activation(super().call(inputs, training))

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "groups": self.groups,
            "strides": self.strides,
            "padding": self.padding,
            "data_format": self.data_format,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "bias_initializer": serialize(self.bias_initializer),
            "bias_regularizer": serialize(self.bias_regularizer),
            "bias_constraint": serialize(self.bias_constraint),
            "implementation": self.implementation,
            "residual": self.residual,
            **self._weights_config(),
        }
