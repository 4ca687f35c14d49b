"""The layers and model factories on every Keras 3 backend: TensorFlow, JAX and PyTorch.

Keras reads KERAS_BACKEND once, when it is imported, so each backend runs
backend_checks.py in a subprocess of its own, one after another: each loads the
models the backends before it saved, so a file saved under TensorFlow loads
under JAX and PyTorch, and one saved under JAX loads under PyTorch, with the
saving backend's predictions to float32 rounding.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ["tensorflow", "jax", "torch"]
MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def run_backend(backend, output_dir, saved):
    environment = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        # XLA's CPU compiler spends most of the JAX checks' time
        # optimizing code that runs a step or two (187 s against 120 s at -O0).
        "XLA_FLAGS": " ".join(
            filter(None, ["--xla_backend_optimization_level=0", os.environ.get("XLA_FLAGS")])
        ),
    }
    environment.pop("TF_USE_LEGACY_KERAS", None)
    result = subprocess.run(
        [sys.executable, os.path.join(TESTS, "backend_checks.py"), str(output_dir), *saved],
        env=environment,
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    """Where each backend saves its model (BACKEND.keras), inputs and predictions (BACKEND.npz)."""
    return tmp_path_factory.mktemp("backends")


@pytest.fixture(scope="module")
def reports(output_dir):
    """The report of every installed backend, in BACKENDS' order."""
    reports, saved = {}, []
    for backend in BACKENDS:
        if importlib.util.find_spec(MODULES[backend]) is None:
            continue
        reports[backend] = run_backend(backend, output_dir, saved)
        saved.append(str(output_dir / f"{backend}.keras"))
    return reports


@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_and_factories_on_backend(reports, backend):
    if backend not in reports:
        pytest.skip(f'{backend} is not installed: pip install -e ".[{backend}]"')
    report = reports[backend]
    assert report["backend"] == backend
    earlier = [name for name in BACKENDS[: BACKENDS.index(backend)] if name in reports]
    assert report["checks"] == [
        "grouped_conv_output",
        "v_cycle_output",
        "grouped_conv_gradients",
        "no_tensorflow",
        "layers",
        "precise_batch_norm",
        "save",
        *(f"load {name}.keras" for name in earlier),
    ]


@pytest.mark.parametrize(
    "backend,fastest", [("tensorflow", "grouped"), ("jax", "split"), ("torch", "grouped")]
)
def test_auto_picks_the_backends_fastest_grouped_convolution_on_cpu(reports, backend, fastest):
    # XLA on CPU trains a 256-channel, group-16 MultigridConv2D 40x slower grouped than split.
    if backend not in reports:
        pytest.skip(f"{backend} is not installed")
    assert reports[backend]["auto"] == fastest


@pytest.mark.parametrize("backend", ["jax", "torch"])  # TensorFlow's: test_models.py
def test_model_factories_build_and_fit_on_backend(reports, backend):
    if backend not in reports:
        pytest.skip(f"{backend} is not installed")
    assert reports[backend]["factories_error"] is None


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_layers_do_not_import_tensorflow(reports, backend):
    if backend not in reports:
        pytest.skip(f"{backend} is not installed")
    assert reports[backend]["tensorflow_imported_by_layers"] is False


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_model_trained_on_backend_exports_to_litert_under_tensorflow(reports, output_dir, backend):
    """The README's path: train under JAX or PyTorch, export to LiteRT under TensorFlow."""
    if backend not in reports:
        pytest.skip(f"{backend} is not installed")
    from keras_mgconv._keras import USE_LEGACY_KERAS

    if USE_LEGACY_KERAS:
        pytest.skip("a Keras 3 file: tf_keras cannot read it")
    from keras_mgconv._keras import keras
    from keras_mgconv.export import export_tflite

    model = keras.models.load_model(output_dir / f"{backend}.keras")
    arrays = np.load(output_dir / f"{backend}.npz")
    report = export_tflite(
        model, output_dir / f"{backend}.tflite", verification_data=arrays["inputs"]
    )
    assert report.builtin_only, report.op_counts
    # Export verifies the file against the loaded model to float32 rounding
    # (or writes nothing); the loaded model must be the trained one.
    assert report.verification.examples == len(arrays["inputs"])
    from layer_checks import assert_same_predictions

    assert_same_predictions(model, arrays)
