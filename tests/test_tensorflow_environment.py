"""What keras_mgconv sets before TensorFlow loads, and training with and without oneDNN.

TensorFlow chooses oneDNN when it is imported, so each case runs in a fresh
process: with `TF_ENABLE_ONEDNN_OPTS` unset (keras_mgconv turns oneDNN on on
x86 when it is imported before TensorFlow), with it unset but TensorFlow
imported first, and with `TF_ENABLE_ONEDNN_OPTS=0`, the configuration of
AVX2-only CPUs where a script imports Keras first: there grouped convolutions
train through TensorFlow's oneDNN kernels called directly. In every case
TensorFlow pools its CPU memory. On Linux without a CUDA driver the package
also spares the user TensorFlow's error-level cuInit line, in either order;
and its own probes and command leave out the TensorFlow lines they cause.
"""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from keras_mgconv import _environment

X86 = platform.machine().lower() in _environment._X86

SCRIPT = textwrap.dedent("""
    import json, os, sys, warnings
    if sys.argv[1] == "tensorflow first":
        import tensorflow
    elif sys.argv[1] == "keras first":
        import keras
    import numpy as np
    import keras_mgconv
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port
    from keras_mgconv._keras import keras
    from keras_mgconv.layers.grouped_conv import grouped_gradient_supported

    def train_step(implementation):
        model = keras.Sequential([
            keras.Input((8, 8, 32)),
            keras_mgconv.MultigridConv2D(32, 3, padding="same", group_size=8,
                                         implementation=implementation),
        ])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        before = [w.numpy().copy() for w in model.trainable_weights]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((4, 8, 8, 32)).astype("float32")
        loss = model.train_on_batch(x, rng.standard_normal(x.shape).astype("float32"))
        changed = sum(not np.array_equal(b, w.numpy())
                      for b, w in zip(before, model.trainable_weights))
        return float(loss), changed, len(before)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, changed, total = train_step("auto")
        train_step("auto")
    try:
        train_step("grouped")
        direct_error = None
    except tf.errors.OpError as error:
        direct_error = error.message
    try:
        # TensorFlow keeps statistics only for its pooling (BFC) CPU allocator.
        pooled = "peak" in tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        pooled = False
    print(json.dumps({
        "setting": os.environ.get("TF_ENABLE_ONEDNN_OPTS"), "pooled": pooled,
        "onednn": _pywrap_util_port.IsMklEnabled(),
        "probe": grouped_gradient_supported(tf.float32), "loss": loss,
        "changed": changed, "total": total, "direct_error": direct_error,
        "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning]}))
""")


def run(mode, **environment):
    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    env.update(environment, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["changed"] == report["total"] == 8
    assert report["loss"] > 0
    return report


@pytest.mark.skipif(not X86, reason="keras_mgconv turns oneDNN on only on x86 CPUs")
def test_importing_keras_mgconv_first_gives_the_fast_path():
    report = run("keras_mgconv first")
    assert report["setting"] == "1"
    assert report["pooled"] is True
    assert report["onednn"] is True
    assert report["probe"] is True
    assert report["direct_error"] is None
    assert report["warnings"] == []


def test_tensorflow_imported_first_keeps_its_choice_and_still_trains_grouped():
    report = run("tensorflow first")
    assert report["setting"] is None
    assert report["pooled"] is True
    if report["onednn"] or not X86:
        # A CPU on which TensorFlow turns oneDNN on by itself (AVX-512, AMX).
        assert report["probe"] is True and report["warnings"] == []
    else:
        _assert_trains_through_onednn_kernels(report)


@pytest.mark.skipif(not X86, reason="TensorFlow builds oneDNN's kernels for x86 CPUs")
@pytest.mark.parametrize("mode", ["keras first", "keras_mgconv first"])
def test_trains_grouped_with_onednn_off(mode):
    """An AVX2-only CPU and a script that imports Keras first: oneDNN stays off."""
    report = run(mode, TF_ENABLE_ONEDNN_OPTS="0")
    # The user's setting is kept.
    assert report["setting"] == "0"
    assert report["onednn"] is False
    _assert_trains_through_onednn_kernels(report)


def _assert_trains_through_onednn_kernels(report):
    # "auto" and "grouped" train as one grouped convolution, through
    # TensorFlow's oneDNN kernels called directly, without a word to the user,
    # and the allocator is the pooling one (issue 18's speed, half of it).
    assert report["probe"] is True
    assert report["direct_error"] is None
    assert report["warnings"] == []
    assert report["pooled"] is True


@pytest.mark.skipif(
    sys.platform != "linux" or _environment._has_accelerator_runtime(),
    reason="the cuInit error appears only on Linux without a GPU runtime",
)
def test_no_cuda_error_without_a_gpu_in_either_import_order():
    script = (
        "import sys\nif sys.argv[1] != 'keras_mgconv first': import tensorflow\n"
        "if sys.argv[1] != 'tensorflow alone': import keras_mgconv\n"
        "import tensorflow as tf\n"
        "print([d.device_type for d in tf.config.list_physical_devices()])"
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("TF_ENABLED_DEVICE_TYPES", "TF_CPP_MIN_LOG_LEVEL")
    }
    modes = ("keras_mgconv first", "tensorflow first", "tensorflow alone")
    processes = {
        mode: subprocess.Popen(
            [sys.executable, "-c", script, mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in modes
    }
    outputs = {mode: process.communicate(timeout=300) for mode, process in processes.items()}
    for mode, process in processes.items():
        assert process.returncode == 0, outputs[mode][1][-3000:]
    for mode in ("keras_mgconv first", "tensorflow first"):
        stdout, stderr = outputs[mode]
        assert "cuInit" not in stderr and stdout.strip() == "['CPU']", mode
    # Only the GPU type is disabled: TensorFlow says so in one line, not one a type.
    assert [
        line.split("] ", 1)[1]
        for line in outputs["keras_mgconv first"][1].splitlines()
        if "TF_ENABLED_DEVICE_TYPES" in line
    ] == ["Device factory 'GPU' disabled by TF_ENABLED_DEVICE_TYPES environment variable."]
    # What it spares: TensorFlow on its own logs the error.
    assert "failed call to cuInit" in outputs["tensorflow alone"][1]


def test_gradient_probe_logs_nothing(capfd):
    """Its expected failures (float16 on CPUs without AVX-512, oneDNN off) are the answer."""
    import tensorflow as tf

    from keras_mgconv.layers import _tensorflow_ops

    capfd.readouterr()
    # Probed afresh, past the cache: in float16 and bfloat16 at least one fails on most CPUs.
    answers = [
        _tensorflow_ops._gradient_source.__wrapped__(dtype) for dtype in (tf.float16, tf.bfloat16)
    ]
    assert capfd.readouterr().err == "", answers


def test_hidden_tensorflow_lines_are_only_those_picked(capfd):
    from keras_mgconv import _tensorflow_logs

    lines = [
        "W0000 00:00:1796235672.405775    9404 local_rendezvous.cc:412] Local rendezvous is "
        "aborting with status: INVALID_ARGUMENT\n",
        "\t [[{{node kernel_gradient}}]]\n",
        "E0000 00:00:1796235672.391148    9404 util.cc:131] Something else went wrong.\n",
        "a line of Python's\n",
    ]
    with _tensorflow_logs.hidden(_tensorflow_logs.records_saying("Local rendezvous")):
        for line in lines:
            os.write(2, line.encode())
    assert capfd.readouterr().err == "".join(lines[2:])
    startup = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
        "I0000 00:00:1796235295.373644    6269 cudart_stub.cc:31] Could not find cuda drivers "
        "on your machine, GPU will not be used.\n",
    ]
    with _tensorflow_logs.hidden(_tensorflow_logs.startup_line):
        for line in startup + lines[2:]:
            os.write(2, line.encode())
    assert capfd.readouterr().err == "".join(lines[2:])


def test_command_line_log_level_only_where_the_user_set_none(monkeypatch):
    import tensorflow  # noqa: F401  Imported: the level is read already.

    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    assert _environment.quiet_command_line_logs() is False
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    monkeypatch.delitem(sys.modules, "tensorflow")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    assert _environment.quiet_command_line_logs() is False
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    assert _environment.quiet_command_line_logs() is True
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
