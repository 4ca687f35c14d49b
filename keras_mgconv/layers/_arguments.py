"""Normalisation and validation of layer arguments, shared by every layer.

Errors follow Keras' convention: they name the argument and end with
`Received: name=value.`
"""

import numbers

from keras_mgconv._keras import keras


def positive_int(name, value):
    """Returns `value` as an int if it is a strictly positive integer, else raises.

    NumPy integers count (`np.int64(8)`, as from a NumPy array); they come back
    as Python ints, which configs serialise to JSON.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a strictly positive "
            f"integer. Received: {name}={value!r}."
        )
    return int(value)


def choice(name, value, choices):
    """Returns `value` if it is one of `choices`, else raises."""
    if value not in choices:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected one of {list(choices)}. "
            f"Received: {name}={value!r}."
        )
    return value


def group_size(value):
    """Returns `value` as an int if it is a positive even integer: groups halve between levels."""
    value = positive_int("group_size", value)
    if value % 2:
        raise ValueError(
            "Invalid value for argument `group_size`. Expected an even number, "
            "since each group is halved between levels. "
            f"Received: group_size={value}."
        )
    return value


def pair(name, value):
    """Normalises an int or a pair of ints to a tuple of two positive ints."""
    values = (value, value) if isinstance(value, int) else value
    try:
        values = tuple(values)
    except TypeError:
        values = None
    if (
        values is None
        or len(values) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values)
    ):
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a strictly positive "
            f"integer or a tuple of 2 strictly positive integers. "
            f"Received: {name}={value!r}."
        )
    return values


def padding_mode(value):
    """Normalises `padding` to "same" or "valid"."""
    mode = value.lower() if isinstance(value, str) else value
    if mode not in ("same", "valid"):
        raise ValueError(
            "Invalid value for argument `padding`. Expected one of "
            f"{{'same', 'valid'}}. Received: padding={value!r}."
        )
    return mode


def channels_last(data_format):
    """Accepts only channels-last data, the layout every layer here computes in."""
    resolved = data_format or keras.backend.image_data_format()
    if resolved != "channels_last":
        raise ValueError(
            "keras_mgconv layers support only channels-last data "
            "(batch, height, width, channels); transpose channels-first inputs "
            "with keras.layers.Permute((2, 3, 1)) first. "
            f"Received: data_format={data_format!r} (resolved to {resolved!r})."
        )
    return "channels_last"


def conv_output_length(length, kernel_size, stride, padding):
    """The spatial output length of a convolution, as Keras' Conv2D computes it."""
    if length is None:
        return None
    if padding == "same":
        return (length + stride - 1) // stride
    return (length - kernel_size) // stride + 1


def conv_output_shape(layer, input_shape, filters, kernel_size, strides, padding):
    """The output shape of a 2D convolution on 4D channels-last inputs.

    Raises, as Keras' Conv2D does, where a known spatial size would be zero:
    a "valid" kernel larger than the input.
    """
    batch, height, width, _ = tuple(input_shape)
    size = tuple(
        conv_output_length(length, kernel, stride, padding)
        for length, kernel, stride in zip((height, width), kernel_size, strides)
    )
    if any(length is not None and length <= 0 for length in size):
        raise ValueError(
            f"Layer {layer.name!r} would give an empty output: its "
            f"{kernel_size[0]}x{kernel_size[1]} kernel with padding={padding!r} and "
            f"strides={tuple(strides)} leaves no output pixel on {height}x{width} "
            f"inputs. Use padding='same' or larger inputs, as for Conv2D. "
            f"Received: input_shape={tuple(input_shape)}."
        )
    return (batch, *size, filters)


def input_channels(layer, input_shape):
    """Reads the (known) channel count of a 4D channels-last input shape."""
    input_shape = tuple(input_shape)
    if len(input_shape) != 4:
        raise ValueError(
            f"Layer {layer.name!r} expects 4D inputs (batch, height, width, "
            f"channels). Received: input_shape={input_shape}."
        )
    channels = input_shape[-1]
    if channels is None:
        raise ValueError(
            f"Layer {layer.name!r} needs the channel dimension of its inputs to be "
            f"defined. Received: input_shape={input_shape}."
        )
    return int(channels)


IMPLEMENTATIONS = ("auto", "grouped", "split")


def implementation_mode(value):
    """Validates how grouped convolutions run: "auto", "grouped" or "split"."""
    return choice("implementation", value, IMPLEMENTATIONS)
