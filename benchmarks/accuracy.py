"""Accuracy against parameters: paired comparisons of multigrid designs with the baseline.

Three settings, all from scikit-learn's 1,797 handwritten digits (8x8,
10 classes, shipped in its wheel, so the benchmark runs offline):

- `digits`: 5-fold stratified cross-validation over all 1,797 images, repeated
  with 2 shuffles (10 runs a configuration); each fold trains on its
  training part less a stratified 10% that validates, and tests on its fold,
  so the runs of one repeat test every image once.
- `digits16-500`: harder: the images upscaled to 16x16 (bilinear), 500
  training images (50 of them validating) and the other 1,297 testing, over
  20 stratified random splits, each drawn from its own number (the setting
  had 5 at first, then 10, for the standard errors: a row recorded then has
  those until its others are run, and the runs column says how many a row
  has).
- `digits32`: the folds of `digits` with the images upscaled to 32x32
  (bilinear), for the MobileNets: they downsample 32-fold and refuse smaller
  inputs. Its cross-validation is repeated with 4 shuffles (20 runs), the
  first 2 those of `digits`: the MobileNets' runs spread more (the 2 repeats
  recorded first left standard errors of 0.3-1.1 points; a row recorded then
  has 10 runs until its others are run). Baseline and multigrid meet the same
  images, folds and seeds, and the upscaling adds no information to either,
  so the pairing is as fair as on `digits`; the MobileNets do not meet the
  8x8 and 16x16 settings.

Every design meets the same folds or splits with the same seed (the split's
number), so each comparison is paired: the table gives, for every
configuration, the mean over runs of its accuracy minus the baseline's of the
same network and width (and of the 1x baseline, for the widening claim), with
the standard error of that mean difference (std / sqrt(runs)); the design
with the layers of 32 channels or fewer dense (c=32) is also paired against
the same design with its coarsest level at the group size.

Networks: CIFAR ResNet20 at widths 1x, 2x and 4x, ResNet56 at 1x, and
MobileNetV3Small and MobileNetV2 (alpha 1.0) at 1x, these two as the
baseline and the factories' default multigrid network, that network with its
grouped kernels started at one group's fans ("fans=group",
`start_at_group_fans`), with the layers of 128 channels or fewer dense
(c=128), all three with every BatchNormalization scale at 1
(`zero_init_residual=False`, the factories' start when they were recorded),
and with the residual branches whose projection is multigrid started at zero
scale ("zero-init=multigrid", the factories' default for a while) or every
one ("zero-init", the factories' default now); and the baseline with every
residual branch started at zero scale ("baseline zero-init"). The
ResNets' designs: the baseline; the layer design (`MultigridConv2D`) at group sizes 8
and 16 and the block design at group size 8, each with its coarsest level at
the group size (the factories' default when the runs were recorded); and the
layer design at group size 8 with the layers of 32 channels or fewer dense
(`coarsest_channels=32`, the factories' default since), started at scale 1,
zero-started in its multigrid blocks (`zero_init_residual="multigrid"`, the
factories' default for a while) or in every block (`zero_init_residual="auto"`
for a multigrid network, the factories' default now). Training is the
plain Keras route a user takes: the factory model, `compile` with Adam
(learning rate 1e-3, cosine decay to 0 over the run, which settles the weights
and so the seed-to-seed spread), sparse categorical cross-entropy, `fit` with
batch 64 and shuffling, the factories' BatchNormalization momentum (Keras'
default 0.99 for the ResNets, keras.applications' 0.999 for the MobileNets). Not
`keras_mgconv.training.train`: it trains on TFDS splits, not on the folds of a
cross-validation.

Each run records the test accuracy of plain `evaluate` after `fit` (the
factories' `PreciseBatchNormModel` recomputes the BatchNormalization
statistics at the end of `fit`), of the same weights with the moving averages
Keras' `fit` alone would have left (the inference-mode gap), and with the
statistics recomputed on the whole training part; the validation and training
accuracies; parameters, multiply-adds, the training time and the time a step.

    nice -n 19 python benchmarks/accuracy.py                 # everything; resumes
    python benchmarks/accuracy.py --only 'ResNet20 1x'       # rows matching a regex
    python benchmarks/accuracy.py --report                   # rewrite results only

Every finished run is appended to `benchmarks/results/accuracy_runs.jsonl`
(one line, written whole): a run found there is not trained again, so an
interrupted benchmark continues where it stopped. After each run the results
are rewritten atomically: `accuracy.json` (runs and aggregates), `accuracy.md`
(the table) and `accuracy.png` (test accuracy against parameters).
"""

import argparse
import json
import math
import os
import re
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Cheapest first, so that partial results cover whole networks.
NETWORKS = (
    ("ResNet20", 1),
    ("ResNet20", 2),
    ("ResNet56", 1),
    ("ResNet20", 4),
    ("MobileNetV3Small", 1),
    ("MobileNetV2", 1),
)
# The MobileNets downsample 32-fold and take at least 32x32 images: they meet
# the digits upscaled to 32x32 (the same folds as `digits`), the ResNets the
# 8x8 and 16x16 settings their rows were recorded on.
MOBILENETS = ("MobileNetV3Small", "MobileNetV2")
# (design, multigrid, group size, coarsest_channels, zero_init_residual,
# initializer_fans). None
# is a coarsest level at the group size, the factories' default when these
# runs were recorded; c=32 keeps the layers of 32 channels or fewer dense, as
# the authors' code does and as the factories have done by default since
# (their `coarsest_channels=None`). The rows without zero-init start every
# BatchNormalization scale at 1 (`zero_init_residual=False`, the factories'
# default when they were recorded); the zero-init rows start the last one of
# every residual branch, standard or multigrid, at zero scale
# (`zero_init_residual=True`; for a multigrid network the factories' default
# now, "auto"), and "baseline zero-init" the standard network's, to tell what
# the start does for any ResNet from what it does for multigrid ones;
# "zero-init=multigrid" rows start the multigrid blocks' only
# (`zero_init_residual="multigrid"`, the factories' default before "auto"). The
# multigrid layers' Glorot kernels count their fans over all groups, as Keras
# does (the factories' start, "layer"), except in the "fans=group" rows, which
# count those of one group ("group", `start_at_group_fans`).
DESIGNS = (
    ("baseline", False, None, None, False, "layer"),
    ("layer", "layer", 8, None, False, "layer"),
    ("block", "block", 8, None, False, "layer"),
    ("layer", "layer", 16, None, False, "layer"),
    ("layer", "layer", 8, 32, False, "layer"),
    ("layer", "layer", 8, 32, True, "layer"),
    ("block", "block", 8, None, True, "layer"),
    ("baseline", False, None, None, True, "layer"),
    ("layer", "layer", 8, 32, "multigrid", "layer"),
)
# The MobileNets' rows: the baseline and the factories' multigrid network
# started at scale 1 (their default when it was recorded), the latter with its
# kernels at the fans of one group (does the small start cost MobileNetV2 its
# accuracy?), and with the layers of 128 channels or fewer dense (more
# parameters: does capacity?), and with its multigrid residual branches
# started at zero scale (the factories' default before "auto"), and with
# every one started so (the dense ones too, the factories' default now); and
# the baseline with every residual branch started at zero scale
# (does the zero start help any MobileNet under this recipe, or the multigrid
# ones?).
MOBILENET_DESIGNS = (
    ("baseline", False, None, None, False, "layer"),
    ("baseline", False, None, None, True, "layer"),
    ("layer", "layer", 8, 32, False, "layer"),
    ("layer", "layer", 8, 32, False, "group"),
    ("layer", "layer", 8, 128, False, "layer"),
    ("layer", "layer", 8, 32, "multigrid", "layer"),
    ("layer", "layer", 8, 32, True, "layer"),
)
SETTINGS = {
    "digits": {"image_size": 8, "epochs": 15, "repeats": 2, "folds": 5},
    "digits16-500": {"image_size": 16, "epochs": 30, "splits": 20, "train_size": 500},
    "digits32": {"image_size": 32, "epochs": 15, "repeats": 4, "folds": 5},
}


def network_settings(model):
    """The settings a network is measured on: 32x32 images for the MobileNets."""
    return ("digits32",) if model in MOBILENETS else ("digits", "digits16-500")


BATCH_SIZE = 64
LEARNING_RATE = 1e-3
VALIDATION_FRACTION = 0.1
# Epochs of linear learning-rate warm-up from 0 before the cosine decay.
WARMUP_EPOCHS = 0
# The most training steps in one call of fit's compiled function: the same
# steps, with less per-call overhead (a divisor of the epoch, as `train` uses).
MAX_STEPS_PER_EXECUTION = 20


def design_label(
    design, group_size=None, coarsest_channels=None, zero_init=False, initializer_fans="layer"
):
    """E.g. "layer s=8", "layer s=8 c=32 zero-init", "... zero-init=multigrid fans=group"."""
    return (
        design
        + ("" if group_size is None else f" s={group_size}")
        + ("" if coarsest_channels is None else f" c={coarsest_channels}")
        + (" zero-init" if zero_init else "")
        + ("=multigrid" if zero_init == "multigrid" else "")
        + ("" if initializer_fans == "layer" else f" fans={initializer_fans}")
    )


def coarsest_channels(config):
    """The coarsest width a configuration's network was built with: None is the group size."""
    return config["coarsest_channels"] or config["group_size"]


def shown_design(row):
    """A row's design as the report shows it, its coarsest level always named ("layer s=8 c=8")."""
    return design_label(
        row["design"],
        row["group_size"],
        coarsest_channels(row),
        row["zero_init"],
        row["initializer_fans"],
    )


def label(
    model,
    width,
    design,
    group_size=None,
    coarsest_channels=None,
    zero_init=False,
    initializer_fans="layer",
):
    """E.g. "ResNet20 2x layer s=8" or "ResNet56 1x baseline"."""
    shown = design_label(design, group_size, coarsest_channels, zero_init, initializer_fans)
    return f"{model} {width}x {shown}"


def configurations():
    return [
        {
            "model": model,
            "width": width,
            "design": design,
            "multigrid": multigrid,
            "group_size": group_size,
            "coarsest_channels": coarsest,
            "zero_init": zero_init,
            "initializer_fans": fans,
            "label": label(model, width, design, group_size, coarsest, zero_init, fans),
        }
        for model, width in NETWORKS
        for design, multigrid, group_size, coarsest, zero_init, fans in (
            MOBILENET_DESIGNS if model in MOBILENETS else DESIGNS
        )
    ]


def splits(setting, labels):
    """(split id, seed, train, validation, test indices) of a setting, all designs alike."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    spec = SETTINGS[setting]
    everything = np.arange(len(labels))
    if "folds" in spec:
        for repeat in range(spec["repeats"]):
            folds = StratifiedKFold(spec["folds"], shuffle=True, random_state=repeat)
            for fold, (training, test) in enumerate(folds.split(everything, labels)):
                train, validation = train_test_split(
                    training,
                    test_size=VALIDATION_FRACTION,
                    stratify=labels[training],
                    random_state=repeat,
                )
                yield (
                    f"repeat{repeat}-fold{fold}",
                    repeat * spec["folds"] + fold,
                    train,
                    validation,
                    test,
                )
    else:
        for split in range(spec["splits"]):
            training, test = train_test_split(
                everything, train_size=spec["train_size"], stratify=labels, random_state=split
            )
            train, validation = train_test_split(
                training,
                test_size=VALIDATION_FRACTION,
                stratify=labels[training],
                random_state=split,
            )
            yield f"split{split}", split, train, validation, test


def load_images(image_size):
    """The digits as float32 in [0, 1], (1797, size, size, 1), and their labels."""
    import tensorflow as tf
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[..., None] / 16).astype("float32")
    if image_size != 8:
        images = tf.image.resize(images, (image_size, image_size)).numpy()
    return images, digits.target


def protocol(warmup_epochs):
    """What a run's numbers depend on beyond its configuration and split.

    Runs of another protocol are kept in the runs file but neither count as
    done nor enter the tables. Steps per execution change no number, so they
    are not part of it.
    """
    return {
        "optimizer": "adam",
        "learning_rate": LEARNING_RATE,
        "batch_size": BATCH_SIZE,
        "schedule": "cosine",
        "warmup_epochs": warmup_epochs,
    }


def run_protocol(run):
    """The protocol of a recorded run (the first runs, without warm-up, predate the field)."""
    return run.get("protocol", protocol(0))


# The compiled models of this process, one per configuration and schedule:
# a run of one retraces nothing (see `_compiled_model`).
_COMPILED = {}


def _compiled_model(config, input_shape, steps_per_epoch, steps, warmup_steps):
    """The configuration's network, freshly initialised, compiled for a run of `steps`.

    Tracing the training, evaluation and prediction functions took 30-45% of a
    run's wall time (ResNet20 on the 8x8 digits), so a process keeps one
    compiled model per configuration and schedule: each run copies in the
    weights of a new model built under the run's seed, which a fresh build would
    have, and zeroes the optimizer's state and step counter.
    """
    import keras_mgconv
    from keras_mgconv._keras import keras
    from keras_mgconv.training import steps_per_execution

    factory = getattr(keras_mgconv.models, config["model"])
    extra = (
        {}
        if config["group_size"] is None
        else {"group_size": config["group_size"], "coarsest_channels": coarsest_channels(config)}
    )
    extra["zero_init_residual"] = config["zero_init"]
    if config["model"].startswith("MobileNetV3"):
        # The images are already in [0, 1]: no rescaling of 0-255 pixels inside.
        extra["include_preprocessing"] = False
    fresh = factory(
        input_shape=input_shape,
        classes=10,
        classifier_activation=None,
        multigrid=config["multigrid"],
        width=config["width"],
        **extra,
    )
    if config["initializer_fans"] == "group":
        start_at_group_fans(fresh)
    key = (config["label"], input_shape, steps_per_epoch, steps, warmup_steps)
    model = _COMPILED.get(key)
    if model is None:
        learning_rate = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup_steps else LEARNING_RATE,
            steps - warmup_steps,
            warmup_target=LEARNING_RATE if warmup_steps else None,
            warmup_steps=warmup_steps,
        )
        fresh.compile(
            keras.optimizers.Adam(learning_rate),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            steps_per_execution=steps_per_execution(steps_per_epoch, MAX_STEPS_PER_EXECUTION),
        )
        _COMPILED[key] = fresh
        return fresh
    model.set_weights(fresh.get_weights())
    for variable in model.optimizer.variables:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    return model


def start_at_group_fans(model):
    """Scales the Glorot kernels of `model`'s MultigridConv2D layers to one group's fans.

    Keras' Glorot initialiser counts a grouped kernel's fan-out over all its
    output channels, though each group's outputs see only that group's inputs:
    a 1x1 connector of 80 groups from 960 to 160 channels (MobileNetV2's last
    projections) starts 12x smaller in variance than the `Conv2D` it replaces.
    Each connector and smoother kernel (the coarsest is never grouped) is
    multiplied by the square root of `(fan_in + fan_out) / (fan_in + fan_out /
    groups)`, which gives it the variance Glorot gives one group's kernel (the
    "fans=group" rows).
    """
    import keras_mgconv
    from keras_mgconv._keras import keras

    for layer in model.layers:
        if not isinstance(layer, keras_mgconv.MultigridConv2D):
            continue
        for convolution in [layer.connector, *layer.smoothers]:
            if convolution is None or convolution.groups == 1:
                continue
            kh, kw, inputs, outputs = convolution.kernel.shape
            fan_in, fan_out = kh * kw * inputs, kh * kw * outputs
            factor = (fan_in + fan_out) / (fan_in + fan_out / convolution.groups)
            kernel = keras.ops.convert_to_numpy(convolution.kernel)
            convolution.kernel.assign(kernel * np.float32(math.sqrt(factor)))
    return model


def train_one(
    config, setting, seed, train, validation, test, images, labels, warmup_epochs=WARMUP_EPOCHS
):
    """Fits one configuration on one split; returns its record.

    The record's `time_breakdown` splits the run's wall time into building
    the model, the first execution of the training function (with its
    tracing, in the process's first run of the configuration), the other
    training steps, the recomputation of the BatchNormalization statistics at
    the end of `fit`, and the evaluations after it.
    """
    import tensorflow as tf

    import keras_mgconv
    from keras_mgconv import batch_norm
    from keras_mgconv._keras import keras

    spec = SETTINGS[setting]
    clock = time.perf_counter
    start = clock()
    keras.utils.set_random_seed(seed)
    steps_per_epoch = math.ceil(len(train) / BATCH_SIZE)
    steps = spec["epochs"] * steps_per_epoch
    model = _compiled_model(
        config, images.shape[1:], steps_per_epoch, steps, warmup_epochs * steps_per_epoch
    )
    per_execution = model.steps_per_execution
    # The same seed again: the shuffling of fit draws after the initialisation.
    keras.utils.set_random_seed(seed)
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    moving = {}
    times = {"build": clock() - start}

    class Timeline(keras.callbacks.Callback):
        # Listed before the model's own recomputation, which runs at the end of fit.
        def on_train_begin(self, logs=None):
            self.begin = clock()

        def on_train_batch_end(self, batch, logs=None):
            if "first_execution" not in times:
                times["first_execution"] = clock() - self.begin

        def on_train_end(self, logs=None):
            times["steps"] = clock() - self.begin - times["first_execution"]
            self.end = clock()
            moving["statistics"] = [
                (layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in layers
            ]

    timeline = Timeline()
    history = model.fit(
        images[train],
        labels[train],
        batch_size=BATCH_SIZE,
        epochs=spec["epochs"],
        verbose=0,
        callbacks=[timeline],
    )
    times["recomputation"] = clock() - timeline.end
    train_time = clock() - timeline.begin
    evaluations = clock()

    def accuracy(indices):
        return float(
            model.evaluate(
                images[indices], labels[indices], batch_size=256, verbose=0, return_dict=True
            )["accuracy"]
        )

    record = {"test_accuracy": accuracy(test), "validation_accuracy": accuracy(validation)}
    fitted = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in layers]
    for layer, (mean, variance) in zip(layers, moving["statistics"]):
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(variance)
    record["test_accuracy_moving_averages"] = accuracy(test)
    batch_norm.recompute_batch_norm_statistics(
        model,
        tf.data.Dataset.from_tensor_slices(images[train])
        .shuffle(len(train), seed=seed)
        .batch(BATCH_SIZE),
    )
    record["test_accuracy_recomputed"] = accuracy(test)
    for layer, (mean, variance) in zip(layers, fitted):
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(variance)
    times["evaluations"] = clock() - evaluations
    times["total"] = clock() - start
    # Steady steps: all but the first execution, whose time is mostly tracing.
    steady_steps = steps - per_execution
    record.update(
        train_accuracy=float(history.history["accuracy"][-1]),
        parameters=model.count_params(),
        multiply_adds=keras_mgconv.count_multiply_adds(model),
        train_time=train_time,
        steps=steps,
        steps_per_execution=per_execution,
        step_time=times["steps"] / steady_steps if steady_steps else float("nan"),
        time_breakdown=times,
        protocol=protocol(warmup_epochs),
    )
    return record


def breakdown(record):
    """One line: where the run's wall time went, in seconds and shares."""
    times = record["time_breakdown"]
    parts = ("build", "first_execution", "steps", "recomputation", "evaluations")
    return (
        ", ".join(
            f"{part} {times[part]:.1f} s ({100 * times[part] / times['total']:.0f}%)"
            for part in parts
        )
        + f"; total {times['total']:.1f} s"
    )


def read_runs(path):
    if not os.path.exists(path):
        return []
    with open(path) as file:
        # Every line is written whole with its newline; a run killed while
        # writing leaves a last line without one, which is dropped (and rerun).
        lines = file.read().split("\n")[:-1]
    return [json.loads(line) for line in lines]


def _mean_se(values):
    if len(values) < 2:
        return statistics.mean(values), float("nan")
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def aggregate(runs):
    """One row per (setting, configuration) with runs, paired against the baselines."""
    by_key = {}
    for run in runs:
        by_key.setdefault((run["setting"], run["label"]), {})[run["split"]] = run
    rows = []
    for config in configurations():
        for setting in SETTINGS:
            mine = by_key.get((setting, config["label"]))
            if not mine:
                continue
            row = {**config, "setting": setting, "runs": len(mine)}
            first = next(iter(mine.values()))
            row.update(parameters=first["parameters"], multiply_adds=first["multiply_adds"])
            for key in (
                "test_accuracy",
                "test_accuracy_moving_averages",
                "test_accuracy_recomputed",
                "validation_accuracy",
                "step_time",
                "train_time",
            ):
                values = [run[key] for run in mine.values()]
                row[key] = statistics.mean(values)
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row["inference_gap"], row["inference_gap_se"] = _mean_se(
                [run["test_accuracy_recomputed"] - run["test_accuracy"] for run in mine.values()]
            )
            row["moving_average_gap"], row["moving_average_gap_se"] = _mean_se(
                [
                    run["test_accuracy_recomputed"] - run["test_accuracy_moving_averages"]
                    for run in mine.values()
                ]
            )
            references = {
                "same_width": label(config["model"], config["width"], "baseline"),
                "1x": label(config["model"], 1, "baseline"),
            }
            if config["initializer_fans"] != "layer":
                # The same design with Keras' count of the fans.
                references["fans_layer"] = label(
                    config["model"],
                    config["width"],
                    config["design"],
                    config["group_size"],
                    config["coarsest_channels"],
                    config["zero_init"],
                )
            elif config["zero_init"]:
                # The same design starting every scale at 1.
                references["without_zero_init"] = label(
                    config["model"],
                    config["width"],
                    config["design"],
                    config["group_size"],
                    config["coarsest_channels"],
                )
            elif config["coarsest_channels"] is not None:
                # The same design with its coarsest level at the group size.
                references["coarsest_at_group_size"] = label(
                    config["model"], config["width"], config["design"], config["group_size"]
                )
            if config["zero_init"] and config["design"] != "baseline":
                # The baseline with its residual branches started at zero too:
                # what the design costs at a like start.
                references["baseline_zero_init"] = label(
                    config["model"], config["width"], "baseline", zero_init=True
                )
            if config["zero_init"] is True and config["design"] == "layer":
                # The same design with its multigrid branches only started at
                # zero (the factories' default): what starting the dense ones
                # at zero too does.
                references["zero_init_multigrid"] = label(
                    config["model"],
                    config["width"],
                    config["design"],
                    config["group_size"],
                    config["coarsest_channels"],
                    "multigrid",
                )
            if config["design"] == "block":
                # The default layer design with the same start: at c=8 every
                # block is multigrid, so the block design's zero start is
                # every branch's.
                references["layer_design"] = label(
                    config["model"], config["width"], "layer", 8, 32, config["zero_init"]
                )
            for name, reference in references.items():
                base = by_key.get((setting, reference), {})
                common = sorted(set(mine) & set(base))
                if len(common) >= 2:
                    row[f"difference_{name}"], row[f"difference_{name}_se"] = _mean_se(
                        [mine[s]["test_accuracy"] - base[s]["test_accuracy"] for s in common]
                    )
                    row[f"difference_{name}_runs"] = len(common)
            rows.append(row)
    return rows


# The paired comparisons listed under each setting's table besides the baselines:
# (reference in `aggregate`, heading).
PAIRED_LISTS = (
    (
        "coarsest_at_group_size",
        "Against the same design with its coarsest level at the group size "
        "(the factories' default when these runs were recorded), paired:",
    ),
    (
        "layer_design",
        "The block design against the default layer design (s=8 c=32) with the same start, paired:",
    ),
    (
        "fans_layer",
        "Kernels at the fans of one group against Keras' count over all groups, the same "
        "design otherwise, paired:",
    ),
    (
        "without_zero_init",
        "Zero-init against the same design with every BatchNormalization scale starting at 1, "
        "paired:",
    ),
    (
        "zero_init_multigrid",
        "Every residual branch started at zero scale against the multigrid ones only "
        "(zero-init=multigrid), the same design otherwise, paired:",
    ),
    (
        "baseline_zero_init",
        "Zero-init against the baseline with every residual branch started at zero scale "
        "(baseline zero-init), paired:",
    ),
)


def _difference(row, name):
    if f"difference_{name}" not in row:
        return "-"
    return (
        f"{100 * row[f'difference_{name}']:+.2f} ± {100 * row[f'difference_{name}_se']:.2f}"
        f" ({row[f'difference_{name}_runs']})"
    )


def markdown(rows):
    lines = []
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting]
        if not mine:
            continue
        lines += [
            f"### {setting}",
            "",
            "| network | design | runs | params | MACs | test acc. % (fit + evaluate) | "
            "paired diff. vs same-width baseline (runs) | paired diff. vs 1x baseline (runs) | "
            "moving averages acc. % | gap to recomputed (points) | s/step |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in mine:
            lines.append(
                f"| {r['model']} {r['width']}x | {shown_design(r)} | {r['runs']} | "
                f"{r['parameters'] / 1e6:.3f}M | {r['multiply_adds'] / 1e6:.1f}M | "
                f"{100 * r['test_accuracy']:.2f} ± {100 * r['test_accuracy_std']:.2f} | "
                f"{_difference(r, 'same_width')} | {_difference(r, '1x')} | "
                f"{100 * r['test_accuracy_moving_averages']:.2f} | "
                f"{100 * r['inference_gap']:+.2f} ± {100 * r['inference_gap_se']:.2f} | "
                f"{r['step_time']:.3f} |"
            )
        lines.append("")
        for reference, heading in PAIRED_LISTS:
            paired = [r for r in mine if f"difference_{reference}" in r]
            if paired:
                lines += [heading, ""]
                lines += [
                    f"- {r['model']} {r['width']}x {shown_design(r)}: {_difference(r, reference)}"
                    for r in paired
                ]
                lines.append("")
    lines.append(
        "Accuracies: mean ± std over runs. Paired differences: mean ± standard error over "
        "the runs both configurations finished, in points. Moving averages: the same weights "
        "with the BatchNormalization statistics Keras' `fit` alone leaves. Gap: accuracy "
        "with statistics recomputed on the whole training part minus fit + evaluate."
    )
    return "\n".join(lines) + "\n"


def plot(rows, path):
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    figure, all_axes = plt.subplots(
        1, max(1, len(settings)), figsize=(7 * max(1, len(settings)), 5), squeeze=False
    )
    for axes, setting in zip(all_axes[0], settings):
        lines = {}
        for r in rows:
            if r["setting"] == setting:
                lines.setdefault((r["model"], r["design"], shown_design(r)), []).append(r)
        for (model, design, name), points in sorted(
            lines.items(), key=lambda item: tuple(map(str, item[0]))
        ):
            points.sort(key=lambda r: r["parameters"])
            axes.errorbar(
                [r["parameters"] for r in points],
                [100 * r["test_accuracy"] for r in points],
                yerr=[100 * r["test_accuracy_std"] / math.sqrt(r["runs"]) for r in points],
                marker="o" if model == "ResNet20" else "s",
                capsize=3,
                linestyle="--" if design == "baseline" else "-",
                label=f"{model} {name}",
            )
            for r in points:
                axes.annotate(
                    f"{r['width']}x",
                    (r["parameters"], 100 * r["test_accuracy"]),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=7,
                )
        axes.set_xscale("log")
        millions = ticker.FuncFormatter(lambda value, _: f"{value / 1e6:g}M")
        axes.xaxis.set_major_formatter(millions)
        axes.xaxis.set_minor_formatter(millions)
        axes.set_title(setting)
        axes.set_xlabel("parameters")
        axes.set_ylabel("test accuracy (%), mean ± standard error")
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=7)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def write_results(runs, output, current):
    """Rewrites the tables and the plot from the runs of protocol `current`."""
    from keras_mgconv._files import atomic_write

    runs = [run for run in runs if run_protocol(run) == current]
    rows = aggregate(runs)
    table = markdown(rows)
    content = {"settings": SETTINGS, "protocol": current, "configurations": rows, "runs": runs}

    def write_json(temporary):
        with open(temporary, "w") as file:
            json.dump(content, file, indent=1)

    def write_markdown(temporary):
        with open(temporary, "w") as file:
            file.write(table)

    atomic_write(output + ".json", write_json)
    atomic_write(output + ".md", write_markdown)
    atomic_write(output + ".png", lambda temporary: plot(rows, temporary))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="configurations whose label matches one of these regexes",
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--warmup-epochs",
        type=int,
        default=WARMUP_EPOCHS,
        help="epochs of linear learning-rate warm-up (a protocol of its own)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print where each run's wall time goes"
    )
    parser.add_argument("--report", action="store_true", help="rewrite the results only")
    parser.add_argument(
        "--output",
        default=os.path.join(RESULTS, "accuracy"),
        help="path prefix of the .json/.md/.png results and the runs file",
    )
    args = parser.parse_args(argv)
    if args.warmup_epochs < 0:
        parser.error(f"--warmup-epochs must be >= 0. Received: {args.warmup_epochs}")
    current = protocol(args.warmup_epochs)
    runs_path = args.output + "_runs.jsonl"
    runs = read_runs(runs_path)
    if args.report:
        print(write_results(runs, args.output, current))
        return
    selected = [
        c
        for c in configurations()
        if not args.only or any(re.search(p, c["label"]) for p in args.only)
    ]
    if not selected:
        parser.error(f"no configuration matches --only {args.only}")
    os.makedirs(os.path.dirname(os.path.abspath(runs_path)), exist_ok=True)
    done = {(r["setting"], r["label"], r["split"]) for r in runs if run_protocol(r) == current}
    start = time.perf_counter()
    for network in NETWORKS:
        for setting in [s for s in args.settings if s in network_settings(network[0])]:
            images, labels = load_images(SETTINGS[setting]["image_size"])
            for split, seed, train, validation, test in splits(setting, labels):
                for config in selected:
                    if (config["model"], config["width"]) != network or (
                        setting,
                        config["label"],
                        split,
                    ) in done:
                        continue
                    print(
                        f"{setting} {split} {config['label']} "
                        f"({time.perf_counter() - start:.0f} s so far)",
                        flush=True,
                    )
                    record = {
                        "setting": setting,
                        "label": config["label"],
                        "split": split,
                        "seed": seed,
                        **train_one(
                            config,
                            setting,
                            seed,
                            train,
                            validation,
                            test,
                            images,
                            labels,
                            args.warmup_epochs,
                        ),
                    }
                    with open(runs_path, "a") as file:
                        file.write(json.dumps(record) + "\n")
                    runs.append(record)
                    print(
                        f"  test {record['test_accuracy']:.4f}, moving averages "
                        f"{record['test_accuracy_moving_averages']:.4f}, "
                        f"{record['step_time']:.3f} s/step",
                        flush=True,
                    )
                    if args.profile:
                        print(f"  {breakdown(record)}", flush=True)
                    write_results(runs, args.output, current)


if __name__ == "__main__":
    main()
