import csv
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from keras_mgconv import cli, training
from keras_mgconv._keras import keras

_QUIET = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _history(output_dir):
    with open(os.path.join(output_dir, "history.csv")) as file:
        return list(csv.DictReader(file))


def test_train_command_reaches_90_percent_on_digits(digits_run, capsys):
    output_dir, printed = digits_run
    assert "best test accuracy" in printed
    with open(os.path.join(output_dir, "summary.json")) as file:
        summary = json.load(file)
    assert summary["best_test_accuracy"] >= 0.90
    assert summary["model"] == "ResNet20" and summary["multigrid"]
    assert len(summary["epoch_times"]) == 6 and all(t > 0 for t in summary["epoch_times"])
    assert summary["multiply_adds"] > 0
    best = keras.models.load_model(os.path.join(output_dir, "best.keras"))
    assert summary["parameters"] == best.count_params()
    assert any(type(layer).__name__ == "MultigridConv2D" for layer in best.layers)
    assert [int(row["epoch"]) for row in _history(output_dir)] == list(range(6))
    assert os.listdir(os.path.join(output_dir, "logs"))
    # The best checkpoint scores on the test split what the run recorded for it.
    result = training.evaluate(os.path.join(output_dir, "best.keras"), "digits")
    assert result["accuracy"] == pytest.approx(summary["best_test_accuracy"], abs=1e-6)
    # A finished run is not trained again by accident.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--epochs", "6", "--output-dir", output_dir])
    assert exit_info.value.code == 2
    assert "already holds a finished run" in capsys.readouterr().err


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_with_nothing_lost(tmp_path, monkeypatch):
    args = dict(epochs=3, width=0.5, verbose=0)
    uninterrupted = training.train(output_dir=str(tmp_path / "whole"), **args)

    output_dir = str(tmp_path / "resumed")
    original = training._EpochTimer.on_epoch_begin

    def stop_at_epoch_2(self, epoch, logs=None):
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
    assert steps == 1442 // 64
    assert any(np.abs(v.numpy()).sum() > 0 for v in after_epoch_1.optimizer.variables
               if "momentum" in v.path)

    resumed = training.train(output_dir=output_dir, **args)
    assert [int(row["epoch"]) for row in _history(output_dir)] == [0, 1, 2]
    last = keras.models.load_model(os.path.join(output_dir, "last.keras"))
    assert int(last.optimizer.iterations.numpy()) == 3 * steps
    # Same batches, same optimizer state: the resumed run is the uninterrupted one.
    whole = keras.models.load_model(str(tmp_path / "whole" / "last.keras"))
    for mine, theirs in zip(last.get_weights(), whole.get_weights()):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)
    assert resumed["final_test_accuracy"] == pytest.approx(
        uninterrupted["final_test_accuracy"], abs=0.01)


def test_resume_refuses_other_settings(tmp_path):
    output_dir = str(tmp_path / "run")
    os.makedirs(output_dir)
    with open(os.path.join(output_dir, "config.json"), "w") as file:
        json.dump({"model": "ResNet32"}, file)
    with pytest.raises(ValueError, match=r"unfinished run with other settings.*model='ResNet32'"):
        training.train(output_dir=output_dir, epochs=1, verbose=0)


_MIRRORED = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from keras_mgconv import training
    runs = {}
    for name, strategy in [("one", "default"),
                           ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))]:
        summary = training.train(epochs=2, learning_rate=0.002, schedule="constant",
                                 width=0.5, output_dir=sys.argv[1] + "/" + name,
                                 strategy=strategy, verbose=0)
        runs[name] = summary["replicas"]
    print(json.dumps(runs))
""")


def test_mirrored_two_devices_follow_the_one_device_trajectory(tmp_path):
    result = subprocess.run([sys.executable, "-c", _MIRRORED, str(tmp_path)], env=_QUIET,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"one": 1, "two": 2}
    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose([float(r[key]) for r in two], [float(r[key]) for r in one],
                                   rtol=0.05)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("localhost", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_multi_worker_run_on_loopback_completes_an_epoch(tmp_path):
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    output_dir = str(tmp_path / "run")
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "keras_mgconv.cli", "train", "--strategy", "multi_worker",
             "--epochs", "1", "--width", "0.5", "--output-dir", output_dir],
            env=dict(_QUIET, TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}})),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for index in range(2)]
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
    assert keras.models.load_model(os.path.join(output_dir, "last.keras")).optimizer.iterations \
        .numpy() == 1442 // 64


@pytest.mark.parametrize("arguments, message", [
    (["--model", "ResNet99"], "Received: model='ResNet99'"),
    (["--dataset", "no_such_data"], "no dataset named 'no_such_data'"),
    (["--epochs", "0"], "Received: epochs=0"),
    (["--batch-size", "-8"], "Received: batch_size=-8"),
    (["--model", "ResNet18"], "ResNet18 cannot take the 8x8x1 images of 'digits'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, arguments, message):
    output_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--output-dir", str(output_dir), *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error
    assert not output_dir.exists()


def test_unwritable_output_dir_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--output-dir", str(blocker / "run")])
    assert exit_info.value.code == 2
    assert "is not a writable directory" in capsys.readouterr().err


def test_train_command_exits_2_from_the_shell(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "keras_mgconv.cli", "train", "--epochs", "-1",
         "--output-dir", str(tmp_path / "run")],
        env=_QUIET, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("keras-mgconv train: error:")
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_a_model_for_other_classes(tmp_path):
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    path = str(tmp_path / "three.keras")
    model.save(path)
    with pytest.raises(ValueError, match="predicts 3 classes but 'digits' has 10"):
        training.evaluate(path, "digits")
    with pytest.raises(ValueError, match="model_path="):
        training.evaluate(str(tmp_path / "missing.keras"), "digits")
