"""ResNets, multigrid or standard from the same code.

CIFAR-style (He et al. 2016, section 4.2): 3x3 stem, three stages of 16/32/64
channels with n basic blocks each (depth 6n+2), parameter-free shortcuts
(option A: subsample and zero-pad channels). ImageNet-style: 7x7 stem and
max-pool, basic blocks (ResNet18/34) or bottlenecks (ResNet50), projection
shortcuts, laid out exactly as keras.applications' ResNet50 so that the
baselines have the same parameters.

With `multigrid=True` or `"layer"` (the layer design) every convolution inside
a residual block (the 3x3 ones and the bottlenecks' 1x1 reduce/expand) becomes a
MultigridConv2D; the stem, the shortcuts and the classifier stay standard. With
`multigrid="block"` (the authors' block design, `models.multigrid_block`) every
residual block of a multigrid width becomes one V-cycle smoothed by grouped
residual units, with no shortcut around it; the stem and the classifier stay
standard.
"""

from keras_mgconv._keras import keras
from keras_mgconv.layers import ChannelZeroPadding
from keras_mgconv.models import common, multigrid_block

# keras.applications' ResNet normalisation epsilon.
_BN_EPSILON = 1.001e-5


def _batch_norm(x, name, momentum, gamma_initializer="ones"):
    return keras.layers.BatchNormalization(
        epsilon=_BN_EPSILON, momentum=momentum, gamma_initializer=gamma_initializer, name=name
    )(x)


def _zero_pads(x, filters, stride, option):
    """Whether a block's shortcut subsamples and pads channels with zeros (option A)."""
    return option == "zero_pad" and not (stride == 1 and x.shape[-1] == filters)


def _shortcut(x, filters, stride, option, momentum, name):
    if stride == 1 and x.shape[-1] == filters:
        return x
    if _zero_pads(x, filters, stride, option):
        if stride != 1:
            x = keras.layers.MaxPooling2D(1, strides=stride, name=f"{name}_subsample")(x)
        return ChannelZeroPadding(filters - x.shape[-1], name=f"{name}_pad")(x)
    x = keras.layers.Conv2D(filters, 1, strides=stride, name=f"{name}_0_conv")(x)
    return _batch_norm(x, f"{name}_0_bn", momentum)


def basic_block(x, filters, stride, settings, shortcut, momentum, name):
    """Two 3x3 convolutions and the skip connection; a V-cycle in the block design."""
    if settings.design == "block" and settings.is_multigrid(filters):
        return multigrid_block.multigrid_basic_block(
            x,
            filters,
            stride,
            settings.group_size,
            settings.coarsest_width(filters),
            momentum,
            _BN_EPSILON,
            name,
            settings.zero_init(True),
        )
    gamma = settings.residual_gamma(
        settings.is_multigrid(filters), _zero_pads(x, filters, stride, shortcut)
    )
    skip = _shortcut(x, filters, stride, shortcut, momentum, name)
    x = common.conv(settings, filters, 3, strides=stride, name=f"{name}_1_conv")(x)
    x = _batch_norm(x, f"{name}_1_bn", momentum)
    x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = common.conv(settings, filters, 3, name=f"{name}_2_conv")(x)
    x = _batch_norm(x, f"{name}_2_bn", momentum, gamma)
    x = keras.layers.Add(name=f"{name}_add")([skip, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


basic_block.expansion = 1


def bottleneck_block(x, filters, stride, settings, shortcut, momentum, name):
    """1x1 reduce (with the stride, as keras.applications' ResNet50), 3x3, 1x1 expand.

    A V-cycle of bottleneck units in the block design.
    """
    if settings.design == "block" and settings.is_multigrid(filters):
        return multigrid_block.multigrid_bottleneck_block(
            x,
            filters,
            stride,
            settings.group_size,
            settings.coarsest_width(filters),
            momentum,
            _BN_EPSILON,
            name,
            settings.zero_init(True),
        )
    gamma = settings.residual_gamma(
        settings.is_multigrid(filters) or settings.is_multigrid(4 * filters),
        _zero_pads(x, 4 * filters, stride, shortcut),
    )
    skip = _shortcut(x, 4 * filters, stride, shortcut, momentum, name)
    x = common.conv(settings, filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = _batch_norm(x, f"{name}_1_bn", momentum)
    x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = common.conv(settings, filters, 3, name=f"{name}_2_conv")(x)
    x = _batch_norm(x, f"{name}_2_bn", momentum)
    x = keras.layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = common.conv(settings, 4 * filters, 1, name=f"{name}_3_conv")(x)
    x = _batch_norm(x, f"{name}_3_bn", momentum, gamma)
    x = keras.layers.Add(name=f"{name}_add")([skip, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


bottleneck_block.expansion = 4


def ResNet(
    block,
    stages,
    stem,
    shortcut,
    input_shape=None,
    include_top=True,
    weights=None,
    input_tensor=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name="resnet",
    multigrid=True,
    group_size=8,
    coarsest_channels=None,
    width=1.0,
    batch_norm_momentum=0.99,
    zero_init_residual="auto",
):
    """Builds a ResNet from its block function and stage specification.

    The named models (`ResNet20` ... `ResNet110`, `ResNet18`, `ResNet34`,
    `ResNet50`) are this builder with their data.

    Args:
        block: `basic_block` or `bottleneck_block`.
        stages: list of `(filters, blocks, stride)`, one per stage.
        stem: `"cifar"` (3x3 convolution, for 32x32 inputs) or `"imagenet"`
            (7x7 stride-2 convolution and 3x3 stride-2 max-pool).
        shortcut: `"zero_pad"` (parameter-free, option A) or `"projection"`
            (1x1 convolution and batch norm) where the shape changes.
        input_shape, include_top, input_tensor, pooling, classes, classifier_activation, name: as
            in `keras.applications.ResNet50`.
        weights: None or the path of a weights file ("imagenet" is refused: there are no
            pretrained multigrid weights).
        multigrid: False builds the standard network. True or "layer" (the
            layer design) replaces every block convolution of a multigrid
            width by a MultigridConv2D. "block" (the authors' block design,
            `multigrid_basic_block` / `multigrid_bottleneck_block`) makes each
            residual block of a multigrid width (its `filters` a multiple of
            `group_size` above `coarsest_channels`) one V-cycle, without
            shortcut or convolution biases; blocks of other widths stay
            standard in both designs.
        group_size: channels per group of the multigrid layers (default 8).
        coarsest_channels: widest coarsest level, and widest block
            convolution that stays dense (default 32, as in the authors' code,
            or `group_size` where that is larger).
        width: multiplier on every stage's channels (and the stem's).
        batch_norm_momentum: momentum of every BatchNormalization; lower it
            (e.g. 0.9) for runs of a few hundred steps.
        zero_init_residual: which residual branches start at zero scale, so
            that their blocks start as the identity (Goyal et al. 2017): the
            last BatchNormalization of the branch, and in the block design
            those of the finest level (see `multigrid_basic_block`).
            "auto" (default): every branch of a multigrid network, its dense
            blocks' too; none of a baseline's (`multigrid=False`), which
            starts as keras.applications'. A V-cycle carries its input
            through, so a branch of two starts correlated with the stream it
            adds to, and a deep multigrid network's stream grows with depth
            (`benchmarks/depth_diagnosis.py`); started at zero, it does not.
            "multigrid": the multigrid blocks' only; the dense ones start at
            1, which cost ResNet56 1.4 points on the digits against "auto"
            (`benchmarks/accuracy.py`). True: every branch, a baseline's too.
            False: every scale starts at 1. A branch beside a zero-padded
            shortcut (the CIFAR ResNets' stage changes) always starts at 1,
            so that the padded channels learn.

    Returns:
        A `keras.Model`.

    Raises:
        ValueError: for a `multigrid` other than True, False, "layer" or
            "block", 'imagenet' weights, a missing weights file, pooling with
            include_top, classes < 1, a width that is not a finite number > 0,
            a `batch_norm_momentum` outside [0, 1), input sizes below the
            network's minimum, an `input_shape` that disagrees with
            `input_tensor`, a `group_size` that is not a positive even int,
            or one that divides none of the block widths, a
            `zero_init_residual` other than "auto", True, False or "multigrid".
    """
    common.check_factory_arguments(weights, include_top, pooling, classes, width)
    common.batch_norm_momentum(batch_norm_momentum)
    settings = common.ConvSettings(
        multigrid,
        group_size,
        coarsest_channels,
        use_bias=stem == "imagenet",
        zero_init_residual=zero_init_residual,
    )
    stage_filters = [max(1, round(filters * width)) for filters, _, _ in stages]
    # A block-design block is multigrid by its `filters`, a layer-design
    # bottleneck by each convolution's width.
    expansions = {1} if settings.design == "block" else {1, block.expansion}
    settings.check_widths([f * m for f in stage_filters for m in expansions], name)
    cifar = stem == "cifar"
    inputs, input_tensor = common.model_inputs(
        input_shape,
        input_tensor,
        (32, 32, 3) if cifar else (224, 224, 3),
        min_size=8 if cifar else 32,
    )

    stem_filters = max(1, round((16 if cifar else 64) * width))
    if cifar:
        x = keras.layers.Conv2D(stem_filters, 3, padding="same", use_bias=False, name="conv1_conv")(
            inputs
        )
        x = _batch_norm(x, "conv1_bn", batch_norm_momentum)
        x = keras.layers.Activation("relu", name="conv1_relu")(x)
    else:
        x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(inputs)
        x = keras.layers.Conv2D(stem_filters, 7, strides=2, name="conv1_conv")(x)
        x = _batch_norm(x, "conv1_bn", batch_norm_momentum)
        x = keras.layers.Activation("relu", name="conv1_relu")(x)
        x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
        x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)

    for stage, (filters, (_, blocks, stride)) in enumerate(zip(stage_filters, stages)):
        for index in range(blocks):
            x = block(
                x,
                filters,
                stride if index == 0 else 1,
                settings,
                shortcut,
                batch_norm_momentum,
                name=f"conv{stage + 2}_block{index + 1}",
            )

    return common.finish_model(
        inputs, input_tensor, x, include_top, pooling, classes, classifier_activation, weights, name
    )


def CIFARResNet(
    depth,
    input_shape=None,
    include_top=True,
    weights=None,
    input_tensor=None,
    pooling=None,
    classes=10,
    classifier_activation="softmax",
    name=None,
    multigrid=True,
    group_size=8,
    coarsest_channels=None,
    width=1.0,
    batch_norm_momentum=0.99,
    zero_init_residual="auto",
):
    """CIFAR ResNet of any depth 6n+2 (He et al. 2016, section 4.2).

    n basic blocks per stage of 16/32/64 channels, 32x32 inputs and 10 classes
    by default; the other arguments are `ResNet`'s.

    Raises:
        ValueError: for a depth that is not 6n+2 with n >= 1, and as `ResNet`.

    Example:

    >>> model = keras_mgconv.models.CIFARResNet(20)
    >>> model.count_params() < keras_mgconv.models.CIFARResNet(
    ...     20, multigrid=False).count_params()
    True
    >>> model.get_layer("conv4_block1_1_conv").levels  # 64 channels, groups of 8
    (64, 32)

    The 16- and 32-channel stages stay standard, as `coarsest_channels=32`
    (the default) keeps them; `coarsest_channels=8` makes them multigrid too:

    >>> type(model.get_layer("conv3_block1_1_conv")).__name__
    'Conv2D'
    >>> keras_mgconv.models.CIFARResNet(20, coarsest_channels=8).get_layer(
    ...     "conv3_block1_1_conv").levels
    (32, 16, 8)

    The authors' block design, one V-cycle per residual block:

    >>> blocks = keras_mgconv.models.CIFARResNet(20, multigrid="block")
    >>> blocks.get_layer("conv4_block1_level0_1_conv").groups  # level 0 (64 channels)
    8
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            "A CIFAR ResNet has depth 6n+2 for n >= 1 (20, 32, 44, 56, 110, ...). "
            f"Received: depth={depth!r}."
        )
    blocks = (depth - 2) // 6
    return ResNet(
        basic_block,
        [(16, blocks, 1), (32, blocks, 2), (64, blocks, 2)],
        "cifar",
        "zero_pad",
        input_shape,
        include_top,
        weights,
        input_tensor,
        pooling,
        classes,
        classifier_activation,
        name or f"resnet{depth}",
        multigrid,
        group_size,
        coarsest_channels,
        width,
        batch_norm_momentum,
        zero_init_residual,
    )


def _cifar_resnet(depth):
    def factory(
        input_shape=None,
        include_top=True,
        weights=None,
        input_tensor=None,
        pooling=None,
        classes=10,
        classifier_activation="softmax",
        name=None,
        multigrid=True,
        group_size=8,
        coarsest_channels=None,
        width=1.0,
        batch_norm_momentum=0.99,
        zero_init_residual="auto",
    ):
        return CIFARResNet(
            depth,
            input_shape,
            include_top,
            weights,
            input_tensor,
            pooling,
            classes,
            classifier_activation,
            name,
            multigrid,
            group_size,
            coarsest_channels,
            width,
            batch_norm_momentum,
            zero_init_residual,
        )

    factory.__name__ = f"ResNet{depth}"
    factory.__doc__ = f"CIFAR ResNet-{depth}: `CIFARResNet({depth}, ...)`; see its docstring."
    return factory


def _imagenet_resnet(block, blocks_per_stage, depth):
    def factory(
        input_shape=None,
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
        batch_norm_momentum=0.99,
        zero_init_residual="auto",
    ):
        stages = [
            (filters, blocks, 1 if index == 0 else 2)
            for index, (filters, blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_stage))
        ]
        return ResNet(
            block,
            stages,
            "imagenet",
            "projection",
            input_shape,
            include_top,
            weights,
            input_tensor,
            pooling,
            classes,
            classifier_activation,
            name or f"resnet{depth}",
            multigrid,
            group_size,
            coarsest_channels,
            width,
            batch_norm_momentum,
            zero_init_residual,
        )

    factory.__name__ = f"ResNet{depth}"
    factory.__doc__ = (
        f"ImageNet ResNet-{depth}: 7x7 stem, {blocks_per_stage} "
        f"{'bottleneck' if block is bottleneck_block else 'basic'} blocks per stage "
        f"of 64/128/256/512 channels, 224x224 inputs by default.\n\n"
        f"    Arguments as `ResNet`, whose docstring explains them.\n"
    )
    return factory


ResNet20 = _cifar_resnet(20)
ResNet32 = _cifar_resnet(32)
ResNet44 = _cifar_resnet(44)
ResNet56 = _cifar_resnet(56)
ResNet110 = _cifar_resnet(110)
ResNet18 = _imagenet_resnet(basic_block, (2, 2, 2, 2), 18)
ResNet34 = _imagenet_resnet(basic_block, (3, 4, 6, 3), 34)
ResNet50 = _imagenet_resnet(bottleneck_block, (3, 4, 6, 3), 50)
