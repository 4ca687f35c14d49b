"""The layers' tensor operations on TensorFlow: Keras 3's TensorFlow backend and tf_keras.

Grouped convolutions call `tf.nn.conv2d` with a grouped kernel, not Keras 3's
`Conv2D(groups>1)` or `keras.ops.conv`, which on the TensorFlow backend run
inside an XLA function and train 20-45x slower on CPU (DESIGN.md, section 3).

TensorFlow differentiates a grouped `tf.nn.conv2d` on CPU only through oneDNN,
and only in float32; with `TF_ENABLE_ONEDNN_OPTS=0`, on CPUs where TensorFlow
leaves oneDNN off (AVX2-only ones, unless keras_mgconv was imported first) or
in float16 it raises "Gradients for grouped convolutions are not supported on
CPU". There `auto_implementation` chooses the per-group ("split") path.
"""

import functools
import os
import warnings

import tensorflow as tf


@functools.lru_cache(maxsize=None)
def grouped_gradient_supported(dtype=tf.float32):
    """Whether TensorFlow differentiates a grouped `tf.nn.conv2d` on this machine.

    Runs a tiny grouped convolution's two backprop kernels once per dtype,
    eagerly (also when called while a `tf.function` is being traced), and
    caches the answer for the process.

    Args:
        dtype: the compute dtype to probe, a `tf.DType` or its name.

    Returns:
        True when TensorFlow's own grouped gradient works on the default device.
    """
    dtype = tf.as_dtype(dtype)
    # init_scope runs the probe eagerly even while a tf.function is traced, but
    # it also pauses gradient tapes: call the two backprop kernels directly.
    with tf.init_scope():
        inputs = tf.ones((1, 4, 4, 4), dtype)
        kernel = tf.ones((3, 3, 2, 4), dtype)
        strides = [1, 1, 1, 1]
        try:
            tf.raw_ops.Conv2DBackpropInput(
                input_sizes=inputs.shape, filter=kernel, out_backprop=inputs,
                strides=strides, padding="SAME")
            tf.raw_ops.Conv2DBackpropFilter(
                input=inputs, filter_sizes=kernel.shape, out_backprop=inputs,
                strides=strides, padding="SAME")
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
                tf.errors.NotFoundError):
            return False
    return True


def _why_no_grouped_gradient(dtype):
    """The cause, and the remedy where there is one, of a missing grouped gradient."""
    if dtype != tf.float32:
        return (f"TensorFlow has no grouped-convolution gradient for {dtype.name} on "
                f"CPU; train in float32 for the fast path")
    setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if setting is None:
        state = "oneDNN is off (TensorFlow was imported before keras_mgconv could turn it on)"
    else:
        state = f"oneDNN is off or unavailable (TF_ENABLE_ONEDNN_OPTS={setting!r})"
    return (f"{state}; set TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow is imported, or "
            f"import keras_mgconv first, for the fast path")


@functools.lru_cache(maxsize=None)
def _warn_split_fallback(dtype):
    # Once per dtype and process: the notice is about the machine, not a layer.
    warnings.warn(
        "keras_mgconv: grouped convolutions run as per-group convolutions here, which "
        "train about 1.5x slower (a 256-channel MultigridConv2D step: 0.82x of Conv2D's "
        f"time against 0.56x on the fast path): {_why_no_grouped_gradient(dtype)}.",
        RuntimeWarning, stacklevel=3)


def auto_implementation(dtype):
    """How "auto" computes grouped convolutions in `dtype`: "grouped" or "split".

    "grouped" where TensorFlow can differentiate a grouped `tf.nn.conv2d` here,
    else "split", with a one-time `RuntimeWarning` that says why and what it costs.
    """
    dtype = tf.as_dtype(dtype)
    if grouped_gradient_supported(dtype):
        return "grouped"
    _warn_split_fallback(dtype)
    return "split"


def conv(inputs, kernel, strides, padding):
    """2D convolution of channels-last `inputs`, grouped where `kernel` has fewer input channels."""
    if inputs.shape[0] == 0:
        # oneDNN's convolution returns its input for an empty batch: convolve one
        # zero image for the output's shape, and keep none of it.
        image = tf.zeros((1, *inputs.shape[1:]), inputs.dtype)
        return tf.nn.conv2d(image, kernel, tuple(strides), padding.upper())[:0]
    return tf.nn.conv2d(inputs, kernel, tuple(strides), padding.upper())


def cast(values, dtype):
    return tf.cast(values, dtype)


def bias_add(values, bias):
    return tf.nn.bias_add(values, bias)


eye = tf.eye
reshape = tf.reshape


def concatenate(values):
    """`values` joined along the last axis."""
    return tf.concat(values, axis=-1)


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


