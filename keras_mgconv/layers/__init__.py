"""Multigrid-in-channels layers and the grouped convolution they are made of.

Every class keras_mgconv can write into a saved model is defined under this
package: importing it registers them all with Keras, which `keras_mgconv`
does as soon as Keras is imported.
"""

from keras_mgconv.layers.channel_padding import ChannelZeroPadding
from keras_mgconv.layers.channel_transfer import ChannelProlongation, ChannelRestriction
from keras_mgconv.layers.grouped_conv import GroupedConv2D, grouped_conv2d
from keras_mgconv.layers.multigrid_conv import MultigridConv2D, level_widths
from keras_mgconv.layers.precise_model import PreciseBatchNormModel

__all__ = [
    "ChannelProlongation",
    "ChannelRestriction",
    "ChannelZeroPadding",
    "GroupedConv2D",
    "MultigridConv2D",
    "PreciseBatchNormModel",
    "grouped_conv2d",
    "level_widths",
]
