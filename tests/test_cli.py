import json
import os
import signal
import subprocess
import sys
import time

import pytest

from keras_mgconv import cli, training


def test_summary_reports_levels_and_parameters(capsys):
    assert cli.main(["summary", "--filters", "256", "--group-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "levels (channels, finest first): 256, 128, 64, 32, 16" in out
    assert "parameters: 79,360 (Conv2D: 590,080, ratio 0.134)" in out


def test_summary_counts_parameters_without_allocating_them(capsys):
    # Built for real, the Conv2D it is compared with failed after 67 s and 3 GB.
    assert cli.main(["summary", "--filters", str(2**20)]) == 0
    assert (
        "parameters: 336,590,080 (Conv2D: 9,895,605,698,560, ratio 0.000)"
        in capsys.readouterr().out
    )


def test_summary_shows_connector_for_width_change(capsys):
    cli.main(["summary", "--filters", "64", "--input-channels", "32", "--group-size", "8"])
    assert "connector: 4 group(s)" in capsys.readouterr().out


def test_bad_arguments_exit_2_with_one_line():
    """One line, and nothing of TensorFlow's start-up: the user has set no log level."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLED_DEVICE_TYPES")
    }
    result = subprocess.run(
        [sys.executable, "-m", "keras_mgconv.cli", "summary", "--filters", "40"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("keras-mgconv summary: error:")
    assert "filters=40, group_size=16" in lines[0]


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fly"])
    assert exit_info.value.code == 2


def test_summary_connector_groups_divide_both_widths(capsys):
    # 576 -> 96 with group size 8: 72 groups of 8 cannot split 96 outputs; 48 of 12 can.
    cli.main(
        [
            "summary",
            "--filters",
            "96",
            "--input-channels",
            "576",
            "--group-size",
            "8",
            "--coarsest-channels",
            "12",
            "--kernel-size",
            "1",
        ]
    )
    assert "connector: 48 group(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argument, name",
    [
        ("--filters", "filters"),
        ("--kernel-size", "kernel_size"),
        ("--strides", "strides"),
        ("--group-size", "group_size"),
        ("--coarsest-channels", "coarsest_channels"),
        ("--input-channels", "input_channels"),
    ],
)
@pytest.mark.parametrize("value", ["0", "-1"])
def test_summary_refuses_non_positive_integers(capsys, argument, name, value):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["summary", argument, value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].endswith(f"Received: {name}={value}."), error


def test_command_line_imports_no_tensorflow_until_a_command_runs():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, keras_mgconv.cli; assert 'tensorflow' not in sys.modules",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]


_SUMMARY = dict(
    model="ResNet20",
    dataset="digits",
    parameters=1000,
    multiply_adds=2000,
    final_test_accuracy=0.91,
    final_test_accuracy_batch_statistics=0.93,
    selected_test_accuracy=0.92,
    selected_epoch=4,
    selected_by="10% of 'train', stratified",
    best_validation_accuracy=0.95,
    train_time=12.0,
    final_train_accuracy=0.9,
    learned=True,
    num_classes=10,
)


@pytest.mark.parametrize(
    "arguments, multigrid, run_name, design",
    [
        ([], "layer", "multigrid", "multigrid, layer design"),
        (["--design", "layer"], "layer", "multigrid", "multigrid, layer design"),
        (["--design", "block"], "block", "multigrid-block", "multigrid, block design"),
        (["--no-multigrid"], False, "baseline", "baseline"),
    ],
)
def test_train_command_chooses_the_design_and_reports_both_test_figures(
    monkeypatch, capsys, arguments, multigrid, run_name, design
):
    from keras_mgconv import training

    received = {}

    def train(**kwargs):
        received.update(kwargs)
        return dict(_SUMMARY, multigrid=kwargs["multigrid"])

    monkeypatch.setattr(training, "train", train)
    assert cli.main(["train", *arguments]) == 0
    assert received["multigrid"] == multigrid
    assert received["output_dir"] == os.path.join("runs", f"ResNet20-{run_name}-digits")
    printed = capsys.readouterr().out
    assert printed.startswith(f"ResNet20 ({design}) on digits:")
    assert (
        "Test accuracy 0.9100 after the last epoch (0.9300 with batch statistics), "
        "0.9200 after epoch 4, the best.keras selected on the validation split "
        "(10% of 'train', stratified: accuracy 0.9500)."
    ) in printed


def test_train_command_passes_the_coarsest_channels(monkeypatch):
    from keras_mgconv import training

    received = {}

    def train(**kwargs):
        received.update(kwargs)
        return dict(_SUMMARY, multigrid=kwargs["multigrid"])

    monkeypatch.setattr(training, "train", train)
    assert cli.main(["train", "--group-size", "8", "--coarsest-channels", "32"]) == 0
    assert (received["group_size"], received["coarsest_channels"]) == (8, 32)
    assert cli.main(["train"]) == 0
    assert received["coarsest_channels"] is None


@pytest.fixture
def small_model_path(tmp_path):
    """A small untrained multigrid classifier for the digits' 8x8x1 images, saved."""
    import keras_mgconv
    from keras_mgconv._keras import keras

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same")(inputs)
    x = keras_mgconv.MultigridConv2D(32, 3, padding="same", group_size=8)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    path = tmp_path / "model.keras"
    model.save(path)
    return path


def test_export_int8_on_dataset_prints_report(capsys, small_model_path):
    assert (
        cli.main(
            [
                "export",
                str(small_model_path),
                "--quantization",
                "int8",
                "--dataset",
                "digits",
                "--samples",
                "100",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    output = small_model_path.parent / "model.int8.tflite"
    assert f"{output}: {output.stat().st_size:,} bytes, int8 (input float32, " in out
    assert "all TFLite builtins" in out
    assert "on 100 examples (verification_data)" in out
    assert "groups of fewer than 16 filters merged up to 16" in out


def test_export_min_group_filters_is_passed_named_and_checked(capsys, small_model_path):
    assert cli.main(["export", str(small_model_path), "--min-group-filters", "16"]) == 0
    assert "groups of fewer than 16 filters merged up to 16" in capsys.readouterr().out
    assert (small_model_path.parent / "model.float32.g16.tflite").exists()
    with pytest.raises(SystemExit):
        cli.main(["export", str(small_model_path), "--min-group-filters", "wide"])
    assert "expected 'auto' or an int, got 'wide'" in capsys.readouterr().err


def test_export_split_lowering_to_output(capsys, small_model_path, tmp_path):
    output = tmp_path / "split.tflite"
    cli.main(["export", str(small_model_path), "--lowering", "split", "--output", str(output)])
    out = capsys.readouterr().out
    assert output.exists()
    assert "float32 (input float32, output float32), split lowering" in out
    assert "SPLIT" in out and "(random)" in out


def test_export_pointwise_chooses_matrix_or_cycle_and_names_the_file(capsys, tmp_path):
    import keras_mgconv
    from keras_mgconv._keras import keras

    inputs = keras.Input((4, 4, 16))
    outputs = keras_mgconv.MultigridConv2D(128, 1, group_size=8)(inputs)
    path = tmp_path / "expand.keras"
    keras.Model(inputs, outputs).save(path)
    for arguments, output, matrices in [
        ([], "expand.float32.tflite", 1),
        (["--pointwise", "cycle"], "expand.float32.cycle.tflite", 0),
    ]:
        assert cli.main(["export", str(path), *arguments]) == 0
        out = capsys.readouterr().out
        assert (tmp_path / output).exists()
        assert ("1 1x1 multigrid layers exported as their cycle's matrix" in out) == bool(matrices)


def test_benchmark_prints_latency_table(capsys, small_model_path, tmp_path):
    output = tmp_path / "model.tflite"
    cli.main(["export", str(small_model_path), "--output", str(output)])
    capsys.readouterr()
    assert (
        cli.main(
            ["benchmark", str(output), "--threads", "1", "2", "--repeats", "3", "--warmup", "1"]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["threads", "XNNPACK", "median", "ms", "p90", "ms"]
    assert [line.split()[:2] for line in lines[2:]] == [
        ["1", "on"],
        ["1", "off"],
        ["2", "on"],
        ["2", "off"],
    ]


@pytest.mark.parametrize(
    "arguments,message",
    [
        (
            ["export", "missing.keras"],
            "`model` must be an existing .keras file. Received: model='missing.keras'.",
        ),
        (["export", "{cut}"], "cut.keras is not a readable Keras model (not a zip archive)"),
        (["export", "{model}", "--quantization", "int8"], "Received: representative_data=None."),
        (["export", "{model}", "--output", "missing/model.tflite"], "Received: path="),
        (["benchmark", "missing.tflite"], "Received: path='missing.tflite'."),
        # Checked before the model (here unreadable) loads.
        (["export", "{cut}", "--min-group-filters", "0"], "Received: min_group_filters=0."),
        (["export", "{cut}", "--image-size", "0"], "Received: image_size=0."),
        # quantize's tf_keras process read these into a 28-line zipfile.BadZipFile.
        (["quantize", "{cut}"], "cut.keras is not a readable Keras model (not a zip archive)"),
        (["quantize", "{damaged}"], "damaged.keras is not a readable Keras model (BadZipFile: "),
    ],
)
def test_export_benchmark_and_quantize_errors_exit_2(capsys, small_model_path, arguments, message):
    content = small_model_path.read_bytes()
    cut = small_model_path.parent / "cut.keras"
    cut.write_bytes(content[:1000])
    # A zip archive whose members' bytes are overwritten in the middle: their CRCs fail.
    damaged = small_model_path.parent / "damaged.keras"
    middle = len(content) // 2
    damaged.write_bytes(content[:middle] + bytes(1000) + content[middle + 1000 :])
    arguments = [
        argument.format(model=small_model_path, cut=cut, damaged=damaged) for argument in arguments
    ]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(arguments)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"keras-mgconv {arguments[0]}: error:")
    assert message in error[0]


def test_quantize_without_the_optimization_extra_says_what_to_install(
    capsys, small_model_path, monkeypatch
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: (
            None
            if name in ("tf_keras", "tensorflow_model_optimization")
            else find_spec(name, *args)
        ),
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quantize", str(small_model_path)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        "keras-mgconv quantize: error: the Python package 'tf_keras' is not installed. "
        "`quantize` runs tensorflow-model-optimization under tf_keras: install "
        'keras-mgconv[optimization] (pip install "keras-mgconv[optimization]").\n'
    )


def test_interrupted_export_says_nothing_of_epochs(capsys, small_model_path, monkeypatch):
    from keras_mgconv import export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_tflite", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(small_model_path)])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "keras-mgconv export: interrupted.\n"


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_backend_that_is_not_installed_is_one_line(tmp_path, backend):
    # A module of the backend's name that cannot be imported: as if not installed.
    (tmp_path / f"{backend}.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{backend}'\", name='{backend}')\n"
    )
    environment = dict(
        os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3"
    )
    result = subprocess.run(
        [sys.executable, "-m", "keras_mgconv.cli", "summary"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"keras-mgconv summary: error: the Python package '{backend}' is not installed. "
        f"KERAS_BACKEND='{backend}' selects Keras' backend of that name: install it, or "
        f"unset KERAS_BACKEND to use TensorFlow."
    )


def test_train_on_another_backend_says_it_needs_tensorflow(tmp_path):
    """`train` reads TFDS through tf.data and exports TFLite: one line, nothing written."""
    pytest.importorskip("torch")
    output_dir = tmp_path / "run"
    environment = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-m", "keras_mgconv.cli", "train", "--output-dir", str(output_dir)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("keras-mgconv train: error: `train` runs on Keras' TensorFlow backend")
    )
    assert result.stderr.strip().endswith("Received: KERAS_BACKEND='torch'.")
    assert not output_dir.exists()


def test_train_prints_a_line_per_epoch_and_records_the_group_size(digits_run):
    """An epoch of the digits is one execution of 20 steps: a progress bar would not move."""
    output_dir, printed = digits_run
    epoch_lines = [line for line in printed.splitlines() if line.startswith("20/20 - ")]
    assert len(epoch_lines) == 6 and all("val_accuracy" in line for line in epoch_lines)
    assert "\u2501" not in printed  # The progress bar's "━".
    with open(os.path.join(output_dir, "summary.json")) as file:
        summary = json.load(file)
    # ResNet20's default: the summary records what the run used, not the argument (None).
    assert (summary["group_size"], summary["coarsest_channels"]) == (8, 32)
    with open(os.path.join(output_dir, "config.json")) as file:
        assert json.load(file)["group_size"] is None
    # Trained 20 steps per execution, saved with 1: a loaded model's first predict
    # traces one step, not a 20-step loop (47 s against 5 s for 1,797 digits).
    from keras_mgconv._keras import keras

    assert keras.models.load_model(os.path.join(output_dir, "best.keras")).steps_per_execution == 1


@pytest.mark.parametrize(
    "multigrid, group_size, coarsest_channels, used",
    [
        ("layer", None, None, (8, 32)),  # ResNet20's defaults: summary.json said null.
        ("block", 64, None, (64, 64)),
        ("layer", 16, 8, (16, 8)),
        (False, None, None, (None, None)),
    ],
)
def test_summary_records_the_group_size_and_coarsest_channels_used(
    multigrid, group_size, coarsest_channels, used
):
    config = {
        "model": "ResNet20",
        "multigrid": multigrid,
        "group_size": group_size,
        "coarsest_channels": coarsest_channels,
    }
    assert training._multigrid_settings_used(config) == dict(
        zip(["group_size", "coarsest_channels"], used)
    )


def test_evaluate_into_a_file_writes_no_colour_codes(capsys, small_model_path):
    assert cli.main(["evaluate", str(small_model_path)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "\x1b" not in out


def test_progress_bar_where_an_epoch_is_many_executions():
    from keras_mgconv import training

    # CIFAR-10's 703 steps an epoch at batch 64 run 19 at a time; the digits' 20 at once.
    assert training._auto_verbosity(703, 19) == 1
    assert training._auto_verbosity(20, 20) == 2


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_train_refuses_a_seed_numpy_cannot_take(capsys, tmp_path, seed):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--seed", seed, "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].endswith(f"Received: seed={seed}."), error
    assert not (tmp_path / "run").exists()


def test_train_into_a_folder_that_cannot_be_created_says_nothing_of_resuming(capsys):
    # /proc passes os.access for root, but nothing can be created in it.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--output-dir", "/proc/forbidden_dir"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "resume" not in error[0], error
    assert error[0].endswith("Received: output_dir='/proc/forbidden_dir'.")


def test_overwrite_removes_the_run_and_its_exports_and_nothing_else(tmp_path):
    def plant(folder, names):
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("")

    user_files = ["notes.txt", "logs/notes.txt", "other.int8.tflite"]
    run = [
        "config.json",
        "summary.json",
        "history.csv",
        "best.keras",
        "last.keras",
        "best.int8.tflite",
        "best.qat.int8.tflite",
        "last.float32.g16.tflite",
        "logs/train/events.out.tfevents.1.host.1.0.v2",
        "logs/validation/events.out.tfevents.1.host.1.1.v2",
    ]
    plant(tmp_path / "run", user_files + run)
    # A folder that never held a run (no config.json): nothing of it is the tool's.
    plant(tmp_path / "not_a_run", user_files + ["best.int8.tflite"])
    for folder in ("run", "not_a_run"):
        training._clear_run(str(tmp_path / folder))
    assert sorted(
        str(path.relative_to(tmp_path / "run")) for path in (tmp_path / "run").rglob("*")
    ) == ["logs", *sorted(user_files)]
    assert (tmp_path / "not_a_run" / "logs" / "notes.txt").exists()
    assert (tmp_path / "not_a_run" / "best.int8.tflite").exists()


def _stopped_train(monkeypatch, stop, epochs_done):
    """Makes `training.train` stop with `stop` after writing `epochs_done` epochs' last.keras."""
    from keras_mgconv import training

    def train(output_dir, **kwargs):
        os.makedirs(output_dir, exist_ok=True)
        if epochs_done:
            with open(os.path.join(output_dir, "last.keras"), "w"):
                pass
        raise stop

    monkeypatch.setattr(training, "train", train)


@pytest.mark.parametrize(
    "stop, status, said",
    [
        (KeyboardInterrupt(), 130, "interrupted."),
        (OSError(28, "No space left on device"), 1, "error: [Errno 28] No space left on device."),
    ],
)
@pytest.mark.parametrize(
    "epochs_done, overwrite, hint",
    [
        (0, False, "No epoch had completed: there is nothing to resume."),
        (1, False, "Run the same command again to resume from the last completed epoch."),
        (1, True, "Run it again without --overwrite to resume from the last completed epoch."),
    ],
)
def test_stopped_train_says_whether_it_can_resume(
    monkeypatch, capsys, tmp_path, stop, status, said, epochs_done, overwrite, hint
):
    _stopped_train(monkeypatch, stop, epochs_done)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "train",
                "--output-dir",
                str(tmp_path / "run"),
                *(["--overwrite"] if overwrite else []),
            ]
        )
    assert exit_info.value.code == status
    assert capsys.readouterr().err == f"keras-mgconv train: {said} {hint}\n"


def test_sigterm_unwinds_train_releases_its_lock_and_exits_143(monkeypatch, capsys, tmp_path):
    from keras_mgconv import training

    output_dir = tmp_path / "run"
    lock = output_dir / training._LOCK_NAME

    def train(output_dir, **kwargs):
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            pytest.fail(
                "train runs under SIGTERM's default action, which ends the process "
                "without a word and leaves the lock"
            )
        with training._output_dir_lock(output_dir):
            (tmp_path / "run" / "last.keras").write_text("")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # The handler interrupts the sleep.

    monkeypatch.setattr(training, "train", train)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", "--output-dir", str(output_dir)])
        # Afterwards SIGTERM ends the process again, as before the command.
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 143
    assert capsys.readouterr().err == (
        "keras-mgconv train: terminated (SIGTERM). Run the same command again to resume "
        "from the last completed epoch.\n"
    )
    assert not lock.exists()


def test_train_says_when_the_network_did_not_learn(monkeypatch, capsys):
    # The block design at SGD's 0.1 once ended at 0.19 training accuracy and
    # was reported as a normal result.
    summary = {
        "model": "ResNet20",
        "multigrid": "block",
        "dataset": "digits",
        "parameters": 1,
        "multiply_adds": 1,
        "final_test_accuracy": 0.19,
        "final_test_accuracy_batch_statistics": 0.19,
        "selected_test_accuracy": 0.19,
        "selected_epoch": 1,
        "selected_by": "validation",
        "best_validation_accuracy": 0.2,
        "train_time": 1.0,
        "num_classes": 10,
        "final_train_accuracy": 0.19,
        "learned": False,
    }
    monkeypatch.setattr(training, "train", lambda **kwargs: summary)
    assert cli.main(["train", "--design", "block", "--output-dir", "unused"]) == 0
    assert "near chance (0.100): the network did not learn" in capsys.readouterr().err


def test_test_accuracy_with_batch_statistics_leaves_a_factory_model_as_it_was():
    """train's report runs the model in training mode: no warning, no momentum changed."""
    import warnings

    import numpy as np
    import tensorflow as tf

    from keras_mgconv import models
    from keras_mgconv._keras import keras

    model = models.ResNet20(
        (8, 8, 1), width=0.25, group_size=4, coarsest_channels=4, batch_norm_momentum=0.99
    )
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    images = np.random.default_rng(0).uniform(0, 255, (16, 8, 8, 1)).astype("float32")
    test_data = tf.data.Dataset.from_tensor_slices((images, np.arange(16) % 10)).batch(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accuracy = training._test_accuracy(
            model, test_data, tf.distribute.get_strategy(), batch_statistics=True
        )
    assert 0 <= accuracy <= 1
    assert {
        layer.momentum
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    } == {0.99}
    assert model.batch_norm_statistics_batches == 50
