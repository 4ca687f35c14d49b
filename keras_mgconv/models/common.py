"""What every model factory shares: argument checks, the convolution switch, the head.

The switch `conv()` is the single place where a factory's convolution becomes
multigrid (layer design) or stays standard, so the baseline and the multigrid
network are the same code; the ResNet blocks switch to the block design
(`models.multigrid_block`) the same way, by the settings.
"""

import math
import numbers
import os

from keras_mgconv._keras import keras
from keras_mgconv.batch_norm import PreciseBatchNormModel
from keras_mgconv.layers import MultigridConv2D, _arguments

DESIGNS = ("layer", "block")
# The factories keep block convolutions of at most this many channels dense
# and stop their hierarchies there, as the authors' training script does by
# default (groups of 32 channels, so levels of 32 or fewer are dense).
# Narrower multigrid layers ran slower than the convolutions they replace
# (LiteRT and training, benchmarks/), and on the digits of
# benchmarks/accuracy.py the networks that keep them dense scored higher at
# 1x (ResNet56 +2.9 and +2.2 points), a third of a point lower at 4x.
DENSE_CHANNELS = 32


def multigrid_design(multigrid):
    """Normalises a factory's `multigrid` to None (the baseline), "layer" or "block".

    True is "layer", the design every factory had before "block" existed.

    Raises:
        ValueError: for anything but a bool, "layer" or "block".
    """
    if isinstance(multigrid, bool):
        return "layer" if multigrid else None
    if isinstance(multigrid, str) and multigrid in DESIGNS:
        return multigrid
    raise ValueError(
        f"Invalid value for argument `multigrid`. Expected True, False or one of "
        f"{list(DESIGNS)}. Received: multigrid={multigrid!r}."
    )


class ConvSettings:
    """How a factory builds its blocks.

    Args:
        multigrid: False builds standard `Conv2D`s (the baseline); True or
            "layer" makes block convolutions MultigridConv2D; "block" makes
            whole residual blocks V-cycles (`models.multigrid_block`).
        group_size: channels per group of the multigrid layers.
        coarsest_channels: the widest coarsest level, and the widest block
            convolution that stays dense (default `DENSE_CHANNELS`, 32, or
            `group_size` where that is larger).
        use_bias: whether block convolutions have a bias (keras.applications'
            ResNet does, MobileNetV2 does not).
        zero_init_residual: "auto" (every residual branch of a multigrid
            network starts at zero scale, none of a baseline's), False (no
            residual branch does), True (every one) or "multigrid" (those of
            multigrid blocks); see `residual_gamma`.
    """

    def __init__(
        self, multigrid, group_size, coarsest_channels, use_bias=False, zero_init_residual=False
    ):
        self.design = multigrid_design(multigrid)
        self.multigrid = self.design is not None
        self.group_size = _arguments.group_size(group_size)
        self.coarsest_channels = (
            max(DENSE_CHANNELS, self.group_size)
            if coarsest_channels is None
            else _arguments.positive_int("coarsest_channels", coarsest_channels)
        )
        self.use_bias = use_bias
        if not (
            isinstance(zero_init_residual, bool) or zero_init_residual in ("auto", "multigrid")
        ):
            raise ValueError(
                "Invalid value for argument `zero_init_residual`. Expected 'auto' (zero "
                "scale in every residual branch of a multigrid network), True, False or "
                "'multigrid' (in multigrid blocks only). "
                f"Received: zero_init_residual={zero_init_residual!r}."
            )
        self.zero_init_residual = zero_init_residual

    def zero_init(self, multigrid_block):
        """Whether a residual branch, of a multigrid block or not, starts at zero scale."""
        if self.zero_init_residual == "auto":
            return self.multigrid
        if self.zero_init_residual == "multigrid":
            return bool(multigrid_block)
        return self.zero_init_residual

    def residual_gamma(self, multigrid_block, zero_padded_shortcut=False):
        """The initializer of the scale of a residual branch's last BatchNormalization.

        A branch whose shortcut pads channels with zeros (the CIFAR ResNets'
        option A) starts at scale 1 whatever `zero_init_residual` says: started
        at zero, it would leave the padded channels at exactly 0 after the
        block's ReLU, whose gradient there is 0, so they would never learn.
        """
        zero = self.zero_init(multigrid_block) and not zero_padded_shortcut
        return "zeros" if zero else "ones"

    def projection_gamma(self, filters, residual):
        """The initializer of the scale of an inverted residual block's
        projection BatchNormalization (the MobileNets'): that of a residual
        branch where the block adds its input back, else 1."""
        return self.residual_gamma(self.is_multigrid(filters)) if residual else "ones"

    def is_multigrid(self, filters):
        """Whether a block convolution (layer design) or a block (block design)
        of this width becomes multigrid.

        Widths above `coarsest_channels` that are multiples of `group_size` do;
        the others stay full convolutions, which couple all their channels anyway.
        """
        return (
            self.multigrid and filters > self.coarsest_channels and filters % self.group_size == 0
        )

    def coarsest_width(self, filters):
        """The coarsest level for `filters`: channels halve while they stay
        above `coarsest_channels` and multiples of `group_size`."""
        width = filters
        while width > self.coarsest_channels and width % self.group_size == 0:
            width //= 2
        return width

    def check_widths(self, widths, model_name):
        """Refuses a `group_size` that would leave no multigrid layer in the model."""
        if self.multigrid and not any(self.is_multigrid(w) for w in widths):
            raise ValueError(
                f"{model_name}: `group_size` must divide the block widths "
                f"{sorted(set(widths))} above `coarsest_channels`, or the network "
                f"would have no multigrid layer: a narrow network needs a smaller "
                f"`coarsest_channels` (the default keeps widths up to "
                f"{DENSE_CHANNELS} dense). Received: group_size="
                f"{self.group_size}, coarsest_channels={self.coarsest_channels}."
            )


def conv(settings, filters, kernel_size, strides=1, padding="same", name=None):
    """A block convolution: MultigridConv2D in the layer design, else Conv2D."""
    if settings.design == "layer" and settings.is_multigrid(filters):
        return MultigridConv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=settings.use_bias,
            group_size=settings.group_size,
            coarsest_channels=settings.coarsest_width(filters),
            name=name,
        )
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=settings.use_bias,
        name=name,
    )


def check_factory_arguments(weights, include_top, pooling, classes, width):
    """keras.applications' checks, plus ours; raises ValueError naming the argument."""
    if weights == "imagenet":
        raise ValueError(
            "No pretrained ImageNet weights exist for multigrid networks, and none are "
            "downloaded for the baselines: pass weights=None to start from random "
            "weights, or the path of a weights file you trained. The baselines "
            "(multigrid=False) of ResNet50, MobileNetV2 and MobileNetV3 are "
            "keras.applications' networks, with the same layer names: for ImageNet "
            "weights, build keras.applications' model with weights='imagenet' and copy "
            "its weights into the baseline layer by layer. Received: weights='imagenet'."
        )
    if weights is not None and not (
        isinstance(weights, (str, os.PathLike)) and os.path.exists(weights)
    ):
        raise ValueError(
            "The `weights` argument should be None or the path to an existing "
            f"weights file. Received: weights={weights!r}."
        )
    if pooling not in (None, "avg", "max"):
        raise ValueError(
            f"The `pooling` argument should be None, 'avg' or 'max'. Received: pooling={pooling!r}."
        )
    if include_top and pooling is not None:
        raise ValueError(
            "`pooling` applies only to the feature extractor (include_top=False); "
            "with include_top=True the classifier pools globally. "
            f"Received: include_top=True, pooling={pooling!r}."
        )
    if include_top:
        _arguments.positive_int("classes", classes)
    positive_multiplier("width", width, "the block channels")


def positive_multiplier(name, value, what):
    """Returns `value` as a float if it is a finite number > 0, else raises."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a finite positive multiplier "
            f"of {what}. Received: {name}={value!r}."
        )
    return float(value)


def batch_norm_momentum(value):
    """Returns `value` as a float if it is a momentum in [0, 1), else raises.

    Keras' BatchNormalization takes any number, and NaN or a momentum above 1
    turns the moving statistics into NaN or an unbounded sum after one step.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(
            "Invalid value for argument `batch_norm_momentum`. Expected a number in "
            "[0, 1), the weight of the old moving statistics at each step. "
            f"Received: batch_norm_momentum={value!r}."
        )
    return float(value)


def model_inputs(input_shape, input_tensor, default_shape, min_size):
    """The input layer of a factory, from `input_shape` or `input_tensor`."""
    if (
        input_tensor is not None
        and input_shape is not None
        and not _compatible(tuple(input_shape), tuple(input_tensor.shape[1:]))
    ):
        # keras.applications refuses the conflict too.
        raise ValueError(
            "`input_shape` and `input_tensor` disagree: pass one of them, or the "
            f"shape of the tensor without its batch axis. Received: input_shape="
            f"{tuple(input_shape)}, input_tensor.shape={tuple(input_tensor.shape)}."
        )
    if input_shape is None:
        input_shape = default_shape if input_tensor is None else tuple(input_tensor.shape[1:])
    input_shape = tuple(input_shape)
    if (
        len(input_shape) != 3
        or input_shape[-1] is None
        or any(size is not None and size < min_size for size in input_shape[:2])
    ):
        raise ValueError(
            f"`input_shape` must be (height, width, channels) with known channels "
            f"and height and width of at least {min_size}. "
            f"Received: input_shape={input_shape}."
        )
    if input_tensor is None:
        return keras.Input(shape=input_shape), None
    if not keras.backend.is_keras_tensor(input_tensor):
        return keras.Input(tensor=input_tensor, shape=input_shape), input_tensor
    return input_tensor, input_tensor


def _compatible(shape, other):
    """Whether two shapes agree wherever both sizes are known."""
    return len(shape) == len(other) and all(
        a is None or b is None or a == b for a, b in zip(shape, other)
    )


def finish_model(
    inputs, input_tensor, x, include_top, pooling, classes, classifier_activation, weights, name
):
    """Adds the classifier or pooling, builds the model, loads `weights`.

    The model is a `PreciseBatchNormModel`: its `fit` leaves BatchNormalization
    statistics of the final weights, so that `fit` then `evaluate` scores the
    trained function (Keras' moving averages lag the weights; see its docstring).

    Under a mixed-precision policy the classifier computes in float32, as
    Keras' mixed precision guide advises: in float16 the softmax rounds the
    probabilities of unlikely classes, and the cross-entropy's gradient
    (-1 / p, times the loss scale) overflows. Measured (ResNet20, width 0.5,
    group size 8, mixed_float16, 38 Adam steps on the digits): with a float16
    classifier the loss scale fell to 32 and 10 steps were skipped (test
    accuracy 0.745), the baseline's to 2,048 with 4 skipped (0.868): the
    multigrid network's early predictions are more confident, its smallest
    probability of a true class 3e-3 against 2e-2.
    """
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        policy = keras.mixed_precision.global_policy()
        x = keras.layers.Dense(
            classes,
            activation=classifier_activation,
            dtype="float32" if policy.compute_dtype != "float32" else None,
            name="predictions",
        )(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    if input_tensor is not None:
        inputs = keras.utils.get_source_inputs(input_tensor)
    model = PreciseBatchNormModel(inputs, x, name=name)
    if weights is not None:
        try:
            model.load_weights(weights)
        except Exception as error:  # h5py and Keras fail in their own ways, types included.
            raise ValueError(
                f"The `weights` file cannot be loaded into {model.name} "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]}): it must be "
                f"weights saved from this model, e.g. with `model.save_weights` (a "
                f".weights.h5 file) or `model.save` (.keras). Received: weights={weights!r}."
            ) from None
    return model
