"""Zero channels appended to a tensor: the parameter-free ResNet shortcut."""

from keras_mgconv._keras import keras
from keras_mgconv.layers._ops import ops


@keras.saving.register_keras_serializable(package="keras_mgconv")
class ChannelZeroPadding(keras.layers.Layer):
    """Appends zero channels: the parameter-free shortcut of He et al.'s option A.

    Args:
        channels: int, the number of zero channels appended after the input's.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Example:

    >>> x = np.ones((2, 4, 4, 16), "float32")
    >>> y = keras_mgconv.layers.ChannelZeroPadding(16)(x)
    >>> tuple(y.shape)
    (2, 4, 4, 32)
    """

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels

    def call(self, inputs):
        return ops.pad_channels(inputs, self.channels)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] + self.channels)

    def get_prunable_weights(self):
        """None: declared so that tensorflow-model-optimization can prune the models it is in."""
        return []

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}
