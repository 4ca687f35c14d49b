"""Multigrid-in-channels layers and the grouped convolution they are made of."""

from keras_mgconv.layers.channel_transfer import ChannelProlongation, ChannelRestriction
from keras_mgconv.layers.grouped_conv import GroupedConv2D, grouped_conv2d
from keras_mgconv.layers.multigrid_conv import MultigridConv2D, level_widths

__all__ = [
    "ChannelProlongation",
    "ChannelRestriction",
    "GroupedConv2D",
    "MultigridConv2D",
    "grouped_conv2d",
    "level_widths",
]
