"""The layers' tensor operations through `keras.ops`: Keras 3 on JAX and PyTorch.

The same functions as `_tensorflow_ops`, without TensorFlow: both backends
differentiate grouped convolutions on every device, and `keras.ops.conv`
infers the groups from the kernel's shape (JAX's `feature_group_count`,
PyTorch's `groups`).
"""

import contextlib

import keras
from keras import ops


def grouped_gradient_supported(dtype="float32"):
    """True: JAX and PyTorch differentiate grouped convolutions in every dtype, on every device."""
    return True


def auto_implementation(dtype):
    """How "auto" computes grouped convolutions: "grouped", but "split" under JAX on CPU.

    XLA's CPU grouped convolution trains about 40x slower than the same groups
    as ordinary convolutions (a 256-channel, group-16 MultigridConv2D step on 2
    cores: 66.7 s against 1.6 s; `Conv2D`'s 2.7 s); on GPUs XLA hands grouped
    convolutions to cuDNN. PyTorch trains both alike on CPU (1.28 and 1.36 s).
    """
    if keras.backend.backend() == "jax":
        import jax

        if jax.default_backend() == "cpu":
            return "split"
    return "grouped"


# The "split" path computes a grouped 1 x 1 convolution as one product
# batched over the groups, not as a convolution per group: under JAX every
# group's slice, convolution and concatenation are ops that XLA compiles, and
# a multigrid MobileNetV2 (alpha 0.35, 32x32, group size 8) has thousands;
# its first training step took 387 s against the baseline's 17 (2 busy cores).
SPLIT_POINTWISE_AS_ONE_PRODUCT = True


def conv(inputs, kernel, strides, padding):
    """2D convolution of channels-last `inputs`, grouped where `kernel` has fewer input channels."""
    return ops.conv(
        inputs, kernel, strides=tuple(strides), padding=padding, data_format="channels_last"
    )


def trainable_conv(inputs, kernel, strides, padding, training=None):
    """`conv`: JAX and PyTorch differentiate it on every device, in training or not."""
    return conv(inputs, kernel, strides, padding)


cast = ops.cast
bias_add = ops.add
einsum = ops.einsum
eye = ops.eye
reshape = ops.reshape
shape = ops.shape


def concatenate(values):
    """`values` joined along the last axis."""
    return ops.concatenate(values, axis=-1)


def stack(values):
    """`values` (tensors or variables) stacked along a new first axis."""
    return ops.stack([ops.convert_to_tensor(value) for value in values])


def split(values, parts):
    """`values` cut into `parts` equal slices along the last axis."""
    return ops.split(values, parts, axis=-1)


def pad_channels(values, channels):
    """`values` with `channels` zero channels appended."""
    return ops.pad(values, [[0, 0]] * (len(values.shape) - 1) + [[0, channels]])


def name_scope(name):
    """Nothing to open: Keras 3 names a sublayer's weights under its own name scope."""
    return contextlib.nullcontext()
