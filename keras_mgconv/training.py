"""Training and evaluation on tensorflow-datasets: the Python side of `keras-mgconv train`.

    from keras_mgconv import training
    summary = training.train("ResNet20", "digits", epochs=15, output_dir="runs/digits")
    training.evaluate("runs/digits/best.keras", "digits")

`train` builds a factory model (baseline, or multigrid in the layer or the
block design) with the dataset's per-channel normalisation as its first layer,
and trains it with `model.fit` on the training data less a validation split
(the dataset's own validation split where it has one, else a fixed,
stratified 10% of its train split). The validation accuracy chooses the
checkpoint; the test split is evaluated only after training, to report. It
writes to `output_dir`:

- `last.keras`: model and optimizer after the latest epoch, written atomically,
  its BatchNormalization statistics recomputed for its weights
  (`keras_mgconv.batch_norm`), as are those of every checkpoint and of the
  model that validation judges;
- `best.keras`: the epoch with the best validation accuracy so far;
- `history.csv`: one row per epoch: training and validation losses and
  accuracies, and the epoch time;
- `logs/`: TensorBoard logs;
- `config.json`: the arguments of the run;
- `summary.json`: parameters, multiply-adds, the selected epoch and how it was
  selected, the test accuracy of the final and of the selected model (and of
  the final one with BatchNormalization using each test batch's statistics),
  epoch times. It is written last: a directory holds a finished run exactly
  when it has one.

A run that stops early (Ctrl-C, a killed process, a lost machine) is resumed by
calling `train` again with the same arguments and `output_dir`: it reloads
`last.keras` with its optimizer state and continues with the next epoch. A
second run into an `output_dir` that a live run is using is refused.
"""

import contextlib
import csv
import dataclasses
import functools
import glob
import inspect
import json
import math
import numbers
import os
import shutil
import sys
import tempfile
import time
import zipfile

import tensorflow as tf

from keras_mgconv import data, models
from keras_mgconv._files import (
    DirectoryLockedError,
    atomic_write,
    directory_lock,
    remove_stale_temporaries,
)
from keras_mgconv._keras import keras
from keras_mgconv.batch_norm import PreciseBatchNormalization
from keras_mgconv.complexity import count_multiply_adds
from keras_mgconv.layers import _arguments
from keras_mgconv.models.common import ConvSettings, multigrid_design
from keras_mgconv.schedules import LinearWarmup

MODELS = {
    "ResNet20": models.ResNet20,
    "ResNet32": models.ResNet32,
    "ResNet44": models.ResNet44,
    "ResNet56": models.ResNet56,
    "ResNet110": models.ResNet110,
    "ResNet18": models.ResNet18,
    "ResNet34": models.ResNet34,
    "ResNet50": models.ResNet50,
    "MobileNetV2": models.MobileNetV2,
    # The pipeline normalises the images: no rescaling of [0, 255] pixels inside.
    "MobileNetV3Small": functools.partial(models.MobileNetV3Small, include_preprocessing=False),
    "MobileNetV3Large": functools.partial(models.MobileNetV3Large, include_preprocessing=False),
}
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")

# Epochs of learning-rate warm-up by default (at most a fifth of the run).
_WARMUP_EPOCHS = 2

# The step schedule divides the learning rate by 10 at these fractions of the run.
_STEP_BOUNDARIES = (0.5, 0.75)

_CHECKPOINT_NAMES = ("last.keras", "best.keras", "history.csv", "config.json", "summary.json")

# Held in `output_dir` while a run writes there.
_LOCK_NAME = ".train.lock"

# The TensorBoard logs' folder in `output_dir`.
_LOGS_NAME = "logs"

# Training batches whose statistics replace the BatchNormalization moving
# averages after every epoch: 50 batches of 64 estimate a channel's mean to
# about 2% of its standard deviation, and cost a third of a 150-step epoch.
_BATCH_NORM_STATISTICS_STEPS = 50

# The most training steps in one call of `fit`'s compiled function (see
# `steps_per_execution`).
_MAX_STEPS_PER_EXECUTION = 20

# With verbose="auto", epochs whose progress bar would move fewer times than
# this (once per execution of the compiled function) print one line each instead.
_MIN_PROGRESS_UPDATES = 10


def _number(name, value, expected, accept):
    """Returns `value` if it is a finite real number that `accept`s, else raises."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not accept(value)
    ):
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected {expected}. Received: {name}={value!r}."
        )
    return value


def make_strategy(name):
    """The `tf.distribute.Strategy` called `name`.

    "default" is the current strategy (one device); "mirrored" replicates over
    this machine's GPUs (or its CPU); "multi_worker" is a
    `MultiWorkerMirroredStrategy` configured from the TF_CONFIG environment
    variable; "tpu" connects to the TPU this machine can reach.
    """
    _arguments.choice("strategy", name, STRATEGIES)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "strategy='multi_worker' reads the cluster from the TF_CONFIG "
                "environment variable, which is not set. Received: strategy='multi_worker'."
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError) as error:
        raise ValueError(
            f"No TPU found to train on ({str(error).splitlines()[0]}). Received: strategy='tpu'."
        ) from None
    return tf.distribute.TPUStrategy(resolver)


def auto_batch_norm_momentum(steps_per_epoch):
    """BatchNorm momentum whose moving statistics forget their start within a tenth of an epoch.

    Keras' default 0.99 averages over about 100 steps; a short run on a small
    dataset (the digits: 20 steps an epoch) then evaluates with statistics
    still dominated by their initial values. The horizon 1 / (1 - momentum) is
    kept at most a tenth of an epoch, with momentum between 0.9 and 0.99.
    """
    return min(0.99, max(0.9, 1 - 10 / steps_per_epoch))


def _learning_rate(schedule, learning_rate, epochs, steps_per_epoch, warmup_epochs):
    """The run's learning rate: `schedule` over the steps after the warm-up, if any."""
    warmup = warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch - warmup
    if schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=total)
    elif schedule == "step":
        rate = keras.optimizers.schedules.PiecewiseConstantDecay(
            [int(total * fraction) for fraction in _STEP_BOUNDARIES],
            [learning_rate, learning_rate / 10, learning_rate / 100],
        )
    else:
        rate = learning_rate
    return LinearWarmup(rate, warmup) if warmup else rate


def _optimizer(name, learning_rate, momentum, weight_decay):
    if name == "sgd":
        return keras.optimizers.SGD(
            learning_rate, momentum=momentum, nesterov=True, weight_decay=weight_decay or None
        )
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, weight_decay=weight_decay or None)
    return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)


def _write_json(path, content):
    def write(temporary):
        with open(temporary, "w") as file:
            json.dump(content, file, indent=2)
            file.write("\n")

    atomic_write(path, write)


class _EpochTimer(keras.callbacks.Callback):
    """Adds `epoch_time` (seconds) to the epoch's logs, for the CSV history."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["epoch_time"] = time.perf_counter() - self._start


class _Checkpoints(keras.callbacks.Callback):
    """Saves `last.keras` every epoch, and copies it to `best.keras` when validation improves.

    Not keras.callbacks.ModelCheckpoint: it writes in place, and a process
    killed during the write leaves a truncated file that resuming would load.
    A process killed between the two writes leaves the best epoch in
    `last.keras` alone, which `_restore_best` repairs on resuming.
    """

    def __init__(self, run_dir, best_accuracy):
        super().__init__()
        self.run_dir = run_dir
        self.best_accuracy = best_accuracy

    def on_epoch_end(self, epoch, logs=None):
        last = os.path.join(self.run_dir, "last.keras")
        atomic_write(last, self.model.save)
        if logs["val_accuracy"] > self.best_accuracy:
            self.best_accuracy = logs["val_accuracy"]
            _copy(last, os.path.join(self.run_dir, "best.keras"))


def _copy(source, target):
    atomic_write(target, lambda temporary: shutil.copyfile(source, temporary))


def _damaged(output_dir, damage):
    return ValueError(
        f"The unfinished run in `output_dir` cannot be resumed: {damage}. Pass "
        f"overwrite=True (`--overwrite`) to start it again, or choose another directory. "
        f"Received: output_dir={output_dir!r}."
    )


def _read_history(path, epochs_done):
    """The CSV history's rows for the completed epochs, one for each.

    A killed run may have logged one epoch more than its checkpoint holds, or
    part of a row.

    Raises:
        ValueError: the history is missing, unreadable or lacks an epoch.
    """
    if epochs_done == 0:
        return []
    output_dir = os.path.dirname(path)
    if not os.path.exists(path):
        raise _damaged(
            output_dir, f"{path}, the history of its {epochs_done} completed epochs, is missing"
        )
    try:
        with open(path, newline="") as file:
            rows = [
                row
                for row in csv.DictReader(file)
                if None not in row.values() and int(row["epoch"]) < epochs_done
            ]
        for row in rows:
            float(row["val_accuracy"]), float(row["epoch_time"])
    except (KeyError, ValueError, csv.Error) as error:
        raise _damaged(
            output_dir, f"{path} cannot be read ({type(error).__name__}: {str(error)[:200]})"
        ) from None
    epochs = [int(row["epoch"]) for row in rows]
    if epochs != list(range(epochs_done)):
        raise _damaged(
            output_dir,
            f"{path} should hold one row for each of the "
            f"{epochs_done} completed epochs; it holds epochs {epochs}",
        )
    return rows


def _rewrite_history(path, rows):
    if not rows:
        if os.path.exists(path):
            os.remove(path)
        return

    def write(temporary):
        with open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def _selected_epoch(history):
    """The index of the first epoch of best validation accuracy: the one `_Checkpoints` keeps."""
    accuracies = [float(row["val_accuracy"]) for row in history]
    return accuracies.index(max(accuracies))


def _restore_best(output_dir, run_dir, history):
    """Makes `run_dir/best.keras` the model of the epoch `history` selects.

    That is `output_dir/last.keras` when the selected epoch is the last one
    completed (an interrupted run may not have copied it yet), else
    `output_dir/best.keras`.
    """
    if not history:
        return
    latest = _selected_epoch(history) == len(history) - 1
    source = os.path.join(output_dir, "last.keras" if latest else "best.keras")
    if not zipfile.is_zipfile(source):
        raise _damaged(
            output_dir,
            f"{source}, the model of epoch {_selected_epoch(history) + 1}, is missing or truncated",
        )
    target = os.path.join(run_dir, "best.keras")
    if source != target:
        _copy(source, target)


def _writable_output_dir(output_dir):
    """`output_dir` as an absolute path, refused if it cannot be created or written."""
    if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
        raise ValueError(f"`output_dir` must be a path. Received: output_dir={output_dir!r}.")
    output_dir = os.path.abspath(output_dir)
    existing = output_dir
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.exists(existing):
        raise ValueError(
            f"`output_dir` cannot be created: {existing} is a symbolic link to "
            f"{os.readlink(existing)}, which does not exist. Received: output_dir={output_dir!r}."
        )
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"`output_dir` cannot be written: {existing} is not a writable directory. "
            f"Received: output_dir={output_dir!r}."
        )
    return output_dir


@contextlib.contextmanager
def _output_dir_lock(output_dir):
    """Keeps any other run from writing into `output_dir` while this one does.

    Taking the lock creates `output_dir`: where that fails (a folder that
    looks writable, such as /proc to root, is not), the run is refused.
    """
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(directory_lock(output_dir, _LOCK_NAME))
        except DirectoryLockedError as error:
            owner = "another process" if error.pid is None else f"process {error.pid}"
            raise ValueError(
                f"`output_dir` is in use by another training run ({owner}). Wait for it to "
                f"end, or choose another directory. Received: output_dir={output_dir!r}."
            ) from None
        except OSError as error:
            raise ValueError(
                f"`output_dir` cannot be created or written ({error.strerror or error}: "
                f"{error.filename}). Received: output_dir={output_dir!r}."
            ) from None
        yield


def _resumable(output_dir, config, overwrite):
    """Whether `output_dir` holds an unfinished run of `config` to resume.

    Raises:
        ValueError: it holds a finished run, a run with other settings, or a
            `config.json` that cannot be read (unless `overwrite`).
    """
    if overwrite:
        return False
    if os.path.exists(os.path.join(output_dir, "summary.json")):
        raise ValueError(
            f"`output_dir` already holds a finished run (it has summary.json). Choose "
            f"another directory, or pass overwrite=True (`--overwrite`) to train again "
            f"from scratch. Received: output_dir={output_dir!r}."
        )
    config_path = os.path.join(output_dir, "config.json")
    if not os.path.exists(config_path):
        return False
    try:
        with open(config_path) as file:
            saved = json.load(file)
        if not isinstance(saved, dict):
            raise ValueError(f"a {type(saved).__name__}, not an object")
    except ValueError as error:
        raise _damaged(output_dir, f"{config_path} cannot be read ({error})") from None
    changed = sorted(
        key for key in config.keys() | saved.keys() if config.get(key) != saved.get(key)
    )
    if changed:
        differences = ", ".join(
            f"{key}={saved.get(key)!r} there, {config.get(key)!r} now" for key in changed
        )
        raise ValueError(
            f"`output_dir` holds an unfinished run with other settings ({differences}). "
            f"Rerun with its settings to resume it, choose another directory, or pass "
            f"overwrite=True (`--overwrite`). Received: output_dir={output_dir!r}."
        )
    return os.path.exists(os.path.join(output_dir, "last.keras"))


def _clear_run(output_dir):
    """Removes the files of the run in `output_dir`, and nothing else.

    Only where a run was (it has `config.json`): its checkpoints, history,
    config and summary; its TensorBoard event files, which TensorBoard would
    show beside the new run's; and the files exported from its models
    (`best.*.tflite`, `last.*.tflite`, as `keras-mgconv export` and `quantize`
    name them), which the new models would not match. Other files stay.
    """
    if not os.path.exists(os.path.join(output_dir, "config.json")):
        return
    exported = [
        path
        for model in ("best", "last")
        for path in glob.glob(os.path.join(glob.escape(output_dir), f"{model}.*.tflite"))
    ]
    events = glob.glob(
        os.path.join(glob.escape(output_dir), _LOGS_NAME, "*", "events.out.tfevents.*")
    )
    for path in (
        *(os.path.join(output_dir, name) for name in _CHECKPOINT_NAMES),
        *exported,
        *events,
    ):
        if os.path.exists(path):
            os.remove(path)
    for folder in (
        *sorted({os.path.dirname(path) for path in events}),
        os.path.join(output_dir, _LOGS_NAME),
    ):
        with contextlib.suppress(OSError):  # Not empty: it holds other files.
            os.rmdir(folder)


def _image_shape(info, image_size):
    if image_size is None:
        return None if None in info.image_shape[:2] else info.image_shape
    size = _arguments.positive_int("image_size", image_size)
    return (size, size, info.image_shape[2])


def _build_model(
    model,
    info,
    image_shape,
    normalization,
    multigrid,
    group_size,
    width,
    batch_norm_momentum,
    coarsest_channels=None,
):
    inputs = keras.Input(shape=image_shape, name="image")
    multigrid_args = {
        name: value
        for name, value in (("group_size", group_size), ("coarsest_channels", coarsest_channels))
        if value is not None
    }
    try:
        return MODELS[model](
            input_tensor=normalization(inputs),
            classes=info.num_classes,
            multigrid=multigrid,
            width=width,
            batch_norm_momentum=batch_norm_momentum,
            **multigrid_args,
        )
    except ValueError as error:
        if "input_shape" not in str(error):
            raise
        height, width_, channels = image_shape
        raise ValueError(
            f"{model} cannot take the {height}x{width_}x{channels} images of {info.name!r}: "
            f"{error} Pass `image_size` (`--image-size`) to resize them."
        ) from None


def _work_around_multi_worker_fit(network):
    """Lets Keras 3's `fit` run under MultiWorkerMirroredStrategy.

    Two Keras 3 bugs (tensorflow/tensorflow#72388, closed unfixed) stop it.
    `fit` reduces a first batch across workers to build the model, which
    collective all-reduce refuses; the model is built already, so it is made
    to take the strategy from the scope `fit` runs in instead of remembering
    it. And `fit` averages each step's scalar logs across workers along an
    axis 0 they do not have; the steps return them as vectors of one element.
    """
    network._distribute_strategy = None
    for name in ("train_step", "test_step"):
        step = getattr(network, name)
        setattr(
            network,
            name,
            lambda batch, step=step: {
                key: tf.reshape(value, [1]) for key, value in step(batch).items()
            },
        )


def _synchronize_batch_norm(network):
    """Batch statistics over the global batch, not each replica's share of it.

    Training then does not depend on how many replicas split the batch. Keras
    reads the flag when it traces the training step, so setting it on the built
    layers is enough, and it is saved with them.
    """
    for layer in network.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def _distribute(network, strategy):
    """Readies a built model to be trained or evaluated under `strategy`."""
    if strategy.num_replicas_in_sync > 1:
        _synchronize_batch_norm(network)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        _work_around_multi_worker_fit(network)


class _BatchStatistics(keras.Model):
    """`network` in training mode: its BatchNormalization uses each batch's own statistics."""

    def __init__(self, network):
        super().__init__(name="batch_statistics")
        self.network = network

    def call(self, inputs):
        return self.network(inputs, training=True)


def _test_accuracy(network, test_data, strategy, batch_statistics=False):
    """`network`'s accuracy on `test_data`, in inference mode or with batch statistics.

    Keras' BatchNormalization updates its moving statistics whenever it runs in
    training mode: with `batch_statistics`, they are put back afterwards.
    """
    if not batch_statistics:
        return float(network.evaluate(test_data, verbose=0, return_dict=True)["accuracy"])
    moving = [weight.numpy() for weight in network.non_trainable_weights]
    with strategy.scope():
        evaluated = _BatchStatistics(network)
        evaluated.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=["accuracy"],
            jit_compile=False,
        )
    _distribute(evaluated, strategy)
    # Training mode outside `fit` is no training here: a factory model would
    # warn that nothing recomputes its statistics, and shorten their horizon.
    statistics_batches = getattr(network, "batch_norm_statistics_batches", 0)
    if statistics_batches:
        network.batch_norm_statistics_batches = 0
    try:
        return float(evaluated.evaluate(test_data, verbose=0, return_dict=True)["accuracy"])
    finally:
        if statistics_batches:
            network.batch_norm_statistics_batches = statistics_batches
        for weight, value in zip(network.non_trainable_weights, moving):
            weight.assign(value)


def _test_accuracies(network, selected_path, selected_is_final, test_data, strategy):
    """What `summary.json` reports on the test split, which chooses nothing.

    The final model in inference mode and with batch statistics (their gap
    measures how well the moving statistics describe the activations), and the
    model that the validation split selected.
    """
    final = _test_accuracy(network, test_data, strategy)
    if selected_is_final:
        selected = final
    else:
        with strategy.scope():
            selected_network = keras.models.load_model(selected_path)
        _distribute(selected_network, strategy)
        selected = _test_accuracy(selected_network, test_data, strategy)
    return {
        "final_test_accuracy": final,
        "final_test_accuracy_batch_statistics": _test_accuracy(
            network, test_data, strategy, batch_statistics=True
        ),
        "selected_test_accuracy": selected,
    }


def _config(
    model,
    dataset,
    epochs,
    batch_size,
    learning_rate,
    schedule,
    optimizer,
    momentum,
    weight_decay,
    multigrid,
    group_size,
    width,
    image_size,
    batch_norm_momentum,
    validation_fraction,
    seed,
    warmup_epochs,
    coarsest_channels=None,
):
    """`train`'s arguments, checked, as `config.json` records them."""
    _arguments.choice("model", model, MODELS)
    multigrid = multigrid_design(multigrid) or False  # False, "layer" or "block"
    epochs = _arguments.positive_int("epochs", epochs)
    batch_size = _arguments.positive_int("batch_size", batch_size)
    _number("learning_rate", learning_rate, "a positive finite number", lambda v: v > 0)
    _arguments.choice("schedule", schedule, SCHEDULES)
    if warmup_epochs is None:
        warmup_epochs = min(_WARMUP_EPOCHS, epochs // 5)
    elif (
        isinstance(warmup_epochs, bool)
        or not isinstance(warmup_epochs, numbers.Integral)
        or not 0 <= warmup_epochs < epochs
    ):
        raise ValueError(
            f"`warmup_epochs` must be None or an int from 0 to `epochs` - 1 ({epochs - 1}). "
            f"Received: warmup_epochs={warmup_epochs!r}."
        )
    _arguments.choice("optimizer", optimizer, OPTIMIZERS)
    _number("momentum", momentum, "a number in [0, 1)", lambda v: 0 <= v < 1)
    _number("weight_decay", weight_decay, "a finite number >= 0", lambda v: v >= 0)
    _number("width", width, "a positive finite multiplier of the block channels", lambda v: v > 0)
    if coarsest_channels is not None:
        coarsest_channels = _arguments.positive_int("coarsest_channels", coarsest_channels)
    if batch_norm_momentum is not None:
        _number(
            "batch_norm_momentum",
            batch_norm_momentum,
            "a number in [0, 1), or None to choose one from the steps per epoch",
            lambda v: 0 <= v < 1,
        )
    _number(
        "validation_fraction",
        validation_fraction,
        "a number strictly between 0 and 1",
        lambda v: 0 < v < 1,
    )
    # keras.utils.set_random_seed takes NumPy's seeds: 0 to 2**32 - 1.
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(
            f"Invalid value for argument `seed`. Expected an integer from 0 to 2**32 - 1. "
            f"Received: seed={seed!r}."
        )
    seed = int(seed)
    return {
        "model": model,
        "dataset": dataset,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "schedule": schedule,
        "warmup_epochs": int(warmup_epochs),
        "optimizer": optimizer,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "multigrid": multigrid,
        "group_size": group_size,
        "coarsest_channels": coarsest_channels,
        "width": width,
        "image_size": image_size,
        "batch_norm_momentum": batch_norm_momentum,
        "validation_fraction": validation_fraction,
        "seed": seed,
    }


def steps_per_execution(steps_per_epoch, most=_MAX_STEPS_PER_EXECUTION):
    """Training steps that `fit` runs in one call of its compiled function: at most `most`.

    Each call costs a fixed overhead, which dominates small networks on small
    images (ResNet20 on the 8x8 digits). The number divides `steps_per_epoch`:
    Keras runs whole executions, and one that crossed an epoch's end would move
    the epochs' boundaries, and with them the checkpoints and resuming.
    """
    return max(
        steps for steps in range(1, min(steps_per_epoch, most) + 1) if steps_per_epoch % steps == 0
    )


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a run trains on and for how long, settled before anything is written."""

    config: dict
    data_dir: str
    manual_dir: str
    info: object  # data.image_dataset_info's
    image_shape: tuple
    fit_split: str
    validation_split: str
    selected_by: str
    steps_per_epoch: int
    batch_norm_momentum: float

    def pipeline(self, split, **kwargs):
        """`data.image_pipeline` of `split` at the run's batch size, image shape and seed."""
        return data.image_pipeline(
            self.config["dataset"],
            split,
            self.config["batch_size"],
            image_shape=self.image_shape,
            data_dir=self.data_dir,
            manual_dir=self.manual_dir,
            seed=self.config["seed"],
            **kwargs,
        )


def _plan(config, replicas, data_dir, manual_dir):
    """The run's `_Plan`: the dataset's splits and shape, steps per epoch, BatchNorm momentum.

    Raises:
        ValueError: the dataset is unavailable, or its images or size do not
            fit `config` and `replicas`.
    """
    dataset, batch_size, epochs = config["dataset"], config["batch_size"], config["epochs"]
    info = data.image_dataset_info(dataset, data_dir, manual_dir)
    image_shape = _image_shape(info, config["image_size"])
    if image_shape is None:
        raise ValueError(
            f"Dataset {dataset!r} has images of varying size: pass `image_size` "
            f"(`--image-size`), e.g. 224. Received: image_size=None."
        )
    if batch_size % replicas:
        raise ValueError(
            f"`batch_size` is the global batch and must divide evenly between the "
            f"{replicas} replicas. Received: batch_size={batch_size}."
        )
    fit_split, validation_split, selected_by = data.validation_splits(
        dataset, data_dir, manual_dir, config["validation_fraction"]
    )
    fit_examples = data.split_size(dataset, fit_split, data_dir, manual_dir)
    # Full training batches only: every global batch then has the same size
    # and splits evenly between replicas.
    steps_per_epoch = fit_examples // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"`batch_size` is larger than the {fit_examples} examples of {dataset!r} "
            f"to fit on. Received: batch_size={batch_size}."
        )
    if epochs * steps_per_epoch >= 2**63:
        raise ValueError(
            f"`epochs` of {steps_per_epoch} steps each must number fewer steps than the "
            f"optimizer's 64-bit step counter holds: at most "
            f"{(2**63 - 1) // steps_per_epoch:,} epochs. Received: epochs={epochs}."
        )
    batch_norm_momentum = config["batch_norm_momentum"]
    if batch_norm_momentum is None:
        batch_norm_momentum = auto_batch_norm_momentum(steps_per_epoch)
    return _Plan(
        config,
        data_dir,
        manual_dir,
        info,
        image_shape,
        fit_split,
        validation_split,
        selected_by,
        steps_per_epoch,
        batch_norm_momentum,
    )


def _model(plan, output_dir, resume, strategy):
    """The network to train: `output_dir/last.keras` to resume, else a new compiled one."""
    config = plan.config
    keras.utils.set_random_seed(config["seed"])
    # Adapted outside the strategy's scope, which would distribute its statistics.
    normalization = (
        None
        if resume
        else data.normalization_layer(
            config["dataset"],
            plan.image_shape,
            plan.data_dir,
            plan.manual_dir,
            split=plan.fit_split,
        )
    )
    with strategy.scope():
        if resume:
            last = os.path.join(output_dir, "last.keras")
            try:
                network = _load(last)
            except _UnreadableModel as error:
                raise _damaged(output_dir, f"{last} {error}") from None
        else:
            network = _build_model(
                config["model"],
                plan.info,
                plan.image_shape,
                normalization,
                config["multigrid"],
                config["group_size"],
                config["width"],
                plan.batch_norm_momentum,
                config["coarsest_channels"],
            )
            learning_rate = _learning_rate(
                config["schedule"],
                config["learning_rate"],
                config["epochs"],
                plan.steps_per_epoch,
                config["warmup_epochs"],
            )
            network.compile(
                optimizer=_optimizer(
                    config["optimizer"], learning_rate, config["momentum"], config["weight_decay"]
                ),
                loss=keras.losses.SparseCategoricalCrossentropy(),
                metrics=["accuracy"],
                jit_compile=False,
            )
    # Set after compiling, so that the saved models' compile config keeps 1:
    # `predict` and `evaluate` of a loaded model then trace one step, not a
    # loop of 20 and another for the last, partial execution (a trained
    # ResNet20's first `predict` of 1,797 digits: 47 s with 20, 5 s with 1).
    # Keras 3.15's multi-step loop fails under MirroredStrategy ("You must
    # feed a value for placeholder tensor ... multi_step_on_iterator").
    network.steps_per_execution = (
        steps_per_execution(plan.steps_per_epoch) if strategy.num_replicas_in_sync == 1 else 1
    )
    _distribute(network, strategy)
    return network


def _prepare_output_dir(output_dir, run_dir, config, completed_epochs, overwrite, writes):
    """Readies `run_dir` to continue after `completed_epochs`; returns their history rows."""
    history = _read_history(os.path.join(output_dir, "history.csv"), completed_epochs)
    if writes:
        if overwrite:
            _clear_run(output_dir)
        remove_stale_temporaries(output_dir)
        _write_json(os.path.join(output_dir, "config.json"), config)
    _rewrite_history(os.path.join(run_dir, "history.csv"), history)
    _restore_best(output_dir, run_dir, history)
    return history


def _fit(network, plan, output_dir, run_dir, history, strategy, verbose):
    """Trains the epochs that `history` lacks, checkpointing each into `run_dir`."""
    epochs, completed_epochs = plan.config["epochs"], len(history)
    if completed_epochs == epochs:
        return
    best_accuracy = max((float(row["val_accuracy"]) for row in history), default=-1.0)
    # Validation after the moving statistics are recomputed for the epoch's
    # weights (see keras_mgconv.batch_norm), so that it judges, and the
    # checkpoints hold, the model that inference mode will run.
    # The same batches every epoch (those of the first), so that a resumed
    # run computes what an uninterrupted one does.
    batch_norm_data = plan.pipeline(
        plan.fit_split, training=True, drop_remainder=True, epochs=range(1)
    )
    callbacks = [
        _EpochTimer(),
        PreciseBatchNormalization(
            batch_norm_data,
            min(plan.steps_per_epoch, _BATCH_NORM_STATISTICS_STEPS),
            validation_data=plan.pipeline(plan.validation_split),
        ),
        keras.callbacks.CSVLogger(os.path.join(run_dir, "history.csv"), append=True),
        _Checkpoints(run_dir, best_accuracy),
    ]
    if strategy.extended.should_checkpoint:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(output_dir, _LOGS_NAME)))
    # The remaining epochs, each fixed by the seed: a resumed run sees the
    # batches an uninterrupted one would have. `fit` splits every global
    # batch between the replicas (and the workers: the pipeline asks for
    # sharding by example); the pipeline has no random state that its
    # rewriting could reset.
    train_data = plan.pipeline(
        plan.fit_split, training=True, drop_remainder=True, epochs=range(completed_epochs, epochs)
    )
    if verbose == "auto":
        verbose = _auto_verbosity(plan.steps_per_epoch, int(network.steps_per_execution))
    with strategy.scope():
        network.fit(
            train_data,
            epochs=epochs,
            steps_per_epoch=plan.steps_per_epoch,
            initial_epoch=completed_epochs,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,
        )  # The pipeline shuffles.


def _auto_verbosity(steps_per_epoch, steps_per_execution):
    """`verbose="auto"`: `fit`'s progress bar (1) where it moves, else one line per epoch (2).

    The bar moves once per execution of `fit`'s compiled function, every
    `steps_per_execution` steps: on the digits one execution is the whole
    epoch, and the bar would stand at 0 until it jumps to the end. Fewer steps
    per execution would move it at the cost of the speed they buy.
    """
    return 1 if steps_per_epoch // steps_per_execution >= _MIN_PROGRESS_UPDATES else 2


def _report(network, plan, run_dir, strategy):
    """The summary of a finished run: its settings, the network's size, test accuracies, epochs."""
    epochs = plan.config["epochs"]
    history = _read_history(os.path.join(run_dir, "history.csv"), epochs)
    return {
        **plan.config,
        **_multigrid_settings_used(plan.config),
        "batch_norm_momentum": plan.batch_norm_momentum,
        "parameters": network.count_params(),
        "multiply_adds": count_multiply_adds(network),
        "image_shape": list(plan.image_shape),
        "num_classes": plan.info.num_classes,
        "replicas": strategy.num_replicas_in_sync,
        **_test_accuracies(
            network,
            os.path.join(run_dir, "best.keras"),
            _selected_epoch(history) == epochs - 1,
            plan.pipeline(plan.info.test_split),
            strategy,
        ),
        **_epochs_summary(history, plan.selected_by),
        **_learned(history, plan.info.num_classes),
    }


def learned_anything(accuracy, num_classes):
    """Whether a training accuracy is clear of chance (1 / `num_classes`).

    Clear means above chance by more than 15% of the way from chance to 1: a
    run at SGD's 0.1 that never started to learn ended at 0.19 on the ten
    digits, where 0.235 is the bound.
    """
    chance = 1 / num_classes
    return accuracy > chance + 0.15 * (1 - chance)


def _learned(history, num_classes):
    accuracy = float(history[-1]["accuracy"])
    return {"final_train_accuracy": accuracy, "learned": learned_anything(accuracy, num_classes)}


def _multigrid_settings_used(config):
    """The group size and coarsest width of the run's multigrid layers, as the factory used them.

    The factory's defaults where none was given; None for a baseline, which
    has neither, and for a factory without multigrid arguments.
    """
    unknown = {"group_size": None, "coarsest_channels": None}
    if not config["multigrid"]:
        return unknown
    group_size = config["group_size"]
    if group_size is None:
        parameter = inspect.signature(MODELS[config["model"]]).parameters.get("group_size")
        if parameter is None:
            return unknown
        group_size = parameter.default
    settings = ConvSettings(config["multigrid"], group_size, config["coarsest_channels"])
    return {"group_size": settings.group_size, "coarsest_channels": settings.coarsest_channels}


def train(
    model="ResNet20",
    dataset=data.DEFAULT_DATASET,
    epochs=15,
    batch_size=64,
    learning_rate=0.1,
    schedule="cosine",
    optimizer="sgd",
    momentum=0.9,
    weight_decay=5e-4,
    multigrid=True,
    group_size=None,
    width=1.0,
    image_size=None,
    output_dir="runs/ResNet20-multigrid-digits",
    data_dir=None,
    manual_dir=None,
    strategy="default",
    batch_norm_momentum=None,
    validation_fraction=0.1,
    seed=0,
    overwrite=False,
    verbose="auto",
    warmup_epochs=None,
    coarsest_channels=None,
):
    """Trains a factory model on a TFDS image-classification dataset with `model.fit`.

    The recipe is the paper's: SGD with Nesterov momentum 0.9, weight decay
    5e-4, cosine learning-rate decay from 0.1. The defaults train a multigrid
    CIFAR ResNet20 on the embedded `digits` dataset in a few minutes on a
    laptop CPU. `jit_compile` stays off: XLA is slower for these networks on CPU.
    `fit` runs up to 20 steps in each call of its compiled function
    (`steps_per_execution`, a divisor of the steps per epoch, also when it
    resumes); the saved models' compile config keeps 1, so that a loaded
    model's `predict` and `evaluate` trace a single step.

    The model is fitted on the training data less a validation split, whose
    accuracy after each epoch selects `best.keras`. The test split is
    evaluated once training has ended, only to report: the summary gives the
    test accuracy of the final model and of the selected one.

    Args:
        model: a name in `MODELS`, e.g. "ResNet20", "ResNet18", "MobileNetV2".
        dataset: TFDS dataset name.
        epochs: epochs to train in all (a resumed run trains the rest).
        batch_size: global batch size, split across the strategy's replicas.
        learning_rate: initial learning rate.
        schedule: "cosine" (to 0 at the end), "step" (divided by 10 at 50% and
            75% of the run) or "constant", over the epochs after the warm-up.
        optimizer: "sgd" (Nesterov, `momentum`), "adam" or "adamw".
        momentum: SGD momentum, in [0, 1).
        weight_decay: decoupled weight decay; 0 for none.
        multigrid: "layer" (or True): every block convolution becomes a
            MultigridConv2D; "block": the authors' V-cycle over each residual
            block (ResNets only); False: the baseline network from the same
            factory.
        group_size: multigrid group size; None uses the factory's default.
        width: multiplier on the block channels.
        image_size: resize images to this square size; None keeps the
            dataset's (required for datasets of varying image size).
        output_dir: where checkpoints, logs and the summary go.
        data_dir: TFDS data directory.
        manual_dir: folder of manually downloaded dataset files.
        strategy: one of `STRATEGIES` or a `tf.distribute.Strategy`.
        batch_norm_momentum: in [0, 1); None chooses `auto_batch_norm_momentum`.
        validation_fraction: the stratified share of the train split that
            validates, where the dataset has no validation split of its own.
        seed: seeds weights, shuffling and augmentation.
        overwrite: discard a finished or unfinished run in `output_dir`: its
            files and those exported from its models (`best.*.tflite`,
            `last.*.tflite`); other files in `output_dir` stay.
        verbose: `model.fit`'s verbosity. "auto" shows the progress bar where it
            moves at least 10 times an epoch, else one line per epoch (2), as
            on the digits, whose 20-step epoch is one execution.
        warmup_epochs: epochs over which the learning rate first rises
            linearly to `learning_rate` (`keras_mgconv.schedules.LinearWarmup`);
            0 for none; None: 2, or a fifth of the epochs where that is fewer.
            Without it the block design started at scale 1
            (`zero_init_residual=False`) can fail to learn at all at SGD's 0.1
            (the digits: 18.9% test accuracy).
        coarsest_channels: the widest coarsest level of the multigrid layers
            and widest block convolution that stays dense (None: the
            factory's default, 32). 8 gives the smallest networks, slower on
            CPUs (README, "Speed on CPU").

    Returns:
        The summary dict, also written to `output_dir/summary.json`.

    Raises:
        ValueError: for any invalid argument, unavailable dataset, image shape
            the model cannot take, or unusable `output_dir` (another run using
            it included), before anything is written.

    Example:

    >>> from keras_mgconv import training
    >>> summary = training.train(epochs=1, output_dir=tmp_dir + "/run", verbose=0)
    >>> summary["epochs"], summary["replicas"], summary["image_shape"], summary["selected_by"]
    (1, 1, [8, 8, 1], "10% of 'train', stratified")
    """
    config = _config(
        model,
        dataset,
        epochs,
        batch_size,
        learning_rate,
        schedule,
        optimizer,
        momentum,
        weight_decay,
        multigrid,
        group_size,
        width,
        image_size,
        batch_norm_momentum,
        validation_fraction,
        seed,
        warmup_epochs,
        coarsest_channels,
    )
    output_dir = _writable_output_dir(output_dir)
    if not isinstance(strategy, tf.distribute.Strategy):
        strategy = make_strategy(strategy)
    writes = strategy.extended.should_checkpoint
    with contextlib.ExitStack() as stack:
        if writes:
            stack.enter_context(_output_dir_lock(output_dir))
            run_dir = output_dir
        else:
            # The other workers of a multi-worker run save the same checkpoints
            # where nobody reads them: every save creates a variable, which all
            # workers must do together.
            run_dir = stack.enter_context(tempfile.TemporaryDirectory())
        resume = _resumable(output_dir, config, overwrite)
        plan = _plan(config, strategy.num_replicas_in_sync, data_dir, manual_dir)
        network = _model(plan, output_dir, resume, strategy)
        completed_epochs = int(network.optimizer.iterations.numpy()) // plan.steps_per_epoch
        history = _prepare_output_dir(
            output_dir, run_dir, config, completed_epochs, overwrite, writes
        )
        _fit(network, plan, output_dir, run_dir, history, strategy, verbose)
        summary = _report(network, plan, run_dir, strategy)
        if writes:
            _write_json(os.path.join(output_dir, "summary.json"), summary)
    return summary


def _epochs_summary(history, selected_by):
    """The summary's account of the epochs: which one was selected and how, and their times."""
    selected = _selected_epoch(history)
    epoch_times = [round(float(row["epoch_time"]), 3) for row in history]
    return {
        "selected_by": selected_by,
        "selected_epoch": selected + 1,
        "best_validation_accuracy": float(history[selected]["val_accuracy"]),
        "epoch_times": epoch_times,
        "train_time": round(sum(epoch_times), 3),
    }


def load_model(path, argument="model_path"):
    """`keras.models.load_model`, with an error that names the file and what is wrong with it.

    Args:
        path: a `.keras` file.
        argument: the name of the argument that gave `path`, for the error.

    Returns:
        The model.

    Raises:
        ValueError: `path` is not an existing `.keras` file, or not a readable
            Keras model (truncated, damaged, or not saved by Keras).
    """
    if not os.path.isfile(str(path)) or not str(path).endswith(".keras"):
        raise ValueError(
            f"`{argument}` must be an existing .keras file. Received: {argument}={str(path)!r}."
        )
    try:
        return _load(path)
    except _UnreadableModel as error:
        raise ValueError(
            f"{path} {error}; save or train it again. Received: {argument}={str(path)!r}."
        ) from None


class _UnreadableModel(Exception):
    pass


def _load(path):
    """`keras.models.load_model(path)`; raises `_UnreadableModel` saying what is wrong with it."""
    # Keras reports a file that is not a zip archive as "File not found".
    problem = None if zipfile.is_zipfile(path) else "not a zip archive"
    if problem is None:
        try:
            return keras.models.load_model(path)
        except Exception as error:  # A damaged archive fails in many ways, each its own type.
            problem = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    raise _UnreadableModel(
        f"is not a readable Keras model ({problem}): it is truncated, damaged or was not "
        f"saved by Keras"
    )


def evaluate(
    model_path,
    dataset=data.DEFAULT_DATASET,
    split=None,
    batch_size=256,
    data_dir=None,
    manual_dir=None,
    verbose="auto",
):
    """Evaluates a saved `.keras` classifier on a TFDS dataset split.

    The images are brought to the model's input shape (resized, grayscale and
    RGB converted into each other) as for evaluation during training.

    Args:
        model_path: a `.keras` file, e.g. `best.keras` from `train`.
        dataset: TFDS dataset name.
        split: the split; default the dataset's test split.
        batch_size: examples per batch.
        data_dir: TFDS data directory.
        manual_dir: folder of manually downloaded dataset files.
        verbose: `model.evaluate`'s verbosity; "auto": its progress bar on a
            terminal, else one line (2), free of the bar's colour codes.

    Returns:
        A dict with "loss", "accuracy" and the "split".

    Raises:
        ValueError: the file is missing or not a readable Keras model, or its
            classes do not match the dataset's.
    """
    batch_size = _arguments.positive_int("batch_size", batch_size)
    network = load_model(model_path)
    info = data.image_dataset_info(dataset, data_dir, manual_dir)
    classes = network.output_shape[-1]
    if classes != info.num_classes:
        raise ValueError(
            f"The model predicts {classes} classes but {dataset!r} has "
            f"{info.num_classes}. Received: model_path={model_path!r}, dataset={dataset!r}."
        )
    split = split or info.test_split
    images = data.image_pipeline(
        dataset,
        split,
        batch_size,
        image_shape=network.input_shape[1:],
        data_dir=data_dir,
        manual_dir=manual_dir,
    )
    network.compile(loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    results = network.evaluate(images, verbose=verbose, return_dict=True)
    return {"loss": float(results["loss"]), "accuracy": float(results["accuracy"]), "split": split}
