"""Model factories: multigrid networks and their baselines from the same code."""

from keras_mgconv.models.mobilenet_v2 import MobileNetV2
from keras_mgconv.models.mobilenet_v3 import MobileNetV3Large, MobileNetV3Small
from keras_mgconv.models.multigrid_block import (
    multigrid_basic_block,
    multigrid_bottleneck_block,
)
from keras_mgconv.models.resnet import (
    CIFARResNet,
    ResNet,
    ResNet18,
    ResNet20,
    ResNet32,
    ResNet34,
    ResNet44,
    ResNet50,
    ResNet56,
    ResNet110,
    basic_block,
    bottleneck_block,
)

__all__ = [
    "CIFARResNet",
    "MobileNetV2",
    "MobileNetV3Large",
    "MobileNetV3Small",
    "ResNet",
    "ResNet18",
    "ResNet20",
    "ResNet32",
    "ResNet34",
    "ResNet44",
    "ResNet50",
    "ResNet56",
    "ResNet110",
    "basic_block",
    "bottleneck_block",
    "multigrid_basic_block",
    "multigrid_bottleneck_block",
]
