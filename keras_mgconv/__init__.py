"""keras_mgconv: multigrid-in-channels (MGIC) convolutional networks for Keras."""

# `data` registers the embedded `digits` dataset with TFDS.
from keras_mgconv import data, models
from keras_mgconv.complexity import count_multiply_adds
from keras_mgconv.layers import (
    ChannelProlongation,
    ChannelRestriction,
    GroupedConv2D,
    MultigridConv2D,
)

__version__ = "0.1.0"

__all__ = [
    "ChannelProlongation",
    "ChannelRestriction",
    "GroupedConv2D",
    "MultigridConv2D",
    "__version__",
    "count_multiply_adds",
    "data",
    "models",
]
