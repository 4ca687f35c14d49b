"""MobileNetV2, multigrid or standard from the same code.

The layout is keras.applications' MobileNetV2 layer for layer, so that the
baseline (`multigrid=False`) has exactly its parameters. With `multigrid=True`
the 1x1 expansion and projection convolutions of the inverted residual blocks,
quadratic in the width and nearly all of the parameters, become 1x1
MultigridConv2D layers; the depthwise 3x3 convolutions (already linear in the
width), the stem, the last 1x1 convolution and the classifier stay standard.
"""

from keras_mgconv._keras import keras
from keras_mgconv.models import common

# (filters, stride, expansion) of the 17 inverted residual blocks.
_BLOCKS = [
    (16, 1, 1),
    (24, 2, 6),
    (24, 1, 6),
    (32, 2, 6),
    (32, 1, 6),
    (32, 1, 6),
    (64, 2, 6),
    (64, 1, 6),
    (64, 1, 6),
    (64, 1, 6),
    (96, 1, 6),
    (96, 1, 6),
    (96, 1, 6),
    (160, 2, 6),
    (160, 1, 6),
    (160, 1, 6),
    (320, 1, 6),
]


def make_divisible(value, divisor=8, min_value=None):
    """Rounds a channel count to a multiple of `divisor`, losing at most 10%.

    keras.applications' rule (its helper is private, hence this copy).
    """
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _correct_pad(x, kernel_size):
    """keras.applications' padding before a stride-2 depthwise convolution (private there)."""
    height, width = x.shape[1:3]
    adjust = (1, 1) if height is None else (1 - height % 2, 1 - width % 2)
    half = kernel_size // 2
    return ((half - adjust[0], half), (half - adjust[1], half))


def _batch_norm(x, name, momentum, gamma_initializer="ones"):
    return keras.layers.BatchNormalization(
        epsilon=1e-3, momentum=momentum, gamma_initializer=gamma_initializer, name=name
    )(x)


def _inverted_res_block(x, filters, stride, expansion, block_id, settings, momentum):
    in_channels = x.shape[-1]
    inputs = x
    prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
    if block_id:
        x = common.conv(settings, expansion * in_channels, 1, name=f"{prefix}expand")(x)
        x = _batch_norm(x, f"{prefix}expand_BN", momentum)
        x = keras.layers.ReLU(6.0, name=f"{prefix}expand_relu")(x)
    if stride == 2:
        x = keras.layers.ZeroPadding2D(_correct_pad(x, 3), name=f"{prefix}pad")(x)
    x = keras.layers.DepthwiseConv2D(
        3,
        strides=stride,
        use_bias=False,
        padding="same" if stride == 1 else "valid",
        name=f"{prefix}depthwise",
    )(x)
    x = _batch_norm(x, f"{prefix}depthwise_BN", momentum)
    x = keras.layers.ReLU(6.0, name=f"{prefix}depthwise_relu")(x)
    residual = in_channels == filters and stride == 1
    x = common.conv(settings, filters, 1, name=f"{prefix}project")(x)
    x = _batch_norm(
        x, f"{prefix}project_BN", momentum, settings.projection_gamma(filters, residual)
    )
    if residual:
        return keras.layers.Add(name=f"{prefix}add")([inputs, x])
    return x


def MobileNetV2(
    input_shape=None,
    alpha=1.0,
    include_top=True,
    weights=None,
    input_tensor=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name=None,
    multigrid=True,
    group_size=8,
    coarsest_channels=None,
    width=1.0,
    batch_norm_momentum=0.999,
    zero_init_residual="auto",
):
    """MobileNetV2 (Sandler et al. 2018) with multigrid 1x1 convolutions.

    The signature of `keras.applications.MobileNetV2`, plus the multigrid
    arguments: swapping the import is the whole migration. Block convolutions
    whose width is a multiple of `group_size` (and above `coarsest_channels`)
    become MultigridConv2D; the others stay full convolutions. The default
    group size 8 divides every width, since widths are rounded to multiples of 8.

    Args:
        input_shape: (height, width, channels), default (224, 224, 3); at least 32x32.
        alpha: width multiplier of every layer, as in keras.applications.
        include_top, weights, input_tensor, pooling, classes, classifier_activation, name:
            as in keras.applications; `weights` is
            None or the path of a weights file ("imagenet" is refused: there
            are no pretrained multigrid weights).
        multigrid: False builds the standard MobileNetV2; True or "layer"
            the multigrid one. MobileNetV2 has only the layer design:
            `multigrid="block"`, the authors' design for ResNets, makes a
            residual block's two 3x3 convolutions at one width a V-cycle
            smoothed by grouped basic blocks. An inverted residual block has
            no such pair: it widens 6x and narrows back inside, its only 3x3
            convolution is depthwise (already linear in the width, and mixing
            no channels), and all its channel mixing is in the 1x1 expansion
            and projection, which the layer design makes multigrid.
        group_size: channels per group of the multigrid layers (default 8).
        coarsest_channels: widest coarsest level, and widest block
            convolution that stays dense (default 32, as in the authors' code,
            or `group_size` where that is larger).
        width: a multiplier on the blocks' channels only (stem and head keep
            `alpha`'s), for widened networks.
        batch_norm_momentum: momentum of every BatchNormalization (0.999 as
            keras.applications; lower it for short runs).
        zero_init_residual: which residual branches start at zero scale
            (their projection's BatchNormalization), so that their blocks
            start as the identity. "auto" (default): every one of a
            multigrid network, none of a baseline's (`multigrid=False`),
            which starts as keras.applications'. On the digits at 32x32
            (`benchmarks/accuracy.py`), started at scale 1 (False) the
            multigrid network scored 3.8 points below the baseline; started
            at zero in the branches whose projection is multigrid only
            ("multigrid"), 1.2 below "auto". True: every residual branch,
            a baseline's too (it lifts the baseline by 4.7 points on those
            digits: compare networks at a like start).

    Returns:
        A `keras.Model`.

    Raises:
        ValueError: for `multigrid="block"` or another value than True,
            False or "layer", an alpha or width that is not a finite number > 0,
            a `batch_norm_momentum` outside [0, 1), 'imagenet' weights, a missing
            weights file, pooling with include_top, classes < 1, inputs smaller
            than 32x32, an `input_shape` that disagrees with `input_tensor`,
            a `group_size` dividing none of the block widths, or a
            `zero_init_residual` other than "auto", True, False or "multigrid".

    Example:

    >>> model = keras_mgconv.models.MobileNetV2((96, 96, 3), alpha=0.5, classes=10)
    >>> model.output_shape
    (None, 10)
    """
    common.positive_multiplier("alpha", alpha, "every layer's channels")
    if multigrid == "block":
        raise ValueError(
            "MobileNetV2 has only the layer design (multigrid=True or 'layer'): "
            "the block design smooths pairs of 3x3 convolutions at one width, "
            "which inverted residual blocks do not have; their 1x1 expansion "
            "and projection are made multigrid by the layer design. "
            f"Received: multigrid={multigrid!r}."
        )
    common.check_factory_arguments(weights, include_top, pooling, classes, width)
    common.batch_norm_momentum(batch_norm_momentum)
    settings = common.ConvSettings(
        multigrid, group_size, coarsest_channels, zero_init_residual=zero_init_residual
    )
    first_filters = make_divisible(32 * alpha)
    block_filters = [make_divisible(int(filters * alpha * width)) for filters, _, _ in _BLOCKS]
    in_channels = [first_filters, *block_filters[:-1]]
    settings.check_widths(
        block_filters
        + [
            expansion * channels
            for channels, (_, _, expansion) in zip(in_channels, _BLOCKS)
            if expansion > 1
        ],
        "MobileNetV2",
    )
    inputs, input_tensor = common.model_inputs(
        input_shape, input_tensor, (224, 224, 3), min_size=32
    )

    x = keras.layers.Conv2D(
        first_filters, 3, strides=2, padding="same", use_bias=False, name="Conv1"
    )(inputs)
    x = _batch_norm(x, "bn_Conv1", batch_norm_momentum)
    x = keras.layers.ReLU(6.0, name="Conv1_relu")(x)
    for block_id, (filters, (_, stride, expansion)) in enumerate(zip(block_filters, _BLOCKS)):
        x = _inverted_res_block(
            x, filters, stride, expansion, block_id, settings, batch_norm_momentum
        )
    last_filters = make_divisible(1280 * alpha) if alpha > 1.0 else 1280
    x = keras.layers.Conv2D(last_filters, 1, use_bias=False, name="Conv_1")(x)
    x = _batch_norm(x, "Conv_1_bn", batch_norm_momentum)
    x = keras.layers.ReLU(6.0, name="out_relu")(x)

    return common.finish_model(
        inputs,
        input_tensor,
        x,
        include_top,
        pooling,
        classes,
        classifier_activation,
        # keras.applications' name: the alpha and the input's size.
        weights,
        name or f"mobilenetv2_{alpha:0.2f}_{inputs.shape[1]}",
    )
