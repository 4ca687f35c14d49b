"""The layers' tensor operations on TensorFlow: Keras 3's TensorFlow backend and tf_keras.

Grouped convolutions call `tf.nn.conv2d` with a grouped kernel, not Keras 3's
`Conv2D(groups>1)` or `keras.ops.conv`, which on the TensorFlow backend run
inside an XLA function and train 20-45x slower on CPU (DESIGN.md, section 3).

TensorFlow differentiates a grouped `tf.nn.conv2d` on CPU only through oneDNN:
with oneDNN off (`TF_ENABLE_ONEDNN_OPTS=0`, or an AVX2-only CPU where
TensorFlow was imported before keras_mgconv could turn it on) it raises
"Gradients for grouped convolutions are not supported on CPU". TensorFlow's
x86 builds register their oneDNN convolution kernels all the same and only
leave the graph rewrite that uses them off: there `trainable_conv` calls them
directly (`_conv_with_onednn_gradient`), which trains a 256-channel
MultigridConv2D as fast as with oneDNN on. Where neither works (float16 on
most CPUs, builds without oneDNN kernels) `auto_implementation` chooses the
per-group ("split") path.
"""

import functools
import warnings

import numpy as np
import tensorflow as tf

# Private TensorFlow modules, for calling its oneDNN kernels by name (no public
# API reaches them while oneDNN is off); `onednn_kernels_work` checks the
# calls once against TensorFlow's public ops, and the package falls back to
# the per-group path where they fail.
from tensorflow.core.framework import attr_value_pb2
from tensorflow.python.framework import op_def_library
from tensorflow.python.ops import control_flow_util

from keras_mgconv import _tensorflow_logs

_STRIDES = [1, 1, 1, 1]

# The "split" path keeps per-group convolutions for 1 x 1 kernels too: a
# reshape and einsum trained slower here (DESIGN.md, section 3), and TFLite's
# split lowering is SPLIT, per-group CONV_2Ds and CONCATENATION.
SPLIT_POINTWISE_AS_ONE_PRODUCT = False


def grouped_gradient_supported(dtype=tf.float32):
    """Whether grouped `tf.nn.conv2d` trains on this machine, as one convolution.

    True where TensorFlow differentiates it itself (oneDNN on, or a GPU) or
    where `trainable_conv` can, through TensorFlow's oneDNN kernels called
    directly (x86 builds with oneDNN off). Probes a tiny grouped
    convolution once per dtype, eagerly (also when called while a `tf.function`
    is being traced), and caches the answer for the process.

    Args:
        dtype: the compute dtype to probe, a `tf.DType` or its name.

    Returns:
        True when a grouped convolution in `dtype` has a gradient here.
    """
    return _gradient_source(tf.as_dtype(dtype)) is not None


# What TensorFlow logs when a probe finds no gradient: the answer, not news.
_PROBE_FAILURES = _tensorflow_logs.records_saying(
    "Gradients for grouped convolutions are not supported",
    "Local rendezvous is aborting",
    "OP_REQUIRES failed at mkl_conv",
    "oneDNN supports DT_",
)


@functools.lru_cache(maxsize=None)
def _gradient_source(dtype):
    """ "tensorflow", "onednn" or None: what differentiates a grouped convolution in `dtype`."""
    with _tensorflow_logs.hidden(_PROBE_FAILURES):
        return _probe_gradient_source(dtype)


def _probe_gradient_source(dtype):
    # init_scope runs the probe eagerly even while a tf.function is traced, but
    # it also pauses gradient tapes: call the two backprop kernels directly.
    with tf.init_scope():
        inputs, kernel = tf.ones((1, 4, 4, 4), dtype), tf.ones((3, 3, 2, 4), dtype)
        try:
            tf.raw_ops.Conv2DBackpropInput(
                input_sizes=inputs.shape,
                filter=kernel,
                out_backprop=inputs,
                strides=_STRIDES,
                padding="SAME",
            )
            tf.raw_ops.Conv2DBackpropFilter(
                input=inputs,
                filter_sizes=kernel.shape,
                out_backprop=inputs,
                strides=_STRIDES,
                padding="SAME",
            )
            return "tensorflow"
        except (
            tf.errors.InvalidArgumentError,
            tf.errors.UnimplementedError,
            tf.errors.NotFoundError,
        ):
            pass
    return "onednn" if onednn_kernels_work(dtype) else None


@functools.lru_cache(maxsize=None)
def onednn_kernels_work(dtype=tf.float32):
    """Whether TensorFlow's oneDNN kernels, called directly, give grouped convolution gradients.

    Checked once per dtype on a tiny convolution against each group's
    gradients from TensorFlow's ungrouped kernels, which every build has.
    """
    dtype = tf.as_dtype(dtype)
    with tf.init_scope():
        rng = np.random.default_rng(0)
        inputs, kernel = (
            tf.constant(rng.standard_normal(shape), dtype) for shape in ((1, 5, 5, 4), (3, 3, 2, 4))
        )
        try:
            gradients = _onednn_conv_backprop(inputs, kernel, inputs, _STRIDES, "SAME")
        except Exception:  # noqa: BLE001 (private API: whatever a build without it raises)
            return False
        expected = [
            tf.concat(
                [
                    backprop(
                        **{argument: value},
                        out_backprop=group_backprop,
                        strides=_STRIDES,
                        padding="SAME",
                    )
                    for group_backprop, value in zip(
                        tf.split(inputs, 2, axis=-1), tf.split(values, 2, axis=-1)
                    )
                ],
                axis=-1,
            )
            for backprop, argument, values in (
                (
                    functools.partial(tf.raw_ops.Conv2DBackpropInput, input_sizes=(1, 5, 5, 2)),
                    "filter",
                    kernel,
                ),
                (
                    functools.partial(tf.raw_ops.Conv2DBackpropFilter, filter_sizes=(3, 3, 2, 2)),
                    "input",
                    inputs,
                ),
            )
        ]
    tolerance = 1e-2 if dtype.size < 4 else 1e-4
    return all(
        np.allclose(got, want, rtol=tolerance, atol=tolerance)
        for got, want in zip(gradients, expected)
    )


# TensorFlow runs its oneDNN kernels only for graph nodes that carry this
# kernel label, which its oneDNN rewrite pass sets when oneDNN is on.
_ONEDNN_LABEL = {"_kernel": attr_value_pb2.AttrValue(s=b"MklNameChangeOp")}


def _onednn_op(op_type, name, **arguments):
    """One output of TensorFlow's oneDNN convolution kernel `op_type`, added to the graph."""
    with tf.compat.v1.get_default_graph()._attr_scope(_ONEDNN_LABEL):
        *_, outputs = op_def_library._apply_op_helper(
            op_type,
            name=name,
            use_cudnn_on_gpu=False,
            explicit_paddings=[],
            data_format="NHWC",
            dilations=[1, 1, 1, 1],
            **arguments,
        )
    return outputs[0]


def _graph_function(python_function):
    """`python_function(*tensors, strides, padding)` as a graph: per input shape, or for any.

    Two `tf.function`s of it (without autograph), for its two kinds of callers:

    - while a graph is traced (`fit`'s training step, other `tf.function`s,
      SavedModel export), a plain one, traced once per input shape as before:
      each trace keeps its inputs' static shapes, which the traced step's later
      layers see in its outputs (a trace for unknown shapes would hide them);
    - eagerly, one traced once per dtype, rank, strides and padding for inputs
      of any shape, whose concrete function every eager call runs. Called
      eagerly as a `tf.function`, it traced anew for every input shape, and
      TensorFlow warns from the fifth trace in ten calls ("5 out of the last 5
      calls to <function _onednn_conv> triggered tf.function retracing"): a
      layer called eagerly at 5 image sizes, or one MultigridConv2D call (its
      levels are convolutions of 5 shapes); `reduce_retracing=True` still
      traced 5 times for a MultigridConv2D's first call. Eager results keep
      their actual shapes all the same, and a concrete function's call skips
      the `tf.function`'s dispatch.

    TensorFlow counts retracing (and warns) only for eager calls, so the graph
    callers' per-shape traces never warned and are kept as they were.
    """
    in_graphs = tf.function(python_function, autograph=False)
    eagerly = tf.function(python_function, autograph=False)

    @functools.lru_cache(maxsize=None)
    def for_any_shape(tensor_types, strides, padding):
        specs = [tf.TensorSpec([None] * rank, dtype) for dtype, rank in tensor_types]
        return eagerly.get_concrete_function(*specs, list(strides), padding)

    @functools.wraps(python_function)
    def call(*arguments):
        *tensors, strides, padding = arguments
        if not tf.executing_eagerly():
            return in_graphs(*tensors, strides, padding)
        tensors = [tf.convert_to_tensor(tensor) for tensor in tensors]
        function = for_any_shape(
            tuple((tensor.dtype, tensor.shape.rank) for tensor in tensors), tuple(strides), padding
        )
        return function(*tensors, list(strides), padding)

    return call


@_graph_function
def _onednn_conv(inputs, kernel, strides, padding):
    """`tf.nn.conv2d(inputs, kernel, strides, padding)` by TensorFlow's oneDNN kernel.

    A `tf.function`, because kernel labels exist only in graphs.
    """
    return _onednn_op(
        "_MklNativeConv2D",
        "convolution",
        input=inputs,
        filter=kernel,
        strides=strides,
        padding=padding,
        is_filter_const=False,
    )


@_graph_function
def _onednn_conv_backprop(inputs, kernel, out_backprop, strides, padding):
    """The gradients of `tf.nn.conv2d(inputs, kernel, strides, padding)` for `out_backprop`.

    Computed by TensorFlow's oneDNN kernels, which differentiate grouped
    convolutions also when oneDNN is off.

    Returns:
        `(input_gradient, kernel_gradient)`.
    """
    input_gradient = _onednn_op(
        "_MklNativeConv2DBackpropInput",
        "input_gradient",
        input_sizes=tf.shape(inputs),
        filter=kernel,
        out_backprop=out_backprop,
        strides=strides,
        padding=padding,
    )
    kernel_gradient = _onednn_op(
        "_MklNativeConv2DBackpropFilter",
        "kernel_gradient",
        input=inputs,
        filter_sizes=tf.shape(kernel),
        out_backprop=out_backprop,
        strides=strides,
        padding=padding,
    )
    return input_gradient, kernel_gradient


def _conv_with_onednn_gradient(inputs, kernel, strides, padding, training):
    """`conv`, differentiated by `_onednn_conv_backprop`.

    In training the forward convolution is oneDNN's as well. Elsewhere it is
    made of TensorFlow's own ops, which every converter and runtime knows: per
    group, because without oneDNN TensorFlow's grouped forward convolution is
    1.7x slower than `groups` ordinary ones (a 256-channel, 16-group 3x3 layer
    on 64 32x32 images: 114 against 66 ms), and grappler fuses it with a
    following `BiasAdd` into a kernel that rejects groups.
    """
    groups = inputs.shape[-1] // kernel.shape[-2]
    onednn_strides = [1, *strides, 1]

    @tf.custom_gradient
    def convolve(inputs, kernel):
        if training:
            # Unwatched inputs: an eager tape would otherwise ask the function
            # call for a gradient of its own, which oneDNN's op lacks.
            outputs = _onednn_conv(
                tf.stop_gradient(inputs), tf.stop_gradient(kernel), onednn_strides, padding
            )
        else:
            outputs = concatenate(
                [
                    tf.nn.conv2d(group_inputs, group_kernel, strides, padding)
                    for group_inputs, group_kernel in zip(
                        split(inputs, groups), split(kernel, groups)
                    )
                ]
            )

        def gradient(out_backprop):
            return _onednn_conv_backprop(inputs, kernel, out_backprop, onednn_strides, padding)

        return outputs, gradient

    return convolve(inputs, tf.convert_to_tensor(kernel))


def _why_no_grouped_gradient(dtype):
    """The cause, and the remedy where there is one, of a missing grouped gradient."""
    if dtype != tf.float32:
        return (
            f"TensorFlow has no grouped-convolution gradient for {dtype.name} on "
            f"this CPU; train in float32 for the fast path"
        )
    return (
        "TensorFlow's oneDNN is off and its oneDNN kernels cannot be called "
        "directly in this build; set TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow "
        "is imported, where the CPU supports it, for the fast path"
    )


@functools.lru_cache(maxsize=None)
def _warn_split_fallback(dtype):
    # Once per dtype and process: the notice is about the machine, not a layer.
    warnings.warn(
        "keras_mgconv: grouped convolutions run as per-group convolutions here, which "
        "train about 2x slower (a 256-channel MultigridConv2D step: 1.07x of Conv2D's "
        f"time against 0.47x on the fast path): {_why_no_grouped_gradient(dtype)}.",
        RuntimeWarning,
        stacklevel=3,
    )


def auto_implementation(dtype):
    """How "auto" computes grouped convolutions in `dtype`: "grouped" or "split".

    "grouped" where a grouped `tf.nn.conv2d` trains here (`grouped_gradient_supported`),
    else "split", with a one-time `RuntimeWarning` that says why and what it costs.
    """
    dtype = tf.as_dtype(dtype)
    if grouped_gradient_supported(dtype):
        return "grouped"
    _warn_split_fallback(dtype)
    return "split"


def conv(inputs, kernel, strides, padding):
    """2D convolution of channels-last `inputs`, grouped where `kernel` has fewer input channels.

    One `tf.nn.conv2d`, the graph a converter gets; `trainable_conv` is the
    same function where it must train.
    """
    strides, padding = tuple(strides), padding.upper()
    if inputs.shape[0] == 0:
        # oneDNN's convolution returns its input for an empty batch: convolve one
        # zero image for the output's shape, and keep none of it.
        image = tf.zeros((1, *inputs.shape[1:]), inputs.dtype)
        return tf.nn.conv2d(image, kernel, strides, padding)[:0]
    return tf.nn.conv2d(inputs, kernel, strides, padding)


def trainable_conv(inputs, kernel, strides, padding, training=None):
    """`conv`, with a gradient wherever `grouped_gradient_supported(inputs.dtype)`.

    Where only TensorFlow's oneDNN kernels called directly differentiate a
    grouped convolution, every convolution trains through them
    (`_conv_with_onednn_gradient`), also ungrouped ones, which they run faster
    than TensorFlow's own kernels do without oneDNN; not under XLA, which
    compiles TensorFlow's grouped convolution and its gradient itself.

    Args:
        training: whether the call trains: Python True runs the forward
            convolution through oneDNN too.
    """
    strides, padding = tuple(strides), padding.upper()
    if (
        inputs.shape[0] == 0
        or _gradient_source(tf.as_dtype(inputs.dtype)) != "onednn"
        or control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    ):
        return conv(inputs, kernel, strides, padding)
    return _conv_with_onednn_gradient(inputs, kernel, strides, padding, training is True)


def cast(values, dtype):
    return tf.cast(values, dtype)


def bias_add(values, bias):
    return tf.nn.bias_add(values, bias)


eye = tf.eye
reshape = tf.reshape


def concatenate(values):
    """`values` joined along the last axis."""
    return tf.concat(values, axis=-1)


def stack(values):
    """`values` (tensors or variables) stacked along a new first axis."""
    return tf.stack([tf.convert_to_tensor(value) for value in values])


def split(values, parts):
    """`values` cut into `parts` equal slices along the last axis."""
    return tf.split(values, parts, axis=-1)


def pad_channels(values, channels):
    """`values` with `channels` zero channels appended."""
    return tf.pad(values, [[0, 0]] * (len(values.shape) - 1) + [[0, channels]])


def name_scope(name):
    """The scope a sublayer's weights are named under when its parent builds it.

    Keras 3 opens the layer's name scope around `build` itself; tf_keras only
    in `__call__`, and without it every sublayer's weight is
    `<parent>/kernel:0`, names that collide in an HDF5 file.
    """
    return tf.name_scope(name)
