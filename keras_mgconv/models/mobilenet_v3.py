"""MobileNetV3 Small and Large, multigrid or standard from the same code.

The layout is keras.applications' MobileNetV3 layer for layer, so that the
baseline (`multigrid=False`) has exactly its parameters and, with its weights,
computes exactly its outputs. With `multigrid=True` the 1x1 expansion and
projection convolutions of the inverted residual blocks become 1x1
MultigridConv2D layers. The depthwise convolutions, the squeeze-and-excitation
blocks, the stem, the last two convolutions and the classifier stay standard.

Where the cycle goes. The authors' `mobilenetv3_MG.py` (repository
BGUCompSci/MultigridInChannelsCNNs) makes each inverted residual block one
V-cycle over the block's output channels, the design `multigrid="block"` gives
the ResNets. Each level above the coarsest is smoothed by a whole inverted
residual block with grouped 1x1 convolutions (its depthwise convolution,
squeeze-and-excitation and activations included), and the coarsest level by a
dense one. A block that changes width or stride starts with a full 1x1
convolution carrying the stride, and there is no shortcut around the cycle.
Their network is also not MobileNetV3's: a 1x1 stem of stride 1, a head
without the 6x-wide 1x1 convolution, ReLU in the head and max pooling.

Here the cycle is the layer design's, as in `MobileNetV2`, for three reasons.
The baseline must be keras.applications' network and the multigrid network the
same graph with convolutions swapped, so that a comparison is like for like;
the block design changes where the stride, the depthwise convolutions and the
squeeze-and-excitation run. Their strided full 1x1 connector subsamples before
any spatial filtering and stays quadratic in the width. And their smoothing
repeats the depthwise convolution and a squeeze-and-excitation block at every
level, work that the block's only channel mixing, its 1x1 expansion and
projection, does not need: those are what the layer design makes multigrid.

Where the parameters are. At alpha 1.0 and 1000 classes, 48% of
MobileNetV3-Large's 5.51M parameters are the head (`conv_1`, `conv_2`,
`logits`), 27% the squeeze-and-excitation blocks and 22% the expansions and
projections, which are all that becomes multigrid: the multigrid network keeps
at least 78% of the baseline's parameters at width 1x (group size 8: 84%,
4.61M; MobileNetV2: 61%), and 69% of its multiply-adds. Widened (`width`), the
squeeze-and-excitation blocks grow quadratically with the expanded widths, as
in the baseline: at 2x the multigrid network has 70% of the 2x baseline's
13.9M parameters and 37% of its multiply-adds, but more parameters than the
1x baseline (`benchmarks/model_table.py`).

Hard-swish and the gate of the squeeze-and-excitation blocks are made of Keras
layers both Keras versions have, so that the model also builds under tf_keras,
where tensorflow-model-optimization quantizes it. keras.applications computes
the gate as `ReLU(6)(x + 3) * (1 / 6)` with operations (under tf_keras,
`TFOpLambda` layers, which tfmot cannot quantize); here two `Rescaling` layers
add the 3 (`x * 1 + 3`) and multiply by 1/6 (`y * (1 / 6) + 0`), the same
floating-point results. Hard-swish is Keras 3's `Activation("hard_swish")`,
keras.applications' own; tf_keras has no such activation, and there it is
`Multiply()([x, gate(x)])`, which differs from Keras 3's only in rounding.
So a model that Keras 3 saved holds an activation tf_keras cannot read
("hard_silu"): quantization-aware training under tf_keras starts from a model
built there.
"""

import numbers

from keras_mgconv._keras import keras
from keras_mgconv.models import common
from keras_mgconv.models.mobilenet_v2 import make_divisible

# keras.applications' blocks: (expansion, filters, kernel size or None for the
# model's kernel, stride, squeeze-and-excitation, hard-swish). A block with
# hard-swish uses the model's activation (ReLU when minimalistic), the others
# ReLU; a block with squeeze-and-excitation has one unless minimalistic.
_SMALL_BLOCKS = [
    (1, 16, 3, 2, True, False),
    (72 / 16, 24, 3, 2, False, False),
    (88 / 24, 24, 3, 1, False, False),
    (4, 40, None, 2, True, True),
    (6, 40, None, 1, True, True),
    (6, 40, None, 1, True, True),
    (3, 48, None, 1, True, True),
    (3, 48, None, 1, True, True),
    (6, 96, None, 2, True, True),
    (6, 96, None, 1, True, True),
    (6, 96, None, 1, True, True),
]
_LARGE_BLOCKS = [
    (1, 16, 3, 1, False, False),
    (4, 24, 3, 2, False, False),
    (3, 24, 3, 1, False, False),
    (3, 40, None, 2, True, False),
    (3, 40, None, 1, True, False),
    (3, 40, None, 1, True, False),
    (6, 80, 3, 2, False, True),
    (2.5, 80, 3, 1, False, True),
    (2.3, 80, 3, 1, False, True),
    (2.3, 80, 3, 1, False, True),
    (6, 112, 3, 1, True, True),
    (6, 112, 3, 1, True, True),
    (6, 160, None, 2, True, True),
    (6, 160, None, 1, True, True),
    (6, 160, None, 1, True, True),
]
_SE_RATIO = 0.25

# Keras 3 has hard-swish, and keras.applications uses it; tf_keras has not.
_HAS_HARD_SWISH = hasattr(keras.activations, "hard_silu")


def _batch_norm(x, name, momentum, gamma_initializer="ones"):
    return keras.layers.BatchNormalization(
        epsilon=1e-3, momentum=momentum, gamma_initializer=gamma_initializer, name=name
    )(x)


def _hard_sigmoid(x, name):
    """`ReLU(6)(x + 3) * (1 / 6)` in layers, with keras.applications' rounding."""
    x = keras.layers.Rescaling(1.0, offset=3.0, name=f"{name}_shift")(x)
    x = keras.layers.ReLU(6.0, name=f"{name}_relu6")(x)
    return keras.layers.Rescaling(1.0 / 6.0, name=f"{name}_scale")(x)


def _activation(x, hard_swish, name):
    if not hard_swish:
        return keras.layers.ReLU(name=name)(x)
    if _HAS_HARD_SWISH:
        return keras.layers.Activation("hard_swish", name=name)(x)
    return keras.layers.Multiply(name=name)([x, _hard_sigmoid(x, f"{name}_gate")])


def _correct_pad(x, kernel_size):
    """keras.applications' padding before a stride-2 depthwise convolution (private there)."""
    height, width = x.shape[1:3]
    adjust = (1, 1) if height is None or width is None else (1 - height % 2, 1 - width % 2)
    half = kernel_size // 2
    return ((half - adjust[0], half), (half - adjust[1], half))


def _squeeze_excite(inputs, filters, prefix):
    x = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{prefix}squeeze_excite_avg_pool")(
        inputs
    )
    x = keras.layers.Conv2D(
        make_divisible(filters * _SE_RATIO), 1, padding="same", name=f"{prefix}squeeze_excite_conv"
    )(x)
    x = keras.layers.ReLU(name=f"{prefix}squeeze_excite_relu")(x)
    x = keras.layers.Conv2D(filters, 1, padding="same", name=f"{prefix}squeeze_excite_conv_1")(x)
    x = _hard_sigmoid(x, f"{prefix}squeeze_excite_gate")
    return keras.layers.Multiply(name=f"{prefix}squeeze_excite_mul")([inputs, x])


def _inverted_res_block(
    x,
    expanded,
    filters,
    kernel_size,
    stride,
    squeeze_excite,
    hard_swish,
    block_id,
    settings,
    momentum,
):
    in_channels = x.shape[-1]
    shortcut = x
    prefix = f"expanded_conv_{block_id}_" if block_id else "expanded_conv_"
    if block_id:
        x = common.conv(settings, expanded, 1, name=f"{prefix}expand")(x)
        x = _batch_norm(x, f"{prefix}expand_bn", momentum)
        x = _activation(x, hard_swish, f"{prefix}expand_activation")
    if stride == 2:
        x = keras.layers.ZeroPadding2D(_correct_pad(x, kernel_size), name=f"{prefix}depthwise_pad")(
            x
        )
    x = keras.layers.DepthwiseConv2D(
        kernel_size,
        strides=stride,
        padding="same" if stride == 1 else "valid",
        use_bias=False,
        name=f"{prefix}depthwise",
    )(x)
    x = _batch_norm(x, f"{prefix}depthwise_bn", momentum)
    x = _activation(x, hard_swish, f"{prefix}depthwise_activation")
    if squeeze_excite:
        x = _squeeze_excite(x, expanded, prefix)
    residual = stride == 1 and in_channels == filters
    x = common.conv(settings, filters, 1, name=f"{prefix}project")(x)
    x = _batch_norm(
        x, f"{prefix}project_bn", momentum, settings.projection_gamma(filters, residual)
    )
    if residual:
        x = keras.layers.Add(name=f"{prefix}add")([shortcut, x])
    return x


def _block_widths(blocks, alpha, width, minimalistic):
    """(expanded, filters, kernel, stride, squeeze-excite, hard-swish) of every block."""
    kernel = 3 if minimalistic else 5
    in_channels = 16
    widths = []
    for expansion, filters, kernel_size, stride, squeeze_excite, hard_swish in blocks:
        filters = make_divisible(filters * alpha * width)
        widths.append(
            (
                make_divisible(in_channels * expansion),
                filters,
                kernel_size or kernel,
                stride,
                squeeze_excite and not minimalistic,
                hard_swish and not minimalistic,
            )
        )
        in_channels = filters
    return widths


def _mobilenet_v3(
    factory,
    blocks,
    last_point_channels,
    input_shape,
    alpha,
    minimalistic,
    include_top,
    weights,
    input_tensor,
    classes,
    pooling,
    dropout_rate,
    classifier_activation,
    include_preprocessing,
    name,
    multigrid,
    group_size,
    coarsest_channels,
    width,
    batch_norm_momentum,
    zero_init_residual,
):
    alpha = common.positive_multiplier("alpha", alpha, "every layer's channels")
    if multigrid == "block":
        raise ValueError(
            f"{factory} has only the layer design (multigrid=True or 'layer'): the block "
            "design smooths pairs of 3x3 convolutions at one width, which inverted "
            "residual blocks do not have; their 1x1 expansion and projection are made "
            f"multigrid by the layer design. Received: multigrid={multigrid!r}."
        )
    common.check_factory_arguments(weights, include_top, pooling, classes, width)
    width = float(width)
    common.batch_norm_momentum(batch_norm_momentum)
    if (
        isinstance(dropout_rate, bool)
        or not isinstance(dropout_rate, numbers.Real)
        or not 0 <= dropout_rate < 1
    ):
        raise ValueError(
            "Invalid value for argument `dropout_rate`. Expected a number in [0, 1), "
            f"the fraction of the classifier's inputs dropped in training. "
            f"Received: dropout_rate={dropout_rate!r}."
        )
    settings = common.ConvSettings(
        multigrid, group_size, coarsest_channels, zero_init_residual=zero_init_residual
    )
    widths = _block_widths(blocks, alpha, width, minimalistic)
    settings.check_widths(
        [filters for _, filters, *_ in widths]
        + [expanded for block_id, (expanded, *_) in enumerate(widths) if block_id],
        factory,
    )
    inputs, input_tensor = common.model_inputs(
        input_shape, input_tensor, (None, None, 3), min_size=32
    )

    x = inputs
    if include_preprocessing:
        x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescaling")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="conv")(x)
    x = _batch_norm(x, "conv_bn", batch_norm_momentum)
    x = _activation(x, not minimalistic, "conv_activation")
    for block_id, block in enumerate(widths):
        x = _inverted_res_block(x, *block, block_id, settings, batch_norm_momentum)
    # The head keeps alpha's widths, whatever `width` does to the blocks.
    last_conv_channels = make_divisible(make_divisible(blocks[-1][1] * alpha) * 6)
    if alpha > 1.0:
        last_point_channels = make_divisible(last_point_channels * alpha)
    x = keras.layers.Conv2D(last_conv_channels, 1, padding="same", use_bias=False, name="conv_1")(x)
    x = _batch_norm(x, "conv_1_bn", batch_norm_momentum)
    x = _activation(x, not minimalistic, "conv_1_activation")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="avg_pool")(x)
        x = keras.layers.Conv2D(last_point_channels, 1, padding="same", name="conv_2")(x)
        x = _activation(x, not minimalistic, "conv_2_activation")
        if dropout_rate > 0:
            x = keras.layers.Dropout(dropout_rate, name="dropout")(x)
        x = keras.layers.Conv2D(classes, 1, padding="same", name="logits")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Activation(classifier_activation, name="predictions")(x)
    # The classifier is built above (1x1 convolutions, as keras.applications').
    return common.finish_model(
        inputs, input_tensor, x, False, pooling, classes, classifier_activation, weights, name
    )


_DOCSTRING = """{model} (Howard et al. 2019) with multigrid 1x1 convolutions.

    The signature of `keras.applications.{model}`, plus the multigrid
    arguments: swapping the import is the whole migration. The expansion and
    projection convolutions whose width is a multiple of `group_size` (and
    above `coarsest_channels`) become MultigridConv2D; the others stay full
    convolutions. The default group size 8 divides every width, since widths
    are rounded to multiples of 8. The module's docstring says where the cycle
    goes and why.

    Args:
        input_shape: (height, width, channels), default (None, None, 3) as in
            keras.applications; height and width at least 32 where known.
        alpha: width multiplier of the blocks and, above 1, of the classifier's
            hidden layer, as in keras.applications.
        minimalistic: no squeeze-and-excitation, ReLU instead of hard-swish and
            3x3 depthwise convolutions throughout, as in keras.applications.
        include_top, weights, input_tensor, classes, pooling, dropout_rate,
        classifier_activation, include_preprocessing, name: as in
            keras.applications; `weights` is None (the default here) or the
            path of a weights file ("imagenet" is refused: there are no
            pretrained multigrid weights). With `include_preprocessing` the
            model takes pixels in [0, 255].
        multigrid: False builds the standard {model}; True or "layer" the
            multigrid one. There is no block design (`multigrid="block"`): see
            the module's docstring.
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
            which starts as keras.applications', as in `MobileNetV2`.
            "multigrid": those whose projection is multigrid. False: every
            scale starts at 1. True: every residual branch, a baseline's
            too.

    Returns:
        A `keras.Model` (a `PreciseBatchNormModel`).

    Raises:
        ValueError: for `multigrid="block"` or another value than True,
            False or "layer", an alpha or width that is not a finite number > 0,
            a `dropout_rate` outside [0, 1), a `batch_norm_momentum` outside
            [0, 1), 'imagenet' weights, a missing weights file, pooling with
            include_top, classes < 1, inputs smaller than 32x32, an
            `input_shape` that disagrees with `input_tensor`, a
            `group_size` dividing none of the block widths, or a
            `zero_init_residual` other than "auto", True, False or "multigrid".

    Example:

    >>> model = keras_mgconv.models.{model}((32, 32, 3), alpha=0.75, classes=10)
    >>> model.output_shape
    (None, 10)
    """


def MobileNetV3Small(
    input_shape=None,
    alpha=1.0,
    minimalistic=False,
    include_top=True,
    weights=None,
    input_tensor=None,
    classes=1000,
    pooling=None,
    dropout_rate=0.2,
    classifier_activation="softmax",
    include_preprocessing=True,
    name="MobileNetV3Small",
    multigrid=True,
    group_size=8,
    coarsest_channels=None,
    width=1.0,
    batch_norm_momentum=0.999,
    zero_init_residual="auto",
):
    return _mobilenet_v3(
        "MobileNetV3Small",
        _SMALL_BLOCKS,
        1024,
        input_shape,
        alpha,
        minimalistic,
        include_top,
        weights,
        input_tensor,
        classes,
        pooling,
        dropout_rate,
        classifier_activation,
        include_preprocessing,
        name,
        multigrid,
        group_size,
        coarsest_channels,
        width,
        batch_norm_momentum,
        zero_init_residual,
    )


def MobileNetV3Large(
    input_shape=None,
    alpha=1.0,
    minimalistic=False,
    include_top=True,
    weights=None,
    input_tensor=None,
    classes=1000,
    pooling=None,
    dropout_rate=0.2,
    classifier_activation="softmax",
    include_preprocessing=True,
    name="MobileNetV3Large",
    multigrid=True,
    group_size=8,
    coarsest_channels=None,
    width=1.0,
    batch_norm_momentum=0.999,
    zero_init_residual="auto",
):
    return _mobilenet_v3(
        "MobileNetV3Large",
        _LARGE_BLOCKS,
        1280,
        input_shape,
        alpha,
        minimalistic,
        include_top,
        weights,
        input_tensor,
        classes,
        pooling,
        dropout_rate,
        classifier_activation,
        include_preprocessing,
        name,
        multigrid,
        group_size,
        coarsest_channels,
        width,
        batch_norm_momentum,
        zero_init_residual,
    )


MobileNetV3Small.__doc__ = _DOCSTRING.format(model="MobileNetV3Small")
MobileNetV3Large.__doc__ = _DOCSTRING.format(model="MobileNetV3Large")
