"""Training and evaluation on tensorflow-datasets: the Python side of `keras-mgconv train`.

    from keras_mgconv import training
    summary = training.train("ResNet20", "digits", epochs=15, output_dir="runs/digits")
    training.evaluate("runs/digits/best.keras", "digits")

`train` builds a factory model (multigrid or baseline) with the dataset's
per-channel normalisation as its first layer, trains it with `model.fit` and
writes to `output_dir`:

- `last.keras`: model and optimizer after the latest epoch, written atomically;
- `best.keras`: the epoch with the best test accuracy so far;
- `history.csv`: one row of losses, accuracies and the epoch time per epoch;
- `logs/`: TensorBoard logs;
- `config.json`: the arguments of the run;
- `summary.json`: parameters, multiply-adds, best test accuracy, epoch times.
  It is written last: a directory holds a finished run exactly when it has one.

A run that stops early (Ctrl-C, a killed process, a lost machine) is resumed by
calling `train` again with the same arguments and `output_dir`: it reloads
`last.keras` with its optimizer state and continues with the next epoch.
"""

import csv
import json
import os
import tempfile
import time

import tensorflow as tf

from keras_mgconv import data, models
from keras_mgconv._files import atomic_write
from keras_mgconv._keras import keras
from keras_mgconv.complexity import count_multiply_adds
from keras_mgconv.layers import _arguments

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
}
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")

# The step schedule divides the learning rate by 10 at these fractions of the run.
_STEP_BOUNDARIES = (0.5, 0.75)

_CHECKPOINT_NAMES = ("last.keras", "best.keras", "history.csv", "config.json", "summary.json")


def _positive_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a positive number. "
            f"Received: {name}={value!r}.")
    return value


def _non_negative_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a number >= 0. "
            f"Received: {name}={value!r}.")
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
                "environment variable, which is not set. Received: strategy='multi_worker'.")
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError) as error:
        raise ValueError(
            f"No TPU found to train on ({str(error).splitlines()[0]}). "
            f"Received: strategy='tpu'.") from None
    return tf.distribute.TPUStrategy(resolver)


def auto_batch_norm_momentum(steps_per_epoch):
    """BatchNorm momentum whose moving statistics forget their start within a tenth of an epoch.

    Keras' default 0.99 averages over about 100 steps; a short run on a small
    dataset (the digits: 23 steps an epoch) then evaluates with statistics
    still dominated by their initial values. The horizon 1 / (1 - momentum) is
    kept at most a tenth of an epoch, with momentum between 0.9 and 0.99.
    """
    return min(0.99, max(0.9, 1 - 10 / steps_per_epoch))


def _learning_rate(schedule, learning_rate, epochs, steps_per_epoch):
    total = epochs * steps_per_epoch
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=total)
    if schedule == "step":
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            [int(total * fraction) for fraction in _STEP_BOUNDARIES],
            [learning_rate, learning_rate / 10, learning_rate / 100])
    return learning_rate


def _optimizer(name, learning_rate, momentum, weight_decay):
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=True,
                                    weight_decay=weight_decay or None)
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
    """Saves `last.keras` every epoch and `best.keras` when the test accuracy improves.

    Not keras.callbacks.ModelCheckpoint: it writes in place, and a process
    killed during the write leaves a truncated file that resuming would load.
    """

    def __init__(self, output_dir, best_accuracy):
        super().__init__()
        self.output_dir = output_dir
        self.best_accuracy = best_accuracy

    def on_epoch_end(self, epoch, logs=None):
        atomic_write(os.path.join(self.output_dir, "last.keras"), self.model.save)
        if logs["val_accuracy"] > self.best_accuracy:
            self.best_accuracy = logs["val_accuracy"]
            atomic_write(os.path.join(self.output_dir, "best.keras"), self.model.save)


def _read_history(path, epochs_done):
    """The CSV history's rows for the completed epochs (a killed run may have logged one more)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as file:
        rows = [row for row in csv.DictReader(file) if int(row["epoch"]) < epochs_done]
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


def _check_output_dir(output_dir, config, overwrite):
    """Refuses a directory that cannot be written, holds a finished run, or another run."""
    if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
        raise ValueError(f"`output_dir` must be a path. Received: output_dir={output_dir!r}.")
    output_dir = os.path.abspath(output_dir)
    existing = output_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"`output_dir` cannot be written: {existing} is not a writable directory. "
            f"Received: output_dir={output_dir!r}.")
    if existing != output_dir or overwrite:
        return output_dir, False
    if os.path.exists(os.path.join(output_dir, "summary.json")):
        raise ValueError(
            f"`output_dir` already holds a finished run (it has summary.json). Choose "
            f"another directory, or pass overwrite=True (`--overwrite`) to train again "
            f"from scratch. Received: output_dir={output_dir!r}.")
    config_path = os.path.join(output_dir, "config.json")
    if not os.path.exists(config_path):
        return output_dir, False
    with open(config_path) as file:
        saved = json.load(file)
    changed = sorted(key for key in config.keys() | saved.keys()
                     if config.get(key) != saved.get(key))
    if changed:
        differences = ", ".join(f"{key}={saved.get(key)!r} there, {config.get(key)!r} now"
                                for key in changed)
        raise ValueError(
            f"`output_dir` holds an unfinished run with other settings ({differences}). "
            f"Rerun with its settings to resume it, choose another directory, or pass "
            f"overwrite=True (`--overwrite`). Received: output_dir={output_dir!r}.")
    return output_dir, os.path.exists(os.path.join(output_dir, "last.keras"))


def _clear_run(output_dir):
    for name in _CHECKPOINT_NAMES:
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            os.remove(path)


def _image_shape(info, image_size):
    if image_size is None:
        return None if None in info.image_shape[:2] else info.image_shape
    size = _arguments.positive_int("image_size", image_size)
    return (size, size, info.image_shape[2])


def _build_model(model, info, image_shape, normalization, multigrid, group_size, width,
                 batch_norm_momentum):
    inputs = keras.Input(shape=image_shape, name="image")
    multigrid_args = {} if group_size is None else {"group_size": group_size}
    try:
        return MODELS[model](
            input_tensor=normalization(inputs), classes=info.num_classes,
            multigrid=multigrid, width=width, batch_norm_momentum=batch_norm_momentum,
            **multigrid_args)
    except ValueError as error:
        if "input_shape" not in str(error):
            raise
        height, width_, channels = image_shape
        raise ValueError(
            f"{model} cannot take the {height}x{width_}x{channels} images of {info.name!r}: "
            f"{error} Pass `image_size` (`--image-size`) to resize them.") from None


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
        setattr(network, name, lambda batch, step=step: {
            key: tf.reshape(value, [1]) for key, value in step(batch).items()})


def _synchronize_batch_norm(network):
    """Batch statistics over the global batch, not each replica's share of it.

    Training then does not depend on how many replicas split the batch. Keras
    reads the flag when it traces the training step, so setting it on the built
    layers is enough, and it is saved with them.
    """
    for layer in network.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def train(model="ResNet20", dataset=data.DEFAULT_DATASET, epochs=15, batch_size=64,
          learning_rate=0.1, schedule="cosine", optimizer="sgd", momentum=0.9,
          weight_decay=5e-4, multigrid=True, group_size=None, width=1.0, image_size=None,
          output_dir="runs/ResNet20-multigrid-digits", data_dir=None, manual_dir=None,
          strategy="default", batch_norm_momentum=None, seed=0, overwrite=False,
          verbose="auto"):
    """Trains a factory model on a TFDS image-classification dataset with `model.fit`.

    The recipe is the paper's: SGD with Nesterov momentum 0.9, weight decay
    5e-4, cosine learning-rate decay from 0.1. The defaults train a multigrid
    CIFAR ResNet20 on the embedded `digits` dataset in a few minutes on a
    laptop CPU. `jit_compile` stays off: XLA is slower for these networks on CPU.

    Args:
        model: a name in `MODELS`, e.g. "ResNet20", "ResNet18", "MobileNetV2".
        dataset: TFDS dataset name.
        epochs: epochs to train in all (a resumed run trains the rest).
        batch_size: global batch size, split across the strategy's replicas.
        learning_rate: initial learning rate.
        schedule: "cosine" (to 0 at the end), "step" (divided by 10 at 50% and
            75% of the run) or "constant".
        optimizer: "sgd" (Nesterov, `momentum`), "adam" or "adamw".
        momentum: SGD momentum.
        weight_decay: decoupled weight decay; 0 for none.
        multigrid: False trains the baseline network from the same factory.
        group_size: multigrid group size; None uses the factory's default.
        width: multiplier on the block channels.
        image_size: resize images to this square size; None keeps the
            dataset's (required for datasets of varying image size).
        output_dir: where checkpoints, logs and the summary go.
        data_dir: TFDS data directory.
        manual_dir: folder of manually downloaded dataset files.
        strategy: one of `STRATEGIES` or a `tf.distribute.Strategy`.
        batch_norm_momentum: None chooses `auto_batch_norm_momentum`.
        seed: seeds weights, shuffling and augmentation.
        overwrite: discard a finished or unfinished run in `output_dir`.
        verbose: `model.fit`'s verbosity ("auto" shows the progress bar).

    Returns:
        The summary dict, also written to `output_dir/summary.json`.

    Raises:
        ValueError: for any invalid argument, unavailable dataset, image shape
            the model cannot take, or unusable `output_dir`, before anything is
            written.

    Example:

    >>> from keras_mgconv import training
    >>> summary = training.train(epochs=1, width=0.5, output_dir=tmp_dir + "/run", verbose=0)
    >>> summary["epochs"], summary["replicas"], summary["image_shape"]
    (1, 1, [8, 8, 1])
    """
    _arguments.choice("model", model, MODELS)
    epochs = _arguments.positive_int("epochs", epochs)
    batch_size = _arguments.positive_int("batch_size", batch_size)
    _positive_number("learning_rate", learning_rate)
    _arguments.choice("schedule", schedule, SCHEDULES)
    _arguments.choice("optimizer", optimizer, OPTIMIZERS)
    _non_negative_number("momentum", momentum)
    _non_negative_number("weight_decay", weight_decay)
    config = {
        "model": model, "dataset": dataset, "epochs": epochs, "batch_size": batch_size,
        "learning_rate": learning_rate, "schedule": schedule, "optimizer": optimizer,
        "momentum": momentum, "weight_decay": weight_decay, "multigrid": bool(multigrid),
        "group_size": group_size, "width": width, "image_size": image_size,
        "batch_norm_momentum": batch_norm_momentum, "seed": seed,
    }
    output_dir, resume = _check_output_dir(output_dir, config, overwrite)
    if not isinstance(strategy, tf.distribute.Strategy):
        strategy = make_strategy(strategy)
    info = data.image_dataset_info(dataset, data_dir, manual_dir)
    image_shape = _image_shape(info, image_size)
    if image_shape is None:
        raise ValueError(
            f"Dataset {dataset!r} has images of varying size: pass `image_size` "
            f"(`--image-size`), e.g. 224. Received: image_size=None.")

    if batch_size % strategy.num_replicas_in_sync:
        raise ValueError(
            f"`batch_size` is the global batch and must divide evenly between the "
            f"{strategy.num_replicas_in_sync} replicas. Received: batch_size={batch_size}.")
    pipeline_args = dict(image_shape=image_shape, data_dir=data_dir, manual_dir=manual_dir,
                         seed=seed)
    # Full training batches only: every global batch then has the same size and
    # splits evenly between replicas.
    steps_per_epoch = int(data.image_pipeline(
        dataset, info.train_split, batch_size, drop_remainder=True, **pipeline_args
    ).cardinality())
    if steps_per_epoch == 0:
        raise ValueError(
            f"`batch_size` is larger than the {info.train_split!r} split of {dataset!r} "
            f"({info.num_examples[info.train_split]} examples). "
            f"Received: batch_size={batch_size}.")
    if batch_norm_momentum is None:
        batch_norm_momentum = auto_batch_norm_momentum(steps_per_epoch)

    keras.utils.set_random_seed(seed)
    # Adapted outside the strategy's scope, which would distribute its statistics.
    normalization = None if resume else data.normalization_layer(
        dataset, image_shape, data_dir, manual_dir)
    with strategy.scope():
        if resume:
            network = keras.models.load_model(os.path.join(output_dir, "last.keras"))
        else:
            network = _build_model(model, info, image_shape, normalization, multigrid,
                                   group_size, width, batch_norm_momentum)
            network.compile(
                optimizer=_optimizer(
                    optimizer, _learning_rate(schedule, learning_rate, epochs, steps_per_epoch),
                    momentum, weight_decay),
                loss=keras.losses.SparseCategoricalCrossentropy(),
                metrics=["accuracy"], jit_compile=False)
        if strategy.num_replicas_in_sync > 1:
            _synchronize_batch_norm(network)
    initial_epoch = int(network.optimizer.iterations.numpy()) // steps_per_epoch
    # The remaining epochs, each fixed by the seed: a resumed run sees the
    # batches an uninterrupted one would have. `fit` splits every global batch
    # between the replicas (and the workers: the pipeline asks for sharding by
    # example); the pipeline has no random state that its rewriting could reset.
    train_data = data.image_pipeline(
        dataset, info.train_split, batch_size, training=True, drop_remainder=True,
        epochs=range(initial_epoch, epochs), **pipeline_args)
    test_data = data.image_pipeline(dataset, info.test_split, batch_size, **pipeline_args)

    writes = strategy.extended.should_checkpoint
    history_path = os.path.join(output_dir, "history.csv")
    history = _read_history(history_path, initial_epoch)
    best_accuracy = max((float(row["val_accuracy"]) for row in history), default=-1.0)
    if writes:
        os.makedirs(output_dir, exist_ok=True)
        if overwrite:
            _clear_run(output_dir)
        _rewrite_history(history_path, history)
        _write_json(os.path.join(output_dir, "config.json"), config)
        callbacks = [
            _EpochTimer(),
            keras.callbacks.CSVLogger(history_path, append=True),
            keras.callbacks.TensorBoard(os.path.join(output_dir, "logs")),
            _Checkpoints(output_dir, best_accuracy),
        ]
    else:
        # The other workers of a multi-worker run save the same checkpoints where
        # nobody reads them: every save creates a variable, which all workers
        # must do together.
        scratch = tempfile.TemporaryDirectory()
        callbacks = [_Checkpoints(scratch.name, best_accuracy)]
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        _work_around_multi_worker_fit(network)
    if initial_epoch < epochs:
        with strategy.scope():
            network.fit(train_data, validation_data=test_data, epochs=epochs,
                        steps_per_epoch=steps_per_epoch, initial_epoch=initial_epoch,
                        callbacks=callbacks, verbose=verbose,
                        shuffle=False)  # The pipeline shuffles.

    summary = _summary(network, config, _read_history(history_path, epochs), info,
                       image_shape, batch_norm_momentum, strategy)
    if writes:
        _write_json(os.path.join(output_dir, "summary.json"), summary)
    return summary


def _summary(network, config, history, info, image_shape, batch_norm_momentum, strategy):
    accuracies = [float(row["val_accuracy"]) for row in history]
    best_epoch = max(range(len(accuracies)), key=accuracies.__getitem__) if accuracies else None
    epoch_times = [round(float(row["epoch_time"]), 3) for row in history]
    return {
        **config,
        "batch_norm_momentum": batch_norm_momentum,
        "parameters": network.count_params(),
        "multiply_adds": count_multiply_adds(network),
        "image_shape": list(image_shape),
        "num_classes": info.num_classes,
        "replicas": strategy.num_replicas_in_sync,
        "best_test_accuracy": accuracies[best_epoch] if accuracies else None,
        "best_epoch": None if best_epoch is None else best_epoch + 1,
        "final_test_accuracy": accuracies[-1] if accuracies else None,
        "epoch_times": epoch_times,
        "train_time": round(sum(epoch_times), 3),
    }


def evaluate(model_path, dataset=data.DEFAULT_DATASET, split=None, batch_size=256,
             data_dir=None, manual_dir=None, verbose="auto"):
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
        verbose: `model.evaluate`'s verbosity.

    Returns:
        A dict with "loss", "accuracy" and the "split".

    Raises:
        ValueError: the file is missing or not a Keras model, or its classes do
            not match the dataset's.
    """
    if not os.path.isfile(str(model_path)) or not str(model_path).endswith(".keras"):
        raise ValueError(f"`model_path` must be an existing .keras file. "
                         f"Received: model_path={model_path!r}.")
    batch_size = _arguments.positive_int("batch_size", batch_size)
    info = data.image_dataset_info(dataset, data_dir, manual_dir)
    network = keras.models.load_model(model_path)
    classes = network.output_shape[-1]
    if classes != info.num_classes:
        raise ValueError(
            f"The model predicts {classes} classes but {dataset!r} has "
            f"{info.num_classes}. Received: model_path={model_path!r}, dataset={dataset!r}.")
    split = split or info.test_split
    images = data.image_pipeline(dataset, split, batch_size, image_shape=network.input_shape[1:],
                                 data_dir=data_dir, manual_dir=manual_dir)
    network.compile(loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    results = network.evaluate(images, verbose=verbose, return_dict=True)
    return {"loss": float(results["loss"]), "accuracy": float(results["accuracy"]),
            "split": split}
