import csv
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from float32_rounding import UNIT_ROUNDOFF
from keras_mgconv import cli, data, models, training
from keras_mgconv._keras import keras
from keras_mgconv.schedules import LinearWarmup

_QUIET = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _history(output_dir):
    with open(os.path.join(output_dir, "history.csv")) as file:
        return list(csv.DictReader(file))


def _fit_steps(batch_size=64):
    """Steps in an epoch of `train` on the digits: full batches of the split it fits on."""
    fit_split, _, _ = data.validation_splits("digits")
    return data.split_size("digits", fit_split) // batch_size


def test_train_command_reaches_90_percent_on_digits(digits_run, capsys):
    output_dir, printed = digits_run
    _, validation_split, selected_by = data.validation_splits("digits")
    assert f"selected on the validation split ({selected_by}" in printed
    with open(os.path.join(output_dir, "summary.json")) as file:
        summary = json.load(file)
    assert "best_test_accuracy" not in summary
    assert summary["selected_test_accuracy"] >= 0.90 and summary["final_test_accuracy"] >= 0.90
    assert 0 <= summary["final_test_accuracy_batch_statistics"] <= 1
    assert summary["model"] == "ResNet20" and summary["multigrid"] == "layer"
    assert summary["selected_by"] == selected_by
    assert len(summary["epoch_times"]) == 6 and all(t > 0 for t in summary["epoch_times"])
    assert summary["multiply_adds"] > 0
    best_path = os.path.join(output_dir, "best.keras")
    best = keras.models.load_model(best_path)
    assert summary["parameters"] == best.count_params()
    assert any(type(layer).__name__ == "MultigridConv2D" for layer in best.layers)
    history = _history(output_dir)
    assert [int(row["epoch"]) for row in history] == list(range(6))
    assert os.listdir(os.path.join(output_dir, "logs"))
    # best.keras is the first epoch of best validation accuracy, and the history's
    # validation figures are the validation split's.
    accuracies = [float(row["val_accuracy"]) for row in history]
    assert summary["selected_epoch"] == accuracies.index(max(accuracies)) + 1
    assert int(best.optimizer.iterations.numpy()) == summary["selected_epoch"] * _fit_steps()
    assert summary["best_validation_accuracy"] == max(accuracies)
    on_validation = training.evaluate(best_path, "digits", split=validation_split)
    assert on_validation["accuracy"] == pytest.approx(max(accuracies), abs=1e-6)
    # The test figures are best.keras's and last.keras's on the test split.
    assert training.evaluate(best_path, "digits")["accuracy"] == pytest.approx(
        summary["selected_test_accuracy"], abs=1e-6
    )
    assert training.evaluate(os.path.join(output_dir, "last.keras"), "digits")[
        "accuracy"
    ] == pytest.approx(summary["final_test_accuracy"], abs=1e-6)
    # A finished run is not trained again by accident.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--epochs", "6", "--output-dir", output_dir])
    assert exit_info.value.code == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_block_design_learns_with_trains_defaults_in_one_epoch(tmp_path):
    """Multigrid blocks start as the identity (`zero_init_residual`'s default).

    Started at scale 1, the block design ended near chance after one or two
    epochs of SGD at 0.1 (validation accuracy 0.20); zero-started, at 0.80
    after one.
    """
    summary = training.train(
        multigrid="block", epochs=1, output_dir=str(tmp_path / "run"), verbose=0
    )
    assert summary["learned"] and summary["best_validation_accuracy"] > 0.6


def _tiny_classifier(input_tensor, classes, multigrid, width, batch_norm_momentum, **kwargs):
    """A factory's signature on one convolution: `train` in seconds, for its bookkeeping."""
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(input_tensor)
    x = keras.layers.BatchNormalization(momentum=batch_norm_momentum)(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    return keras.Model(keras.utils.get_source_inputs(input_tensor), outputs)


@pytest.fixture
def tiny(monkeypatch):
    """`train`'s arguments for one epoch of `_tiny_classifier`, registered as model "Tiny"."""
    monkeypatch.setitem(training.MODELS, "Tiny", _tiny_classifier)
    return dict(model="Tiny", epochs=1, verbose=0)


def test_test_split_is_evaluated_only_after_training_and_chooses_nothing(
    tmp_path, tiny, monkeypatch
):
    fit_split, validation_split, _ = data.validation_splits("digits")
    split_of = {}
    pipeline = data.image_pipeline

    def recording_pipeline(name, split, *args, **kwargs):
        dataset = pipeline(name, split, *args, **kwargs)
        split_of[id(dataset)] = split
        return dataset

    calls = []
    fit, evaluate, predict = keras.Model.fit, keras.Model.evaluate, keras.Model.predict

    def recording_fit(self, x, *args, **kwargs):
        calls.append(("fit", split_of[id(x)], kwargs.get("validation_data")))
        result = fit(self, x, *args, **kwargs)
        calls.append(("fit returned",))
        return result

    def recording_evaluate(self, x, *args, **kwargs):
        calls.append(("evaluate", split_of[id(x)]))
        return evaluate(self, x, *args, **kwargs)

    def recording_predict(self, x, *args, **kwargs):
        calls.append(("predict", split_of[id(x)]))
        return predict(self, x, *args, **kwargs)

    monkeypatch.setattr(data, "image_pipeline", recording_pipeline)
    monkeypatch.setattr(keras.Model, "fit", recording_fit)
    monkeypatch.setattr(keras.Model, "evaluate", recording_evaluate)
    monkeypatch.setattr(keras.Model, "predict", recording_predict)
    summary = training.train(output_dir=str(tmp_path / "run"), **dict(tiny, epochs=2))
    # Validation is not fit's: it follows the recomputed batch-norm statistics.
    assert calls[0] == ("fit", fit_split, None)
    returned = calls.index(("fit returned",))
    # Each epoch, the BatchNormalization statistics are recomputed on the fit
    # split, then the validation split, which selects best.keras, is evaluated...
    assert calls[1:returned] == [("predict", fit_split), ("evaluate", validation_split)] * 2
    # ...and the test split is evaluated only once training is over: the final
    # model in inference mode and with batch statistics, and the selected one
    # unless it is the final one.
    assert calls[returned + 1 :] == [("evaluate", "test")] * (
        2 if summary["selected_epoch"] == 2 else 3
    )


def test_batch_statistics_accuracy_uses_each_batch_and_restores_the_moving_statistics():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    batch_norm = keras.layers.BatchNormalization()
    x = keras.layers.Flatten()(keras.layers.ReLU()(batch_norm(x)))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    # Moving means far above the activations: in inference mode the ReLU zeroes
    # everything and every image gets the same prediction.
    batch_norm.moving_mean.assign(np.full(8, 1e4, np.float32))
    images, _ = next(iter(data.image_pipeline("digits", "test", 355)))
    # Labels that the model predicts exactly when BatchNormalization normalises
    # each batch of 64 by its own statistics, computed on a copy.
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    labels = np.concatenate(
        [np.argmax(copy(images[i : i + 64], training=True), -1) for i in range(0, 355, 64)]
    )
    assert np.bincount(labels).max() < 0.9 * len(labels)
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(64)
    strategy = tf.distribute.get_strategy()
    assert training._test_accuracy(model, batches, strategy) < 0.9
    moving = [weight.numpy() for weight in model.non_trainable_weights]
    assert training._test_accuracy(model, batches, strategy, batch_statistics=True) == 1.0
    for weight, value in zip(model.non_trainable_weights, moving):
        np.testing.assert_array_equal(weight.numpy(), value)


def test_steps_per_execution_is_the_largest_divisor_of_the_epoch_up_to_the_cap():
    cap = training._MAX_STEPS_PER_EXECUTION
    assert training.steps_per_execution(cap) == cap
    assert training.steps_per_execution(2 * cap) == cap
    assert training.steps_per_execution(7) == 7
    assert training.steps_per_execution(3 * 19 * 37) == 19  # 2,109 steps: 19 divides, 20 not
    assert training.steps_per_execution(23) == 1  # a prime past the cap


def test_plan_settles_data_and_steps_before_anything_is_built():
    config = training._config(
        "ResNet20",
        "digits",
        epochs=2,
        batch_size=64,
        learning_rate=0.1,
        schedule="cosine",
        optimizer="sgd",
        momentum=0.9,
        weight_decay=0.0,
        multigrid=True,
        group_size=None,
        width=1.0,
        image_size=None,
        batch_norm_momentum=None,
        validation_fraction=0.1,
        seed=0,
        warmup_epochs=None,
    )
    assert config["multigrid"] == "layer"
    plan = training._plan(config, replicas=1, data_dir=None, manual_dir=None)
    assert plan.steps_per_epoch == _fit_steps()
    assert plan.batch_norm_momentum == training.auto_batch_norm_momentum(_fit_steps())
    assert plan.image_shape == (8, 8, 1)
    ((images, labels),) = plan.pipeline(plan.validation_split).take(1).as_numpy_iterator()
    assert images.shape == (64, 8, 8, 1) and labels.shape == (64,)
    with pytest.raises(ValueError, match="divide evenly between the 3 replicas"):
        training._plan(config, replicas=3, data_dir=None, manual_dir=None)


def test_coarsest_channels_reach_the_factory_and_are_checked():
    import types

    import keras_mgconv

    arguments = dict(
        epochs=2,
        batch_size=64,
        learning_rate=0.1,
        schedule="cosine",
        optimizer="sgd",
        momentum=0.9,
        weight_decay=0.0,
        multigrid=True,
        group_size=8,
        width=1.0,
        image_size=None,
        batch_norm_momentum=None,
        validation_fraction=0.1,
        seed=0,
        warmup_epochs=None,
    )
    info = types.SimpleNamespace(num_classes=10, name="digits")

    def coarsest_levels(coarsest_channels):
        config = training._config(
            "ResNet20", "digits", coarsest_channels=coarsest_channels, **arguments
        )
        assert config["coarsest_channels"] == coarsest_channels
        network = training._build_model(
            "ResNet20",
            info,
            (8, 8, 1),
            lambda x: x,
            config["multigrid"],
            config["group_size"],
            config["width"],
            0.9,
            config["coarsest_channels"],
        )
        return {
            (layer.filters, layer.levels[-1])
            for layer in network._flatten_layers()
            if isinstance(layer, keras_mgconv.MultigridConv2D)
        }

    # ResNet20's 16-, 32- and 64-channel layers: by default (32) the layers of
    # 16 and 32 channels are dense convolutions; with 8, cycles down to 8 channels.
    assert coarsest_levels(None) == {(64, 32)}
    assert coarsest_levels(8) == {(16, 8), (32, 8), (64, 8)}
    with pytest.raises(ValueError, match=r"Received: coarsest_channels=0\."):
        training._config("ResNet20", "digits", coarsest_channels=0, **arguments)


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_with_nothing_lost(tmp_path, monkeypatch):
    # Stopped after the learning rate's warm-up epoch: the schedule is saved
    # with the optimizer, and the resumed run goes on into its cosine decay.
    args = dict(epochs=2, verbose=0, warmup_epochs=1)
    uninterrupted = training.train(output_dir=str(tmp_path / "whole"), **args)

    output_dir = str(tmp_path / "resumed")
    original = training._EpochTimer.on_epoch_begin
    trained_steps_per_execution = []

    def stop_at_epoch_2(self, epoch, logs=None):
        trained_steps_per_execution.append(self.model.steps_per_execution)
        if epoch == 1:
            raise _Interrupt
        original(self, epoch, logs)

    monkeypatch.setattr(training._EpochTimer, "on_epoch_begin", stop_at_epoch_2)
    with pytest.raises(_Interrupt):
        training.train(output_dir=output_dir, **args)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(output_dir, "summary.json"))
    after_epoch_1 = keras.models.load_model(os.path.join(output_dir, "last.keras"))
    steps = int(after_epoch_1.optimizer.iterations.numpy())
    assert steps == _fit_steps()
    # Several steps per call of fit's compiled function, ending at the epoch's end;
    # the saved compile config keeps 1, for a loaded model's predict and evaluate.
    assert set(trained_steps_per_execution) == {training.steps_per_execution(steps)}
    assert training.steps_per_execution(steps) > 1
    assert after_epoch_1.steps_per_execution == 1
    assert any(
        np.abs(v.numpy()).sum() > 0
        for v in after_epoch_1.optimizer.variables
        if "momentum" in v.path
    )
    schedule = after_epoch_1.optimizer._learning_rate
    assert isinstance(schedule, LinearWarmup) and schedule.warmup_steps == steps

    resumed = training.train(output_dir=output_dir, **args)
    assert [int(row["epoch"]) for row in _history(output_dir)] == [0, 1]
    last = keras.models.load_model(os.path.join(output_dir, "last.keras"))
    assert int(last.optimizer.iterations.numpy()) == 2 * steps
    # Same batches, same optimizer state: the resumed run is the uninterrupted
    # one, the same operations on the same values in the same order, so the
    # same roundings and the same bits. No tolerance: a lost or repeated step
    # would move the weights by a whole update.
    whole = keras.models.load_model(str(tmp_path / "whole" / "last.keras"))
    for mine, theirs in zip(last.get_weights(), whole.get_weights()):
        np.testing.assert_array_equal(mine, theirs)
    assert resumed["final_test_accuracy"] == pytest.approx(
        uninterrupted["final_test_accuracy"], abs=0.01
    )


def test_run_killed_after_its_last_checkpoint_is_completed_by_a_rerun(tmp_path, tiny, monkeypatch):
    output_dir = str(tmp_path / "run")
    copy = training._copy

    def killed_before_best_keras(source, target):
        if os.path.basename(target) == "best.keras":
            raise _Interrupt
        copy(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(training, "_copy", killed_before_best_keras)
        with pytest.raises(_Interrupt):
            training.train(output_dir=output_dir, **tiny)
    assert sorted(os.listdir(output_dir)) == ["config.json", "history.csv", "last.keras", "logs"]
    # A temporary file of a killed write, and one of a live process's write.
    dead_pid = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    stale = os.path.join(output_dir, f".last.{dead_pid}.tmp.keras")
    live = os.path.join(output_dir, f".best.int8.{os.getpid()}.tmp.tflite")
    for path in (stale, live):
        open(path, "w").close()

    def fit(*args, **kwargs):
        raise AssertionError("the rerun trained again")

    monkeypatch.setattr(keras.Model, "fit", fit)
    summary = training.train(output_dir=output_dir, **tiny)
    assert os.path.exists(os.path.join(output_dir, "summary.json"))
    assert summary["selected_epoch"] == 1
    best = keras.models.load_model(os.path.join(output_dir, "best.keras"))
    assert int(best.optimizer.iterations.numpy()) == _fit_steps()
    assert not os.path.exists(stale) and os.path.exists(live)


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from keras_mgconv._files import directory_lock
    with directory_lock(sys.argv[1], sys.argv[2]):
        print("locked", flush=True)
        time.sleep(300)
""")


def test_second_run_into_one_output_dir_is_refused_until_the_first_dies(tmp_path, tiny, capsys):
    output_dir = str(tmp_path / "run")
    command = ["train", "--model", "Tiny", "--epochs", "1", "--output-dir", output_dir]
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, output_dir, training._LOCK_NAME],
        env=_QUIET,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as exit_info:
            cli.main(command)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1, error
        assert f"in use by another training run (process {holder.pid})" in error
        assert os.listdir(output_dir) == [training._LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    # Killed holding the lock: its lock file is left behind, and blocks nothing.
    assert os.listdir(output_dir) == [training._LOCK_NAME]
    assert cli.main(command) == 0
    assert os.path.exists(os.path.join(output_dir, "summary.json"))
    assert not os.path.exists(os.path.join(output_dir, training._LOCK_NAME))


def test_unreadable_config_json_is_named_with_the_way_out(tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "config.json").write_text('{"model": "ResNet20", "epo')
    with pytest.raises(
        ValueError, match=re.escape(f"{output_dir / 'config.json'} cannot be read (")
    ) as error:
        training.train(output_dir=str(output_dir), epochs=1, verbose=0)
    assert "`--overwrite`" in str(error.value)
    assert os.listdir(output_dir) == ["config.json"]


@pytest.mark.parametrize(
    "arguments",
    [
        dict(multigrid="blok"),
        dict(multigrid=1),
        dict(model="MobileNetV2", multigrid="block"),
    ],
)
def test_multigrid_takes_a_design_or_false(tmp_path, arguments):
    with pytest.raises(ValueError, match=re.escape(f"multigrid={arguments['multigrid']!r}.")):
        training.train(output_dir=str(tmp_path / "run"), epochs=1, verbose=0, **arguments)
    assert not (tmp_path / "run").exists()


def test_resume_refuses_other_settings(tmp_path):
    output_dir = str(tmp_path / "run")
    os.makedirs(output_dir)
    with open(os.path.join(output_dir, "config.json"), "w") as file:
        json.dump({"model": "ResNet32"}, file)
    with pytest.raises(ValueError, match=r"unfinished run with other settings.*model='ResNet32'"):
        training.train(output_dir=output_dir, epochs=1, verbose=0)


_MIRRORED = textwrap.dedent("""
    import json
    import math
    import sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from keras_mgconv import training
    from keras_mgconv._keras import keras
    from keras_mgconv.export import float32_tolerance

    class FirstStepTaken(Exception):
        pass

    def weights(timer):
        return [weight.numpy() for weight in timer.model.trainable_weights]

    def save_first_step(timer, batch, logs=None):
        if batch == 0:
            np.savez(output_dir + ".npz", *timer.initial_weights, *weights(timer))
            model = timer.model
            print(json.dumps({
                "replicas": model.distribute_strategy.num_replicas_in_sync,
                "tolerance": float32_tolerance(model),
                "pixels": arguments["batch_size"] * math.prod(model.input_shape[1:3]),
                "batch_norms": sum(isinstance(layer, keras.layers.BatchNormalization)
                                   for layer in model.layers)}), flush=True)
            raise FirstStepTaken

    training._EpochTimer.on_train_begin = (
        lambda timer, logs=None: setattr(timer, "initial_weights", weights(timer)))
    training._EpochTimer.on_train_batch_end = save_first_step
    arguments = dict(epochs=1, batch_size=64, learning_rate=0.002, schedule="constant",
                     width=0.5, coarsest_channels=8, verbose=0)
    # Callbacks see a step only at the end of its execution: the one-device
    # reference takes one step per execution to show its first; two replicas
    # take one per execution anyway (train's rule).
    steps_per_execution = training.steps_per_execution
    training.steps_per_execution = lambda steps_per_epoch: 1
    for output_dir, strategy in [
            (sys.argv[1] + "/one", "default"),
            (sys.argv[1] + "/two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))]:
        try:
            training.train(output_dir=output_dir, strategy=strategy, **arguments)
        except FirstStepTaken:
            pass
        training.steps_per_execution = steps_per_execution
""")


def test_mirrored_two_devices_take_the_one_device_step(tmp_path):
    # Both runs stop after their first step: a whole epoch on two replicas is
    # test_multi_worker_run_on_loopback_completes_an_epoch's.
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED, str(tmp_path)],
        env=_QUIET,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    assert (first["replicas"], second["replicas"]) == (1, 2)
    one, two = (
        [run[name] for name in run.files]
        for run in (np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz"))
    )
    count = len(one) // 2
    for initial, theirs in zip(one[:count], two[:count]):
        np.testing.assert_array_equal(initial, theirs)
    # Two replicas sum each half of the batch, then add the halves: the first
    # step's gradients are the one device's sums in another order. A weight's
    # gradient is a chain of sums (tests/float32_rounding.py): through the
    # network and back (twice the forward one, which `float32_tolerance`
    # counts), and over the batch's pixels, for the weight itself and for each
    # batch normalisation's mean and variance and their two sums backwards.
    # Storing the new weight rounds it by u |w| on top. Later steps are not
    # compared: how much a trajectory amplifies differences in the last bits
    # of its weights is no rounding argument's to bound.
    length = 2 * second["tolerance"] / (2 * UNIT_ROUNDOFF) + second["pixels"] * (
        1 + 4 * second["batch_norms"]
    )
    for initial, mine, theirs in zip(one[:count], one[count:], two[count:]):
        bound = 2 * UNIT_ROUNDOFF * (np.abs(mine) + length * np.max(np.abs(mine - initial)))
        excess = np.abs(theirs - mine) - bound
        assert np.max(excess) <= 0, (
            f"the first step differs by up to {np.max(np.abs(theirs - mine)):.3g} for a weight "
            f"of shape {mine.shape}, more than rounding makes it ({np.max(excess):.3g} over)"
        )


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("localhost", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_multi_worker_run_on_loopback_completes_an_epoch(tmp_path):
    # The baseline network: two processes share the 2 cores, and the multigrid
    # layers under a distribution strategy are test_distributed.py's.
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    output_dir = str(tmp_path / "run")
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keras_mgconv.cli",
                "train",
                "--strategy",
                "multi_worker",
                "--epochs",
                "1",
                "--width",
                "0.25",
                "--batch-size",
                "256",
                "--no-multigrid",
                "--output-dir",
                output_dir,
            ],
            env=dict(
                _QUIET,
                TF_CONFIG=json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": index}}
                ),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]
    try:
        outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    with open(os.path.join(output_dir, "summary.json")) as file:
        summary = json.load(file)
    assert summary["replicas"] == 2
    assert len(_history(output_dir)) == 1
    assert keras.models.load_model(
        os.path.join(output_dir, "last.keras")
    ).optimizer.iterations.numpy() == _fit_steps(256)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model", "ResNet99"], "Received: model='ResNet99'"),
        (["--dataset", "no_such_data"], "no dataset named 'no_such_data'"),
        (["--dataset", "digits:9.9.9"], "digits:9.9.9"),
        (["--epochs", "0"], "Received: epochs=0"),
        (["--batch-size", "-8"], "Received: batch_size=-8"),
        (["--model", "ResNet18"], "ResNet18 cannot take the 8x8x1 images of 'digits'"),
        (["--learning-rate", "nan"], "Received: learning_rate=nan"),
        (["--learning-rate", "inf"], "Received: learning_rate=inf"),
        (["--weight-decay", "nan"], "Received: weight_decay=nan"),
        (["--weight-decay", "inf"], "Received: weight_decay=inf"),
        (["--momentum", "nan"], "Received: momentum=nan"),
        (["--momentum", "inf"], "Received: momentum=inf"),
        (["--batch-norm-momentum", "5"], "Received: batch_norm_momentum=5.0"),
        (["--batch-norm-momentum", "-1"], "Received: batch_norm_momentum=-1.0"),
        (["--width", "inf"], "Received: width=inf"),
        (["--width", "nan"], "Received: width=nan"),
        (["--validation-fraction", "1"], "Received: validation_fraction=1.0"),
        (["--no-multigrid", "--design", "block"], "Received: design='block'"),
        (["--model", "MobileNetV2", "--design", "block"], "multigrid='block'"),
        # Refused before an epoch's dataset was made for each of them.
        (["--epochs", "99999999999999999999"], "Received: epochs=99999999999999999999"),
        # Refused before the images are made, not out of memory after a minute.
        (["--image-size", "100000"], "image_shape=(100000, 100000, 1)"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, arguments, message):
    output_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--output-dir", str(output_dir), *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error
    assert not output_dir.exists()


def test_empty_output_dir_is_an_error_not_the_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--output-dir", ""])
    assert exit_info.value.code == 2
    assert "Received: output_dir=''." in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_unwritable_output_dir_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--output-dir", str(blocker / "run")])
    assert exit_info.value.code == 2
    assert "is not a writable directory" in capsys.readouterr().err


def test_dangling_symlink_output_dir_is_refused(tmp_path, capsys):
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--output-dir", str(link)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"{link} is a symbolic link to {tmp_path / 'gone'}, which does not exist" in error
    assert os.listdir(tmp_path) == ["run"]


def test_output_dir_unwritable_midway_is_one_line(tmp_path, tiny, monkeypatch, capsys):
    output_dir = str(tmp_path / "run")
    remove = os.remove

    def unwritable(self, epoch, logs=None):
        raise PermissionError(13, "Permission denied", os.path.join(output_dir, "last.keras"))

    def remove_unless_in_output_dir(path):
        if os.path.dirname(path) == output_dir:
            raise PermissionError(13, "Permission denied", path)
        remove(path)

    # The lock's release removes its file; in a directory made unwritable, that
    # failed too, in a second traceback.
    monkeypatch.setattr(training._Checkpoints, "on_epoch_end", unwritable)
    monkeypatch.setattr(os, "remove", remove_unless_in_output_dir)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--model", "Tiny", "--epochs", "1", "--output-dir", output_dir])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error == (
        f"keras-mgconv train: error: [Errno 13] Permission denied: "
        f"'{output_dir}/last.keras'. No epoch had completed: there is nothing "
        f"to resume."
    )


def test_overwrite_removes_the_old_runs_logs(tmp_path):
    events = tmp_path / "logs" / "train" / "events.out.tfevents.1.host"
    events.parent.mkdir(parents=True)
    events.write_text("")
    (tmp_path / "last.keras").write_text("")
    (tmp_path / "config.json").write_text("{}")
    training._clear_run(str(tmp_path))
    assert os.listdir(tmp_path) == []


def _unfinished_run(output_dir, tiny, monkeypatch):
    """An output_dir left by a `tiny` run of 2 epochs stopped after the first."""
    original = training._EpochTimer.on_epoch_begin

    def stop_at_epoch_2(self, epoch, logs=None):
        if epoch == 1:
            raise _Interrupt
        original(self, epoch, logs)

    with monkeypatch.context() as patch:
        patch.setattr(training._EpochTimer, "on_epoch_begin", stop_at_epoch_2)
        with pytest.raises(_Interrupt):
            training.train(output_dir=output_dir, **{**tiny, "epochs": 2})


def _delete(path):
    os.remove(path)


def _garble(path):
    with open(path, "w") as file:
        file.write("epoch,accuracy\nfirst,0.5\n")


def _truncate(path):
    with open(path, "rb") as file:
        content = file.read()
    with open(path, "wb") as file:
        file.write(content[: len(content) // 2])


@pytest.mark.parametrize(
    "name, damage, problem",
    [
        ("history.csv", _delete, "the history of its 1 completed epochs, is missing"),
        ("history.csv", _garble, "cannot be read (ValueError: invalid literal for int()"),
        ("last.keras", _truncate, "is not a readable Keras model (not a zip archive)"),
    ],
)
def test_damaged_run_state_is_named_with_the_way_out(
    tmp_path, tiny, monkeypatch, name, damage, problem
):
    output_dir = str(tmp_path / "run")
    _unfinished_run(output_dir, tiny, monkeypatch)
    path = os.path.join(output_dir, name)
    damage(path)
    with pytest.raises(ValueError) as error:
        training.train(output_dir=output_dir, **{**tiny, "epochs": 2})
    message = str(error.value)
    assert message.startswith("The unfinished run in `output_dir` cannot be resumed: ")
    assert path in message and problem in message, message
    assert "`--overwrite`" in message


def test_missing_best_model_of_an_earlier_epoch_is_named(tmp_path):
    history = [{"epoch": "0", "val_accuracy": "0.9"}, {"epoch": "1", "val_accuracy": "0.8"}]
    (tmp_path / "last.keras").write_text("")
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{tmp_path / 'best.keras'}, the model of epoch 1, is missing or truncated"
        ),
    ):
        training._restore_best(str(tmp_path), str(tmp_path), history)


@pytest.mark.parametrize("name", ["notes.weights.h5", "notes.keras", "notes.txt"])
def test_weights_file_that_is_not_weights_is_named(tmp_path, name):
    # Here, not in test_models: the factories' `weights` load what `train` saves.
    path = str(tmp_path / name)
    with open(path, "w") as file:
        file.write("not weights")
    with pytest.raises(ValueError, match=re.escape(f"Received: weights={path!r}.")) as error:
        models.ResNet20(input_shape=(8, 8, 1), weights=path)
    assert str(error.value).startswith("The `weights` file cannot be loaded into resnet20 (")


def test_train_command_exits_2_from_the_shell(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_mgconv.cli",
            "train",
            "--epochs",
            "-1",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        env=_QUIET,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("keras-mgconv train: error:")
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_a_model_for_other_classes(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    path = str(tmp_path / "three.keras")
    model.save(path)
    with pytest.raises(ValueError, match="predicts 3 classes but 'digits' has 10"):
        training.evaluate(path, "digits")
    with pytest.raises(ValueError, match="model_path="):
        training.evaluate(str(tmp_path / "missing.keras"), "digits")


def test_damaged_keras_file_is_named_not_reported_missing(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    whole = tmp_path / "whole.keras"
    model.save(whole)
    cut = tmp_path / "cut.keras"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    text = tmp_path / "text.keras"
    text.write_text("not a model")
    for path in (cut, text):
        with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable Keras model")):
            training.evaluate(str(path), "digits")
